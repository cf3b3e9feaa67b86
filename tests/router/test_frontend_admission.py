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
