"""Placement against REAL worker processes (tests/pd/harness.py): two prefill replicas and one
decode replica on a tiny generated model, KV over tcp. A prompt sent through decode with
prefill_endpoint=P1 lands in P1's prefix cache; P1's real KVEvents stream tells the router's
index, and cache-aware placement sends a prompt sharing that prefix to P1."""

from __future__ import annotations

import asyncio
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pd"))

from harness import Proc, generate  # noqa: E402

from placement_fakes import wait_for  # noqa: E402
from tandem.engine.sampling import SamplingParams  # noqa: E402
from tandem.router.discovery import StaticDiscovery  # noqa: E402
from tandem.router.placement import ReplicaPlacement  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workers(model_factory, tmp_path_factory):
    model = model_factory("llama")
    logs = str(tmp_path_factory.mktemp("router-workers"))
    procs = [Proc("prefill", model, "--kv-transfer", "tcp", log_dir=logs),
             Proc("prefill", model, "--kv-transfer", "tcp", log_dir=logs),
             Proc("decode", model, "--kv-transfer", "tcp", "--remote-prefill-threshold", "1", log_dir=logs)]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


def test_real_kv_events_make_cache_aware_choose_the_holder(workers):
    p1, p2, d = workers
    rng = random.Random(4)
    prefix = [rng.randrange(3, 1000) for _ in range(96)]        # 6 blocks of 16
    first = prefix + [rng.randrange(3, 1000) for _ in range(20)]
    second = prefix + [rng.randrange(3, 1000) for _ in range(40)]

    async def main():
        pl = ReplicaPlacement(StaticDiscovery([p1.endpoint, p2.endpoint], [d.endpoint]),
                              info_interval=0.2, model="workers")
        await pl.start()
        try:
            await pl.wait_ready(pools=("prefill", "decode"), exact=True, timeout=60)
            assert pl.block_size == 16                            # learned from Info
            assert pl.index.match_endpoints(second) == {}
            before = pl.choose(second)
            assert before.matched_tokens == 0 and before.reason == "tie"

            toks, last, firstmsg = await asyncio.to_thread(
                generate, d.endpoint, first, SamplingParams(max_tokens=2, temperature=0.0),
                prefill_endpoint=p1.endpoint)
            assert firstmsg.prefill_mode == "remote" and len(toks) == 2

            # P1 computed 116 tokens = 7 full blocks; its KV events reach the index
            await wait_for(lambda: pl.index.match_endpoints(first).get(p1.endpoint) == 112,
                           timeout=20, what="P1's KV events in the index")
            matches = pl.index.match_endpoints(second)
            assert matches.get(p1.endpoint) == 96 and p2.endpoint not in matches
            assert pl.index.is_exact(p1.endpoint)

            dec = pl.choose(second)
            assert (dec.prefill, dec.reason, dec.matched_tokens) == (p1.endpoint, "prefix-match", 96)
            assert dec.decode == d.endpoint
            # decode's own events: it holds the blocks it received (once the request finished)
            await wait_for(lambda: pl.choose(second).decode_matched_tokens == 96, timeout=20,
                           what="decode's KV events")
            # and the real request goes where placement said, reusing P1's cache
            pl.on_request_start(dec, second)
            toks2, last2, _ = await asyncio.to_thread(
                generate, d.endpoint, second, SamplingParams(max_tokens=2, temperature=0.0),
                prefill_endpoint=dec.prefill)
            pl.on_first_token(dec)
            pl.on_request_end(dec, ok=True)
            assert last2.cached_tokens >= 96
        finally:
            await pl.stop()
    asyncio.run(main())
