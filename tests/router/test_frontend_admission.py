"""Admission control and the fallback placement: unit tests of `Admission` and `SimplePlacement`,
and a router process with tiny limits (in front of the shared cluster's workers) answering 429 /
503 with Retry-After when overloaded, then serving again."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import grpc
import pytest

from tandem.router.errors import Overloaded, Unavailable
from tandem.router.frontend import Admission, Frontend
from tandem.router.simple_placement import SimplePlacement
from tandem.router.types import Decision, NoReplicaError
from tests.router.conftest import RouterProc, post


def test_admission_queue_bounds():
    async def main():
        a = Admission(limit=1, max_queue=1, model="unit")
        await a.acquire(1.0)                          # runs
        waiter = asyncio.create_task(a.acquire(5.0))  # queued
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as e:           # queue full
            await a.acquire(1.0)
        assert e.value.status == 429 and e.value.headers()["Retry-After"] == "1"
        a.release()                                    # the slot passes to the waiter
        await asyncio.wait_for(waiter, 1.0)
        assert a.active == 1 and not a.waiters
        with pytest.raises(Unavailable) as e:          # waits, times out
            await a.acquire(0.05)
        assert e.value.status == 503 and e.value.code == "queue_timeout"
        assert not a.waiters
        a.release()
        assert a.active == 0
    asyncio.run(main())


def test_admission_cancelled_waiter_passes_its_slot_on():
    async def main():
        a = Admission(limit=1, max_queue=4, model="unit")
        await a.acquire(1.0)
        w1 = asyncio.create_task(a.acquire(5.0))
        w2 = asyncio.create_task(a.acquire(5.0))
        await asyncio.sleep(0.01)
        w1.cancel()
        await asyncio.gather(w1, return_exceptions=True)
        a.release()
        await asyncio.wait_for(w2, 1.0)
        assert a.active == 1
    asyncio.run(main())


def _placement(policy):
    p = SimplePlacement(["p1:1", "p2:1"], ["d1:1", "d2:1"], policy=policy)
    for pool in ("prefill", "decode"):
        for r in p.replicas(pool):
            r.healthy = True
    return p


def test_simple_placement_round_robin_and_exclude():
    p = _placement("round-robin")
    picks = [p.choose([1, 2, 3]) for _ in range(4)]
    assert {d.decode for d in picks} == {"d1:1", "d2:1"} and {d.prefill for d in picks} == {"p1:1", "p2:1"}
    d = p.choose([1], exclude={"p1:1", "d1:1"})
    assert (d.prefill, d.decode) == ("p2:1", "d2:1")
    d = p.choose([1], exclude={"p1:1", "p2:1"})
    assert d.prefill is None and d.reason == "no-prefill-replica"
    with pytest.raises(NoReplicaError):
        p.choose([1], exclude={"d1:1", "d2:1"})


def test_simple_placement_least_load():
    p = _placement("least-load")
    first = p.choose([1])
    p.on_request_start(first, [1])
    second = p.choose([1])
    assert second.decode != first.decode and second.prefill != first.prefill
    p.on_first_token(first)
    p.on_request_end(first, ok=True)
    assert all(r.in_flight == 0 for pool in ("prefill", "decode") for r in p.replicas(pool))
    assert SimplePlacement([], ["d:1"], policy="cache-aware").policy == "least-load"


class _Err(grpc.aio.AioRpcError):
    def __init__(self, details):
        super().__init__(grpc.StatusCode.UNAVAILABLE, None, None, details)


def test_retry_blames_the_right_replica():
    d = Decision(prefill="10.0.0.1:50061", decode="10.0.0.2:50061", policy="round-robin", reason="x")
    assert Frontend._culprit(d, _Err("prefill 10.0.0.1:50061 unreachable: ...")) == d.prefill
    assert Frontend._culprit(d, _Err("KV transfer failed: timeout; the request can be retried")) == d.prefill
    assert Frontend._culprit(d, _Err("failed to connect to all addresses")) == d.decode
    d.prefill = None
    assert Frontend._culprit(d, _Err("KV transfer failed")) == d.decode


def test_overloaded_router_answers_429_then_503_and_recovers(cluster, tmp_path):
    r = RouterProc(cluster.model, [p.endpoint for p in cluster.prefills], [cluster.decode.endpoint],
                   "--max-in-flight", "1", "--max-queue", "1", "--queue-timeout", "1",
                   log_dir=tmp_path).wait_ready()
    try:
        host, port = r.url.removeprefix("http://").split(":")
        long = http.client.HTTPConnection(host, int(port), timeout=60)
        long.request("POST", "/v1/completions", body=json.dumps({
            "prompt": "hold the slot", "max_tokens": 3000, "ignore_eos": True, "stream": True}),
            headers={"Content-Type": "application/json"})
        resp = long.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data:")
        results = {}

        def queued():
            results["queued"] = post(f"{r.url}/v1/completions", {"prompt": "x", "max_tokens": 2})

        t = threading.Thread(target=queued)
        t.start()
        time.sleep(0.3)                                   # it waits in the queue now
        status, headers, body = post(f"{r.url}/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 429 and headers["Retry-After"] == "1", body
        assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"
        t.join(10)
        status, headers, body = results["queued"]
        assert status == 503 and headers["Retry-After"] == "1" and body["error"]["code"] == "queue_timeout"
        long.sock.close()
        long.close()
        t0 = time.monotonic()
        deadline = t0 + 10
        while time.monotonic() < deadline:
            status, _, body = post(f"{r.url}/v1/completions", {"prompt": "x", "max_tokens": 2})
            if status == 200:
                break
            time.sleep(0.2)
        print(f"served again after {time.monotonic() - t0:.2f}s")
        assert status == 200, body
    finally:
        r.stop()


def test_retry_after_invisible_output_withdraws_it():
    """A decode replica that dies after sending tokens the client has not seen: the router retries
    elsewhere and withdraws the partial output with a reset delta; once output is visible it
    does not retry."""
    import asyncio

    import grpc

    from tandem.engine.sampling import SamplingParams
    from tandem.router.frontend import Frontend, FrontendConfig, GenRequest
    from tandem.router.types import Decision

    class Boom(grpc.aio.AioRpcError):
        def __init__(self):
            super().__init__(grpc.StatusCode.UNAVAILABLE, None, None, "socket closed")

    class Call:
        def __init__(self, tokens, fail):
            self.tokens, self.fail = tokens, fail

        def __aiter__(self):
            return self._gen()

        async def _gen(self):
            from tandem.proto import worker_pb2 as pb
            for i, t in enumerate(self.tokens):
                last = i == len(self.tokens) - 1 and not self.fail
                yield pb.GenerateResponse(token_ids=[t], text=f"<{t}>", finish_reason="length" if last else "",
                                          completion_tokens=i + 1)
            if self.fail:
                raise Boom()

        def done(self):
            return True

    class Stub:
        def __init__(self, endpoint):
            self.endpoint = endpoint

        def Generate(self, req, timeout=None):
            return Call([1, 2] if self.endpoint == "bad" else [7, 8, 9], self.endpoint == "bad")

    class Placement:
        policy, block_size = "round-robin", 16

        def choose(self, ids, exclude=frozenset()):
            return Decision(None, "good" if "bad" in exclude else "bad", self.policy, "test")

        def on_request_start(self, *a): pass
        def on_first_token(self, *a): pass
        def on_request_end(self, *a): pass

    fe = Frontend(FrontendConfig(model="m", model_dir="", retry_backoff=0.0), Placement())
    fe.stub = Stub

    async def run(visible_after_first: bool):
        req = GenRequest("r", [1, 2, 3], SamplingParams(max_tokens=3))
        out = []
        async for d in fe.generate(req):
            out.append(d)
            if visible_after_first and d.token_ids:
                req.visible = True
        return out

    deltas = asyncio.run(run(False))
    assert [d.reset for d in deltas].count(True) == 1
    after = deltas[[d.reset for d in deltas].index(True) + 1:]
    assert [t for d in after for t in d.token_ids] == [7, 8, 9] and after[-1].finish_reason == "length"
    from tandem.router.errors import UpstreamError
    with pytest.raises(UpstreamError, match="after its first output"):
        asyncio.run(run(True))
