"""The OpenAI-compatible API through a real router in front of 2 prefill + 1 decode workers:
answers equal the engine's offline output, streaming, n, logprobs, usage, errors, /openapi.json."""

from __future__ import annotations

import concurrent.futures
import json

import pytest

from tandem.engine import SamplingParams
from tests.pd.harness import metric_value
from tests.router.conftest import MODEL_NAME, get, post, sse_events

PROMPTS = ["The quick brown fox", "Once upon a time, in a distant land,", "1 2 3 4 5"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def completion(url, **body):
    return post(f"{url}/v1/completions", {"model": MODEL_NAME, "temperature": 0, **body})


def chat(url, **body):
    return post(f"{url}/v1/chat/completions", {"model": MODEL_NAME, "temperature": 0, **body})


def assert_openai_error(status, headers, body, expect_status, param=None):
    assert status == expect_status, body
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body


# ---- equality with the engine -------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_equals_offline(cluster, offline, prompt):
    want = offline.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0))[0]
    status, _, body = completion(cluster.url, prompt=prompt, max_tokens=12)
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == MODEL_NAME
    (c,) = body["choices"]
    assert c["text"] == want.text
    assert c["finish_reason"] == want.finish_reason
    assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == len(want.token_ids)
    assert body["usage"]["total_tokens"] == len(want.prompt_token_ids) + len(want.token_ids)


def test_completion_stream_equals_offline(cluster, offline):
    want = offline.generate(PROMPTS[1], SamplingParams(max_tokens=16, temperature=0.0))[0]
    status, headers, text = completion(cluster.url, prompt=PROMPTS[1], max_tokens=16, stream=True,
                                       stream_options={"include_usage": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["object"] == "text_completion" for e in chunks)
    assert "".join(c["text"] for e in chunks for c in e["choices"]) == want.text
    finishes = [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]
    assert finishes == [want.finish_reason]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(want.token_ids)
    assert all(e["usage"] is None for e in chunks[:-1])


def test_completion_token_ids_prompt(cluster, offline):
    ids = offline.tokenizer.encode(PROMPTS[0])
    want = offline.generate([ids], SamplingParams(max_tokens=8, temperature=0.0))[0]
    status, _, body = completion(cluster.url, prompt=ids, max_tokens=8)
    assert status == 200 and body["choices"][0]["text"] == want.text


def test_chat_equals_offline(cluster, offline):
    want = offline.chat(CHAT, SamplingParams(max_tokens=10, temperature=0.0))
    status, _, body = chat(cluster.url, messages=CHAT, max_completion_tokens=10)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    (c,) = body["choices"]
    assert c["message"] == {"role": "assistant", "content": want.text}
    assert c["finish_reason"] == want.finish_reason
    assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids)


def test_chat_stream_equals_offline(cluster, offline):
    want = offline.chat(CHAT, SamplingParams(max_tokens=10, temperature=0.0))
    status, _, text = chat(cluster.url, messages=CHAT, max_tokens=10, stream=True)
    assert status == 200
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["delta"].get("content", "") for e in chunks for c in e["choices"])
    assert content == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason
    assert all("usage" not in e for e in chunks)   # no include_usage: no usage key at all


def test_stop_string(cluster, offline):
    full = offline.generate(PROMPTS[1], SamplingParams(max_tokens=16, temperature=0.0))[0].text
    stop = full.strip()[2:5]
    assert stop and stop in full
    want = offline.generate(PROMPTS[1], SamplingParams(max_tokens=16, temperature=0.0, stop=[stop]))[0]
    _, _, body = completion(cluster.url, prompt=PROMPTS[1], max_tokens=16, stop=stop)
    c = body["choices"][0]
    assert c["text"] == want.text == full[:full.index(stop)]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == stop


