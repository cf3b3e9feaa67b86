"""Replica monitors over real gRPC against scripted fake workers: KV-event streams feeding the
index (snapshot, gap -> resubscribe), the approximate fallback with its TTL and metric, and
health from Info polls."""

from __future__ import annotations

import asyncio
import random

from prometheus_client import REGISTRY

from placement_fakes import FakeWorker, wait_for
from tandem.engine.hashing import chain_hashes
from tandem.router.discovery import StaticDiscovery
from tandem.router.placement import ReplicaPlacement

BS = 16


def prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def gauge(name, **labels):
    return REGISTRY.get_sample_value(name, labels)


async def cluster(n_prefill=2, model="m", **kw):
    pre = [await FakeWorker("prefill").start() for _ in range(n_prefill)]
    dec = await FakeWorker("decode").start()
    pl = ReplicaPlacement(StaticDiscovery([w.endpoint for w in pre], [dec.endpoint]),
                          info_interval=0.05, info_timeout=0.5, model=model, **kw)
    return pre, dec, pl


async def shutdown(pl, *workers):
    await pl.stop()
    for w in workers:
        await w.stop()


def test_exact_stream_snapshot_gap_resubscribe():
    async def main():
        (p1, p2), d, pl = await cluster(model="exact")
        t = prompt(160)
        hs = chain_hashes(t, BS)
        p1.snapshot = hs[:3]                     # held before the router subscribed
        await pl.start()
        await pl.wait_ready(pools=("prefill", "decode"), exact=True)
        assert gauge("tandem_router_prefix_index_exact", model="exact", replica=p1.endpoint) == 1
        assert gauge("tandem_router_replica_healthy", model="exact", pool="prefill", replica=p1.endpoint) == 1
        assert pl.index.match_endpoints(t) == {p1.endpoint: 48}
        d1 = pl.choose(t)
        assert (d1.prefill, d1.reason, d1.matched_tokens) == (p1.endpoint, "prefix-match", 48)
        # p2 learns the whole prompt through its live stream
        p2.store(hs)
        await wait_for(lambda: pl.index.match_endpoints(t).get(p2.endpoint) == 160, what="p2 events")
        assert pl.choose(t).prefill == p2.endpoint
        # a gap in p1's sequence: the monitor resubscribes and the new snapshot resyncs
        p1.store(hs[3:6], skip_seq=1)
        await wait_for(lambda: p1.subscriptions == 2, what="resubscription")
        await wait_for(lambda: pl.index.match_endpoints(t).get(p1.endpoint) == 96, what="snapshot")
        assert pl.index.is_exact(p1.endpoint)
        await shutdown(pl, p1, p2, d)
    asyncio.run(main())


def test_approximate_fallback_with_ttl():
    async def main():
        (p1, p2), d, pl = await cluster(model="approx", approx_ttl=60)
        p1.events_ok = p2.events_ok = d.events_ok = False
        now = [1000.0]
        pl.index.clock = lambda: now[0]
        await pl.start()
        await pl.wait_ready(pools=("prefill", "decode"))
        for w in (p1, p2):
            assert gauge("tandem_router_prefix_index_exact", model="approx", replica=w.endpoint) == 0
            assert not pl.index.is_exact(w.endpoint)
        t = prompt(200)
        first = pl.choose(t)
        assert first.reason == "tie" and first.matched_tokens == 0
        pl.on_request_start(first, t)            # history: first.prefill now "caches" 12 blocks
        pl.on_first_token(first)
        pl.on_request_end(first, ok=True)
        again = pl.choose(t[:180] + prompt(50, 1))
        assert (again.prefill, again.reason, again.matched_tokens) == (first.prefill, "prefix-match", 176)
        assert again.decode == first.decode and again.decode_matched_tokens == 176
        now[0] += 61                             # past the TTL: forgotten
        later = pl.choose(t)
        assert later.matched_tokens == 0 and later.reason == "tie"
        # the stream comes back: exact again, and history no longer counts
        p1.events_ok = True
        await wait_for(lambda: pl.index.is_exact(p1.endpoint), what="p1 exact", timeout=15)
        assert gauge("tandem_router_prefix_index_exact", model="approx", replica=p1.endpoint) == 1
        x = pl.choose(t, exclude={p2.endpoint})
        pl.on_request_start(x, t)
        assert pl.index.match_endpoints(t).get(p1.endpoint) is None
        await shutdown(pl, p1, p2, d)
    asyncio.run(main())


