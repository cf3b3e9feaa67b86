"""Failures under load, on a cluster of its own (it kills workers): a prefill replica killed while
clients keep sending fails no request (retry on the other replica, or the decode replica
prefills itself once no prefill replica is left); with the decode replica gone the router
answers 503 with Retry-After and /ready turns 503."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import threading
import time

import pytest

from tandem.engine import SamplingParams
from tests.pd.harness import metric_value
from tests.router.conftest import MODEL_NAME, get, post, sse_events, start_cluster, stop_cluster

PROMPTS = [f"Request number {i} asks about topic {i * 7 % 11}" for i in range(6)]


@pytest.fixture(scope="module")
def failover_cluster(model_factory, tmp_path_factory):
    c = start_cluster(model_factory("llama"), tmp_path_factory.mktemp("failover-logs"))
    yield c
    stop_cluster(c)


def send(url, prompt, stream):
    status, _, body = post(f"{url}/v1/completions", {"model": MODEL_NAME, "prompt": prompt,
                                                     "max_tokens": 12, "temperature": 0, "stream": stream})
    if status != 200:
        return status, body
    if stream:
        events = sse_events(body)
        if events[-1] != "[DONE]" or any("error" in e for e in events[:-1] if isinstance(e, dict)):
            return 500, events
        return 200, "".join(c["text"] for e in events[:-1] for c in e["choices"])
    return 200, body["choices"][0]["text"]


def test_prefill_killed_under_load(failover_cluster, offline):
    c = failover_cluster
    want = {p: offline.generate(p, SamplingParams(max_tokens=12, temperature=0.0))[0].text for p in PROMPTS}
    results, stop = [], threading.Event()

    def client(k):
        i = 0
        while not stop.is_set():
            p = PROMPTS[(k + i) % len(PROMPTS)]
            results.append((p, time.monotonic(), *send(c.url, p, stream=(i % 2 == 0))))
            i += 1

    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(client, k) for k in range(6)]
        time.sleep(2.0)
        killed_at = time.monotonic()
        c.prefills[0].kill()                      # SIGKILL: no drain, connections just drop
        time.sleep(3.0)
        stop.set()
        for f in futs:
            f.result()
    failed = [(p, s, b) for p, _, s, b in results if s != 200]
    assert not failed, f"{len(failed)} failed requests, e.g. {failed[:2]}\n{c.logs()}"
    assert [b for p, _, _, b in results] == [want[p] for p, _, _, _ in results]
    assert sum(1 for _, t, _, _ in results if t > killed_at + 0.5) >= 6    # served after the kill too
    text = get(f"{c.url}/metrics")[2]
    assert metric_value(text, "tandem_router_replica_healthy", pool="prefill", replica=c.prefills[0].endpoint) == 0
    print(f"{len(results)} requests, retries: "
          f"{metric_value(text, 'tandem_router_retries_total', model=MODEL_NAME)}")


def test_no_prefill_left_decode_prefills_itself(failover_cluster, offline):
    c = failover_cluster
    c.prefills[1].kill()
    for p in PROMPTS[:3]:                         # the first may still be routed to the dead replica
        status, text = send(c.url, p, stream=False)
        assert status == 200, text
        assert text == offline.generate(p, SamplingParams(max_tokens=12, temperature=0.0))[0].text


def test_decode_gone_is_503_with_retry_after(failover_cluster):
    c = failover_cluster
    # two requests under way when the decode replica dies, both past their first token: the
    # streamed one has shown output (an error event ends it); the plain one has shown nothing, so
    # the router retries it, and with no decode replica left answers 503
    host, port = c.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    long = {"prompt": "a long one", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    conn.request("POST", "/v1/completions", body=json.dumps({**long, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data:")
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        plain = ex.submit(post, f"{c.url}/v1/completions", long)
        time.sleep(0.5)
        c.decode.kill()
        status, headers, body = plain.result(timeout=60)
    assert status == 503 and body["error"]["code"] == "no_replica", body
    assert int(headers["Retry-After"]) >= 1
    events = sse_events(resp.read().decode())
    assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
    assert events[-2]["error"]["message"]
    conn.close()
    deadline = time.monotonic() + 10
    while get(f"{c.url}/ready")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert get(f"{c.url}/ready")[0] == 503
    status, headers, body = post(f"{c.url}/v1/completions", {"prompt": "anyone?", "max_tokens": 4})
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert body["error"]["type"] and body["error"]["message"]
    assert get(f"{c.url}/health")[0] == 200          # the router itself is alive