def test_concurrent_clients(cluster, offline):
    params = SamplingParams(max_tokens=10, temperature=0.0)
    want = {p: offline.generate(p, params)[0].text for p in PROMPTS}
    jobs = [(PROMPTS[i % len(PROMPTS)], i % 2 == 0) for i in range(12)]

    def one(job):
        prompt, stream = job
        status, _, out = completion(cluster.url, prompt=prompt, max_tokens=10, stream=stream)
        assert status == 200, out
        if stream:
            return "".join(c["text"] for e in sse_events(out)[:-1] for c in e["choices"])
        return out["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(one, jobs))
    assert got == [want[p] for p, _ in jobs]


# ---- n, seeds, logprobs -----------------------------------------------------------------------
def test_n_choices_with_derived_seeds(cluster):
    body = dict(prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=1234, n=3, ignore_eos=True)
    status, _, a = completion(cluster.url, **body)
    assert status == 200, a
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    _, _, one = completion(cluster.url, prompt=PROMPTS[0], max_tokens=1)
    assert a["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]   # the prompt counts once
    assert a["usage"]["completion_tokens"] == 3 * 8
    texts = [c["text"] for c in a["choices"]]
    assert len(set(texts)) > 1                     # seed + i: the choices differ ...
    _, _, b = completion(cluster.url, **body)
    assert [c["text"] for c in b["choices"]] == texts   # ... and are reproducible
    _, _, single = completion(cluster.url, **{**body, "n": 1})
    assert single["choices"][0]["text"] == texts[0]     # choice 0 uses the seed as given


def test_n_stream_chat(cluster):
    status, _, text = chat(cluster.url, messages=CHAT, max_tokens=6, n=2, temperature=0.8, seed=7,
                           ignore_eos=True, stream=True, stream_options={"include_usage": True})
    assert status == 200
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    per = {0: "", 1: ""}
    finished = set()
    for e in events[:-2]:
        for c in e["choices"]:
            per[c["index"]] += c["delta"].get("content", "")
            if c["finish_reason"]:
                finished.add(c["index"])
    assert finished == {0, 1} and all(per.values())
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 2 * 6


def test_completion_logprobs_shape(cluster, offline):
    want = offline.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3))[0]
    status, _, body = completion(cluster.url, prompt=PROMPTS[0], max_tokens=5, logprobs=3)
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert isinstance(tok, str) and v <= 0 and 1 <= len(top) <= 4 and tok in top
    assert lp["token_logprobs"] == pytest.approx([c for c, _ in want.logprobs], abs=1e-4)


def test_chat_logprobs_shape(cluster):
    status, _, body = chat(cluster.url, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=2)
    assert status == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["bytes"] == list(item["token"].encode())
        assert len(item["top_logprobs"]) == 2
        assert all(set(t) == {"token", "logprob", "bytes"} for t in item["top_logprobs"])
    status, _, body = chat(cluster.url, messages=CHAT, max_tokens=4)
    assert body["choices"][0]["logprobs"] is None


def test_stream_logprobs(cluster):
    status, _, text = completion(cluster.url, prompt=PROMPTS[0], max_tokens=5, logprobs=1, stream=True)
    toks = [t for e in sse_events(text)[:-1] for c in e["choices"] if c["logprobs"]
            for t in c["logprobs"]["tokens"]]
    assert status == 200 and len(toks) == 5


# ---- errors ---------------------------------------------------------------------------------------
BAD_BODIES = [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": [1, 2]}, "stop"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "no_such_field": 1}, "no_such_field"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=[p + str(i) for i, (_, p) in enumerate(BAD_BODIES)])
def test_bad_completion_requests(cluster, body, param):
    assert_openai_error(*post(f"{cluster.url}/v1/completions", {"model": MODEL_NAME, **body}), 400, param)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": 1}, "logprobs"),
    ({"messages": "hello"}, "messages"),
])
def test_bad_chat_requests(cluster, body, param):
    assert_openai_error(*post(f"{cluster.url}/v1/chat/completions", {"model": MODEL_NAME, **body}), 400, param)


def test_malformed_json_and_non_object(cluster):
    for raw in (b"{bad json", b"[1, 2]", b"", b'{"prompt": NaN}', b"\xff\xfe"):
        assert_openai_error(*post(f"{cluster.url}/v1/completions", None, raw=raw), 400)