def test_stream_loss_decays_to_approximate():
    async def main():
        (p1,), d, pl = await cluster(n_prefill=1, model="decay", approx_ttl=60)
        t = prompt(64)
        p1.snapshot = chain_hashes(t, BS)
        await pl.start()
        await pl.wait_ready(pools=("prefill",), exact=True)
        now = [pl.index.clock()]
        pl.index.clock = lambda: now[0]
        p1.events_ok = False
        p1.end_streams()                          # stream ends; resubscribing fails
        await wait_for(lambda: not pl.index.is_exact(p1.endpoint), what="approximate")
        assert gauge("tandem_router_prefix_index_exact", model="decay", replica=p1.endpoint) == 0
        assert pl.choose(t).matched_tokens == 64  # last exact view kept ...
        now[0] += 61
        assert pl.choose(t).matched_tokens == 0   # ... for one TTL
        await shutdown(pl, p1, d)
    asyncio.run(main())


def test_health_from_info_polls():
    async def main():
        (p1, p2), d, pl = await cluster(model="health")
        await pl.start()
        await pl.wait_ready(pools=("prefill", "decode"))
        p1.info.ready = False                     # draining
        await wait_for(lambda: not pl.monitors["prefill"][p1.endpoint].replica.healthy, what="p1 unhealthy")
        assert gauge("tandem_router_replica_healthy", model="health", pool="prefill", replica=p1.endpoint) == 0
        assert all(pl.choose(prompt(40, i)).prefill == p2.endpoint for i in range(5))
        p1.info.ready = True
        await wait_for(lambda: pl.monitors["prefill"][p1.endpoint].replica.healthy, what="p1 back")
        p2.info.queued_prompt_tokens, p2.info.running = 777, 3
        await wait_for(lambda: pl.monitors["prefill"][p2.endpoint].replica.running == 3, what="load poll")
        assert pl.monitors["prefill"][p2.endpoint].replica.queued_prompt_tokens == 777
        await p2.stop()                           # gone: Info fails
        await wait_for(lambda: not pl.monitors["prefill"][p2.endpoint].replica.healthy, what="p2 down")
        assert pl.choose(prompt(40)).prefill == p1.endpoint
        await d.stop()
        await wait_for(lambda: not pl.replicas("decode")[0].healthy, what="decode down")
        try:
            pl.choose(prompt(40))
            raise AssertionError("expected NoReplicaError")
        except Exception as e:
            assert type(e).__name__ == "NoReplicaError"
        await shutdown(pl, p1)
    asyncio.run(main())


def test_block_size_learned_from_workers():
    async def main():
        p1 = await FakeWorker("prefill", block_size=32).start()
        d = await FakeWorker("decode", block_size=32).start()
        t = prompt(128)
        p1.snapshot = chain_hashes(t, 32)
        pl = ReplicaPlacement(StaticDiscovery([p1.endpoint], [d.endpoint]), info_interval=0.05, model="bs")
        await pl.start()
        await wait_for(lambda: pl.block_size == 32, what="block size")
        await wait_for(lambda: pl.choose(t).matched_tokens == 128, what="32-token matches")
        await shutdown(pl, p1, d)
    asyncio.run(main())


def test_one_stream_per_replica():
    """start() must start each monitor once: two live subscriptions to one worker feed the same
    index slot, every batch then looks like a repeat of the last seq, and the index keeps
    resubscribing (found on the first GPU run)."""
    async def main():
        (p1, p2), d, pl = await cluster(model="once")
        await pl.start()
        await pl.wait_ready(pools=("prefill", "decode"), exact=True)
        hs = chain_hashes(prompt(64), BS)
        for i in range(1, len(hs) + 1):
            p1.store(hs[i - 1:i])
            await asyncio.sleep(0.02)
        await wait_for(lambda: pl.index.match_endpoints(prompt(64)).get(p1.endpoint) == 64, what="events")
        assert (p1.subscriptions, p2.subscriptions, d.subscriptions) == (1, 1, 1)
        await shutdown(pl, p1, p2, d)
    asyncio.run(main())
