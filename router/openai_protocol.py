"""OpenAI request bodies -> `Prepared` (token ids + engine SamplingParams per prompt).

The field tables below are the one description of what /v1/completions and /v1/chat/completions
accept: `parse_completion` / `parse_chat` type-check against them (bool is not an integer, NaN is
not a number, unknown fields are refused as OpenAI refuses them unless --ignore-unknown-fields),
and router/openapi.py builds the OpenAPI schemas from them. Every refusal is an
`InvalidRequestError` naming the OpenAI ``param`` (400 at the HTTP front). OpenAI fields that would
change the output in ways the engine cannot (penalties, logit_bias, tools, echo, ...) are accepted
only with their neutral value. Extensions spelled as vLLM spells them (top_k, min_p, ignore_eos,
min_tokens, stop_token_ids, ...) go to the engine as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.engine.errors import InvalidRequestError
from tandem.engine.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 128
COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's legacy completions default
ROLES = ("system", "user", "assistant", "tool", "developer", "function")

# name -> (JSON types, description)
COMMON_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "model": (("string",), "Model id (GET /v1/models); default: the served model"),
    "n": (("integer", "null"), f"Choices per prompt, 1..{MAX_N}; choice i > 0 samples with seed + i"),
    "stream": (("boolean", "null"), "Stream Server-Sent Events ending in `data: [DONE]`"),
    "stream_options": (("object", "null"), "{include_usage: bool}: a last chunk with usage (stream only)"),
    "stop": (("string", "array", "null"), "Up to 16 stop strings (not included in the text)"),
    "max_tokens": (("integer", "null"), "Tokens to generate at most (>= 1)"),
    "temperature": (("number", "null"), "Sampling temperature >= 0; 0 is greedy (default 1)"),
    "top_p": (("number", "null"), "Nucleus sampling mass in (0, 1]"),
    "seed": (("integer", "null"), "Seed of this request's sampler (reproducible sampling)"),
    "presence_penalty": (("number", "null"), "Only 0 is supported"),
    "frequency_penalty": (("number", "null"), "Only 0 is supported"),
    "logit_bias": (("object", "null"), "Only empty is supported"),
    "user": (("string", "null"), "Ignored"),
    "top_k": (("integer", "null"), "Extension: sample from the k most likely tokens (0/-1: off)"),
    "min_p": (("number", "null"), "Extension: drop tokens below min_p * p(most likely)"),
    "ignore_eos": (("boolean", "null"), "Extension: keep generating past EOS up to max_tokens"),
    "min_tokens": (("integer", "null"), "Extension: no EOS/stop before this many tokens"),
    "stop_token_ids": (("array", "null"), "Extension: token ids that end generation"),
    "skip_special_tokens": (("boolean", "null"), "Extension: leave special tokens out of text (default true)"),
    "include_stop_str_in_output": (("boolean", "null"), "Extension: keep the matched stop string"),
    "repetition_penalty": (("number", "null"), "Extension: only 1 is supported"),
}
COMPLETION_FIELDS = {
    **COMMON_FIELDS,
    "prompt": (("string", "array"), "Text, token ids, or a list of either (one choice set each)"),
    "logprobs": (("integer", "null"), f"Log probabilities of the chosen token and the top k (0..{MAX_LOGPROBS})"),
    "echo": (("boolean", "null"), "Only false is supported"),
    "best_of": (("integer", "null"), "Only equal to n is supported"),
    "suffix": (("string", "null"), "Only empty is supported"),
}
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "messages": (("array",), "[{role, content}]: content is text or a list of {type: text, text} parts"),
    "max_completion_tokens": (("integer", "null"), "Tokens to generate at most (wins over max_tokens)"),
    "logprobs": (("boolean", "null"), "Return log probabilities of the chosen tokens"),
    "top_logprobs": (("integer", "null"), f"With logprobs: also the top k (0..{MAX_LOGPROBS}) per token"),
    "tools": (("array", "null"), "Only empty is supported"),
    "tool_choice": (("string", "object", "null"), "Only none is supported"),
    "parallel_tool_calls": (("boolean", "null"), "Ignored"),
    "response_format": (("object", "null"), "Only {type: text} is supported"),
    "add_generation_prompt": (("boolean", "null"), "Extension: end the template with the assistant turn (default true)"),
    "chat_template_kwargs": (("object", "null"), "Extension: extra variables for the chat template"),
    "metadata": (("object", "null"), "Ignored"),
    "store": (("boolean", "null"), "Ignored"),
}

_CHECK = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v,
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


@dataclass
class Prepared:
    kind: str                          # "completions" | "chat"
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]       # one per prompt (max_tokens may differ)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None        # top-k wanted in the response; None: no logprobs


def bad(message: str, param: str | None, code: str | None = None):
    raise InvalidRequestError(message, param=param, code=code)


def check_types(body, fields: dict, ignore_unknown: bool = False) -> None:
    if not isinstance(body, dict):
        bad("the request body must be a JSON object", None)
    for k, v in body.items():
        spec = fields.get(k)
        if spec is None:
            if not ignore_unknown:
                bad(f"Unrecognized request argument supplied: {k}", k, "unknown_parameter")
            continue
        types = spec[0]
        if not any(_CHECK[t](v) for t in types):
            bad(f"{k}: expected {' or '.join(types)}, got {_json_type(v)} ({v!r:.80})", k, "invalid_type")


def _json_type(v) -> str:
    return ("null" if v is None else "boolean" if isinstance(v, bool) else "integer" if isinstance(v, int)
            else "number" if isinstance(v, float) else "string" if isinstance(v, str)
            else "array" if isinstance(v, list) else "object")


def _neutral(body: dict, name: str, ok) -> None:
    if name in body and body[name] is not None and not ok(body[name]):
        bad(f"{name}={body[name]!r} is not supported by this server", name, "unsupported_parameter")


def _common(body: dict, served: str) -> tuple[str, int, bool, bool]:
    model = body.get("model") or served
    n = body.get("n") if body.get("n") is not None else 1
    if not 1 <= n <= MAX_N:
        bad(f"n must be in [1, {MAX_N}], got {n}", "n")
    stream = bool(body.get("stream"))
    so = body.get("stream_options")
    if so is not None:
        if not stream:
            bad("stream_options is only allowed when stream is true", "stream_options")
        iu = so.get("include_usage", False)
        if not isinstance(iu, bool):
            bad("stream_options.include_usage must be a boolean", "stream_options")
    include_usage = bool(so and so.get("include_usage"))
    _neutral(body, "presence_penalty", lambda v: v == 0)
    _neutral(body, "frequency_penalty", lambda v: v == 0)
    _neutral(body, "repetition_penalty", lambda v: v == 1)
    _neutral(body, "logit_bias", lambda v: not v)
    stop = body.get("stop")
    if isinstance(stop, list) and any(not isinstance(s, str) for s in stop):
        bad("stop must be a string or a list of strings", "stop")
    seed = body.get("seed")
    if seed is not None and not -(1 << 63) <= seed < (1 << 63):
        bad("seed must fit in a signed 64-bit integer", "seed")
    ids = body.get("stop_token_ids")
    if ids is not None and any(not _CHECK["integer"](t) for t in ids):
        bad("stop_token_ids must be a list of integers", "stop_token_ids")
    return model, n, stream, include_usage


def _params(body: dict, max_tokens: int, logprobs: int | None, renames: dict[str, str]) -> SamplingParams:
    get = lambda k, d: d if body.get(k) is None else body[k]  # noqa: E731
    sp = SamplingParams(
        max_tokens=max_tokens, temperature=get("temperature", 1.0), top_p=get("top_p", 1.0),
        top_k=get("top_k", 0), min_p=get("min_p", 0.0), seed=body.get("seed"),
        stop=get("stop", []), stop_token_ids=get("stop_token_ids", []),
        ignore_eos=get("ignore_eos", False), min_tokens=get("min_tokens", 0), logprobs=logprobs,
        include_stop_str_in_output=get("include_stop_str_in_output", False),
        skip_special_tokens=get("skip_special_tokens", True))
    try:
        sp.validate()
    except InvalidRequestError as e:
        if e.param in renames:
            e.message = e.message.replace(e.param, renames[e.param], 1)
            e.args = (e.message,)
            e.param = renames[e.param]
        raise
    return sp


def _prompts(prompt, tokenizer) -> list[list[int]]:
    is_ids = lambda x: isinstance(x, list) and all(_CHECK["integer"](t) for t in x)  # noqa: E731
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and is_ids(prompt):
        items = [prompt]
    elif prompt and all(isinstance(p, str) for p in prompt):
        items = prompt
    elif prompt and all(is_ids(p) and p for p in prompt):
        items = prompt
    else:
        bad("prompt must be a string, a list of token ids, or a non-empty list of either", "prompt")
    out = []
    for p in items:
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            bad("the prompt is empty", "prompt")
        if any(t < 0 for t in ids):
            bad("prompt token ids must be >= 0", "prompt")
        out.append(ids)
    return out


def parse_completion(body, served: str, tokenizer, check_context, ignore_unknown=False) -> Prepared:
    check_types(body, COMPLETION_FIELDS, ignore_unknown)
    if "prompt" not in body:
        bad("prompt is required", "prompt", "missing_required_parameter")
    model, n, stream, include_usage = _common(body, served)
    _neutral(body, "echo", lambda v: v is False)
    _neutral(body, "suffix", lambda v: v == "")
    _neutral(body, "best_of", lambda v: v == n)
    lp = body.get("logprobs")
    max_tokens = body.get("max_tokens")
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    base = _params(body, max_tokens, lp, {})
    prompts = _prompts(body["prompt"], tokenizer)
    for ids in prompts:
        check_context(len(ids), max_tokens, "prompt")
    return Prepared("completions", model, prompts, [base] * len(prompts), n, stream, include_usage, lp)


def _messages(msgs) -> list[dict]:
    if not msgs:
        bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    bad(f"messages[{i}].content: only text parts ({{type: text, text}}) are supported",
                        "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            bad(f"messages[{i}].content must be a string, a list of text parts or null", "messages")
        out.append({**m, "content": content if content is not None else ""})
    return out


def parse_chat(body, served: str, tokenizer, check_context, max_model_len: int,
               ignore_unknown=False) -> Prepared:
    check_types(body, CHAT_FIELDS, ignore_unknown)
    if "messages" not in body:
        bad("messages is required", "messages", "missing_required_parameter")
    model, n, stream, include_usage = _common(body, served)
    _neutral(body, "tools", lambda v: not v)
    _neutral(body, "tool_choice", lambda v: v == "none")
    _neutral(body, "response_format", lambda v: v.get("type") == "text")
    top = body.get("top_logprobs")
    if top is not None and not body.get("logprobs"):
        bad("top_logprobs requires logprobs to be true", "top_logprobs")
    lp = (top or 0) if body.get("logprobs") else None
    mt_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(mt_param)
    kwargs = body.get("chat_template_kwargs") or {}
    agp = body.get("add_generation_prompt")
    ids = tokenizer.encode_chat(_messages(body["messages"]), True if agp is None else agp, **kwargs)
    if max_tokens is None:
        # as vLLM does: as much as the context leaves
        if max_model_len and len(ids) >= max_model_len:
            check_context(len(ids), 1, "messages")
        max_tokens = max(1, max_model_len - len(ids)) if max_model_len else COMPLETIONS_DEFAULT_MAX_TOKENS
    params = _params(body, max_tokens, lp, {"max_tokens": mt_param, "logprobs": "top_logprobs"})
    check_context(len(ids), max_tokens, "messages")
    return Prepared("chat", model, [ids], [params], n, stream, include_usage, lp)