def test_unknown_model_is_404(cluster):
    assert_openai_error(*completion(cluster.url, prompt="x", model="gpt-9"), 404, "model")
    assert_openai_error(*chat(cluster.url, messages=CHAT, model="gpt-9", stream=True), 404, "model")


def test_unknown_route_and_method(cluster):
    assert_openai_error(*post(f"{cluster.url}/v1/embeddings", {"input": "x"}), 404)
    assert_openai_error(*get(f"{cluster.url}/v1/completions"), 405)


def test_prompt_too_long(cluster):
    _, _, models = get(f"{cluster.url}/v1/models")
    limit = models["data"][0]["max_model_len"]
    assert limit > 0
    ids = [100] * (limit - 4)
    status, headers, body = completion(cluster.url, prompt=ids, max_tokens=10)
    assert_openai_error(status, headers, body, 400, "prompt")
    assert body["error"]["code"] == "context_length_exceeded"
    assert str(limit) in body["error"]["message"]
    # streamed: still a plain 400 (headers are not sent before the request is accepted)
    status, headers, body = completion(cluster.url, prompt=ids, max_tokens=10, stream=True)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    long_chat = [{"role": "user", "content": "word " * (limit + 10)}]
    status, headers, body = chat(cluster.url, messages=long_chat)
    assert_openai_error(status, headers, body, 400, "messages")
    assert body["error"]["code"] == "context_length_exceeded"
    # it fits exactly: accepted
    status, _, body = completion(cluster.url, prompt=[100] * (limit - 2), max_tokens=2)
    assert status == 200, body


def test_worker_invalid_argument_is_400(cluster):
    # the router does not know the engine's vocabulary size: the decode worker refuses the id
    status, headers, body = completion(cluster.url, prompt=[1, 10 ** 6], max_tokens=2)
    assert_openai_error(status, headers, body, 400)
    assert "vocabulary" in body["error"]["message"]


def test_router_keeps_serving_after_errors(cluster):
    for body, _ in BAD_BODIES[:5]:
        post(f"{cluster.url}/v1/completions", body)
    post(f"{cluster.url}/v1/completions", None, raw=b"{")
    status, _, body = completion(cluster.url, prompt="still there?", max_tokens=3)
    assert status == 200 and body["usage"]["completion_tokens"] == 3


# ---- the small endpoints --------------------------------------------------------------------------
def test_models_health_ready(cluster):
    status, _, models = get(f"{cluster.url}/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert get(f"{cluster.url}/health")[0] == 200
    status, _, ready = get(f"{cluster.url}/ready")
    assert status == 200 and ready["ready"] is True


def test_openapi_document(cluster):
    status, _, doc = get(f"{cluster.url}/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"):
        assert path in doc["paths"], path
    req = doc["components"]["schemas"]["CompletionRequest"]
    assert {"prompt", "max_tokens", "temperature", "top_p", "n", "stream", "logprobs", "seed"} <= set(req["properties"])
    assert "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["required"]
    assert "400" in doc["paths"]["/v1/completions"]["post"]["responses"]
    json.dumps(doc)


def test_metrics(cluster):
    completion(cluster.url, prompt="count me", max_tokens=4)
    status, _, text = get(f"{cluster.url}/metrics")
    assert status == 200
    m = dict(model=MODEL_NAME)
    assert metric_value(text, "tandem_router_requests_total", status="200", api="completions", **m) >= 1
    assert metric_value(text, "tandem_router_requests_total", status="400", **m) >= 1
    assert metric_value(text, "tandem_router_time_to_first_token_seconds_count", **m) >= 1
    assert metric_value(text, "tandem_router_e2e_latency_seconds_count", **m) >= 1
    assert metric_value(text, "tandem_router_prompt_tokens_total", **m) > 0
    assert metric_value(text, "tandem_router_generation_tokens_total", **m) > 0
    assert metric_value(text, "tandem_router_routing_decisions_total", pool="decode", **m) >= 1
    assert metric_value(text, "tandem_router_requests_in_flight", **m) == 0
    assert metric_value(text, "tandem_router_queue_depth", **m) == 0
    assert metric_value(text, "tandem_router_replica_healthy", pool="prefill", **m) == 2
