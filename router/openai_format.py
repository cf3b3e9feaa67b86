"""Engine output (`Delta`s) -> OpenAI response bodies and stream chunks.

`Choice` accumulates one choice's deltas for a non-streamed answer; `Formatter` builds the
completion / chat.completion bodies, the per-delta stream chunks (text_completion or
chat.completion.chunk) and the usage object. Logprobs are shaped as OpenAI shapes them:
completions ``{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}``, chat
``{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``; a token's string
is its own decode (special tokens kept), as vLLM reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.router.frontend import Delta

LOGPROB_FLOOR = -9999.0   # -inf is not JSON


@dataclass
class Choice:
    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    started: bool = False           # streaming: the chat role chunk went out
    text_offset: int = 0            # streaming: completions logprobs text_offset so far

    def add(self, d: Delta) -> None:
        if d.reset:   # the router retried elsewhere before any of this choice was sent
            self.text, self.token_ids, self.logprobs = [], [], []
            self.finish_reason = self.stop_reason = None
            return
        self.text.append(d.text)
        self.token_ids.extend(d.token_ids)
        self.logprobs.extend(d.logprobs)
        if d.finish_reason:
            self.finish_reason, self.stop_reason = d.finish_reason, d.stop_reason
        self.prompt_tokens = d.prompt_tokens or self.prompt_tokens
        self.completion_tokens = d.completion_tokens or self.completion_tokens
        self.cached_tokens = d.cached_tokens or self.cached_tokens


def _stop_reason(s: str | None):
    if s is None:
        return None
    return int(s) if s.isdigit() else s


class Formatter:
    def __init__(self, kind: str, request_id: str, created: int, model: str, tokenizer,
                 logprobs: int | None, include_usage: bool = False):
        self.kind, self.id, self.created, self.model = kind, request_id, created, model
        self.tok, self.k, self.include_usage = tokenizer, logprobs, include_usage
        self._strings: dict[int, str] = {}

    def token(self, tid: int) -> str:
        s = self._strings.get(tid)
        if s is None:
            s = self._strings[tid] = self.tok.decode([tid], skip_special_tokens=False)
        return s

    # ---- logprobs --------------------------------------------------------------------------------
    def completion_logprobs(self, token_ids, entries, offset: int) -> tuple[dict, int]:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, (lp, top) in zip(token_ids, entries):
            s = self.token(tid)
            out["tokens"].append(s)
            out["token_logprobs"].append(max(lp, LOGPROB_FLOOR))
            d = {self.token(t): max(v, LOGPROB_FLOOR) for t, v in top[:self.k]}
            d.setdefault(s, max(lp, LOGPROB_FLOOR))
            out["top_logprobs"].append(d)
            out["text_offset"].append(offset)
            offset += len(s)
        return out, offset

    def chat_logprobs(self, token_ids, entries) -> dict:
        def item(tid, lp):
            s = self.token(tid)
            return {"token": s, "logprob": max(lp, LOGPROB_FLOOR), "bytes": list(s.encode("utf-8"))}
        return {"content": [{**item(tid, lp), "top_logprobs": [item(t, v) for t, v in top[:self.k]]}
                            for tid, (lp, top) in zip(token_ids, entries)]}

    # ---- bodies ------------------------------------------------------------------------------------
    @staticmethod
    def usage(choices: list[Choice], prompt_lens: list[int], n: int) -> dict:
        completion = sum(c.completion_tokens for c in choices)
        prompt = sum(prompt_lens)        # each prompt counts once, whatever n is
        cached = sum(c.cached_tokens for c in choices if c.index % n == 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    def response(self, choices: list[Choice], usage: dict) -> dict:
        out = []
        for c in choices:
            lps = None
            if self.k is not None:
                lps = (self.completion_logprobs(c.token_ids, c.logprobs, 0)[0] if self.kind == "completions"
                       else self.chat_logprobs(c.token_ids, c.logprobs))
            item = {"index": c.index, "logprobs": lps, "finish_reason": c.finish_reason,
                    "stop_reason": _stop_reason(c.stop_reason)}
            if self.kind == "completions":
                item["text"] = "".join(c.text)
            else:
                item["message"] = {"role": "assistant", "content": "".join(c.text)}
            out.append(item)
        obj = "text_completion" if self.kind == "completions" else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": out, "usage": usage}

    def _chunk(self, choices: list[dict]) -> dict:
        obj = "text_completion" if self.kind == "completions" else "chat.completion.chunk"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def chunks(self, c: Choice, d: Delta) -> list[dict]:
        """Stream chunks for one delta of choice ``c`` (none for a delta with nothing to show:
        tokens whose text the worker still holds back for stop-string matching)."""
        if not (d.text or d.finish_reason or (self.k is not None and d.token_ids)):
            return []
        out = []
        lps = None
        if self.kind == "completions":
            if self.k is not None:
                lps, c.text_offset = self.completion_logprobs(d.token_ids, d.logprobs, c.text_offset)
            out.append(self._chunk([{"index": c.index, "text": d.text, "logprobs": lps,
                                     "finish_reason": d.finish_reason,
                                     "stop_reason": _stop_reason(d.stop_reason)}]))
            return out
        if not c.started:
            c.started = True
            out.append(self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]))
        if self.k is not None:
            lps = self.chat_logprobs(d.token_ids, d.logprobs)
        delta = {"content": d.text} if d.text or not d.finish_reason else {}
        out.append(self._chunk([{"index": c.index, "delta": delta, "logprobs": lps,
                                 "finish_reason": d.finish_reason,
                                 "stop_reason": _stop_reason(d.stop_reason)}]))
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._chunk([]), "usage": usage}
