"""Policies through `ReplicaPlacement.choose`, without workers: replicas are registered through a
static discovery, their health/load fields set by hand and their caches fed through the index."""

from __future__ import annotations

import random

import pytest
from prometheus_client import REGISTRY

from tandem.engine.hashing import chain_hashes
from tandem.engine.kv_events import BlockStored
from tandem.router.placement import ReplicaPlacement
from tandem.router.policies import ScoreWeights
from tandem.router.types import NoReplicaError

BS = 16


def prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def make(policy="cache-aware", prefill=("p1:1", "p2:1", "p3:1"), decode=("d1:1", "d2:1"), **w):
    pl = ReplicaPlacement(policy=policy, weights=ScoreWeights(**w), block_size=BS, model="t-" + policy)
    pl.set_endpoints("prefill", prefill)
    pl.set_endpoints("decode", decode)
    for pool in ("prefill", "decode"):
        for r in pl.replicas(pool):
            r.healthy = True
            r.total_blocks = r.free_blocks = 1000
    return pl


def cache(pl, endpoint, tokens, blocks=None):
    hs = chain_hashes(tokens, BS)[:blocks]
    assert pl.index.apply_batch(endpoint, 0, [BlockStored(hs, None, [], BS)], snapshot=True)


def rep(pl, endpoint):
    return next(r for p in ("prefill", "decode") for r in pl.replicas(p) if r.endpoint == endpoint)


def decisions(model, pool, policy, reason):
    return REGISTRY.get_sample_value("tandem_router_routing_decisions_total",
                                     {"model": model, "pool": pool, "policy": policy, "reason": reason}) or 0


def test_cache_aware_picks_longest_prefix():
    pl = make()
    t = prompt(512)
    cache(pl, "p1:1", t, 8)
    cache(pl, "p2:1", t, 20)
    cache(pl, "d2:1", t, 32)
    before = decisions("t-cache-aware", "prefill", "cache-aware", "prefix-match")
    d = pl.choose(t)
    assert (d.prefill, d.reason, d.matched_tokens) == ("p2:1", "prefix-match", 320)
    assert (d.decode, d.decode_matched_tokens) == ("d2:1", 512)
    assert d.policy == "cache-aware" and set(d.scores["prefill"]) == {"p1:1", "p2:1", "p3:1"}
    assert decisions("t-cache-aware", "prefill", "cache-aware", "prefix-match") == before + 1


def test_cache_aware_yields_to_load_imbalance():
    pl = make()
    t = prompt(512)
    cache(pl, "p1:1", t, 10)                           # saves 160 tokens
    rep(pl, "p1:1").queued_prompt_tokens = 5000        # ... behind a 5000-token backlog
    rep(pl, "p2:1").queued_prompt_tokens = 100
    d = pl.choose(t)
    assert (d.prefill, d.reason, d.matched_tokens) == ("p3:1", "load-balance", 0)
    # a small backlog does not outweigh the saving
    rep(pl, "p1:1").queued_prompt_tokens = 100
    assert pl.choose(t).prefill == "p1:1"
    # the router's own accounting counts too: requests it sent there and has not finished
    rep(pl, "p1:1").queued_prompt_tokens = 0
    starts = []
    for _ in range(3):                                 # p1 saves 160 tokens, then costs 256 + 352
        starts.append(pl.choose(t))
        pl.on_request_start(starts[-1], t)
    assert rep(pl, "p1:1").in_flight == 1 and rep(pl, "p2:1").in_flight + rep(pl, "p3:1").in_flight == 2
    for s in starts:
        pl.on_first_token(s)
        pl.on_request_end(s, ok=True)
    assert all(r.in_flight == 0 for p in ("prefill", "decode") for r in pl.replicas(p))
    assert all(pl.monitors["prefill"][e].pending_tokens == 0 for e in pl.monitors["prefill"])


def test_cache_aware_weights_change_the_trade():
    t = prompt(512)
    for w_prefix, want in ((1.0, "p1:1"), (0.1, "p2:1")):
        pl = make(prefill=("p1:1", "p2:1"), w_prefix=w_prefix)
        cache(pl, "p1:1", t, 20)                        # 320 tokens saved
        rep(pl, "p1:1").running = 1                     # 256 tokens of load
        assert pl.choose(t).prefill == want


def test_ties_are_broken_by_load_then_rotation():
    pl = make(prefill=("p1:1", "p2:1"))
    t = prompt(100)
    got = {pl.choose(t).prefill for _ in range(4)}
    assert got == {"p1:1", "p2:1"}
    assert pl.choose(t).reason == "tie"
    # same prefix on both, p2 less loaded: load breaks the score tie
    cache(pl, "p1:1", t)
    cache(pl, "p2:1", t)
    rep(pl, "p1:1").queued_prompt_tokens = 50
    d = pl.choose(t)
    assert (d.prefill, d.reason) == ("p2:1", "prefix-match")


def test_least_load_and_round_robin():
    pl = make("least-load")
    t = prompt(200)
    cache(pl, "p1:1", t)
    rep(pl, "p1:1").queued_prompt_tokens = 300
    rep(pl, "p2:1").running = 2
    rep(pl, "d1:1").running = 3
    d = pl.choose(t)
    assert (d.prefill, d.decode, d.reason) == ("p3:1", "d2:1", "least-load")
    pl = make("round-robin")
    picks = [pl.choose(t) for _ in range(6)]
    assert [p.prefill for p in picks] == ["p1:1", "p2:1", "p3:1"] * 2
    assert [p.decode for p in picks] == ["d1:1", "d2:1"] * 3
    assert picks[0].reason == "round-robin"


@pytest.mark.parametrize("policy", ["cache-aware", "least-load", "round-robin"])
def test_exclude_skips_endpoints(policy):
    pl = make(policy)
    t = prompt(64)
    cache(pl, "p1:1", t)
    for _ in range(5):
        d = pl.choose(t, exclude={"p1:1", "d1:1"})
        assert d.prefill in {"p2:1", "p3:1"} and d.decode == "d2:1"
    d = pl.choose(t, exclude={"p1:1", "p2:1", "p3:1"})
    assert (d.prefill, d.reason) == (None, "no-prefill-replica")
    with pytest.raises(NoReplicaError):
        pl.choose(t, exclude={"d1:1", "d2:1"})


def test_no_healthy_prefill_means_decode_prefills():
    pl = make()
    for r in pl.replicas("prefill"):
        r.healthy = False
    d = pl.choose(prompt(64))
    assert d.prefill is None and d.reason == "no-prefill-replica" and d.decode in {"d1:1", "d2:1"}
    pl.on_request_start(d, prompt(64))
    pl.on_request_end(d, ok=False)                      # no first token: accounting still closes
    assert all(r.in_flight == 0 for r in pl.replicas("decode"))
    pl = make(prefill=())
    assert pl.choose(prompt(64)).prefill is None
    for r in pl.replicas("decode"):
        r.healthy = False
    with pytest.raises(NoReplicaError):
        pl.choose(prompt(64))


def test_decode_prefers_free_kv_and_prefix_holder():
    pl = make(prefill=("p1:1",))
    t = prompt(256)
    rep(pl, "d1:1").free_blocks = 100                  # 90% used
    assert pl.choose(t).decode == "d2:1"
    rep(pl, "d1:1").free_blocks = 1000
    cache(pl, "d1:1", t)
    d = pl.choose(t)
    assert (d.decode, d.decode_matched_tokens) == ("d1:1", 256)
    # a replica that cannot fit the prompt is avoided even if it holds part of it
    t2 = t[:64] + prompt(2000, 5)
    rep(pl, "d1:1").free_blocks = 10
    assert pl.choose(t2).decode == "d2:1"


def test_endpoints_join_and_leave():
    pl = make()
    pl.set_endpoints("prefill", ["p1:1", "p4:1"])
    assert {r.endpoint for r in pl.replicas("prefill")} == {"p1:1", "p4:1"}
    assert "p2:1" not in pl.index.slot_of and "p4:1" in pl.index.slot_of
    assert not rep(pl, "p4:1").healthy                 # new replicas wait for their first Info
    assert pl.choose(prompt(64)).prefill == "p1:1"


@pytest.mark.parametrize("policy", ["cache-aware", "round-robin", "least-load"])
def test_conditional_disaggregation_overflows_to_decode(policy):
    """With --max-prefill-queue-tokens, a backed-up prefill pool sends prompts to be prefilled on
    the decode replica, but only as much as that replica's own short queue allows; when the
    prefill queue drains, prompts go back to the prefill pool."""
    pl = make(policy, prefill=("p1:1",), decode=("d1:1",))
    pl.max_prefill_queue_tokens, pl.max_local_prefill_tokens = 5000, 4096
    t = prompt(3000, seed=5)
    first = [pl.choose(prompt(3000, seed=i)) for i in range(2)]
    for i, d in enumerate(first):               # 6000 tokens now queued on p1
        assert d.prefill == "p1:1"
        pl.on_request_start(d, prompt(3000, seed=i))
    local = pl.choose(t)
    assert (local.prefill, local.reason, local.decode) == (None, "prefill-queue-full", "d1:1")
    pl.on_request_start(local, t)
    # d1 holds 3000 queued prompt tokens of its own: another 3000 would pass 4096
    assert pl.choose(prompt(3000, seed=9)).prefill == "p1:1"
    pl.on_first_token(local)                    # the local prefill finished: room again
    assert pl.choose(prompt(3000, seed=9)).prefill is None
    for d in first:                             # the prefill pool drained
        pl.on_first_token(d)
    assert pl.choose(prompt(3000, seed=9)).prefill == "p1:1"
    assert REGISTRY.get_sample_value("tandem_router_routing_decisions_total", {
        "model": "t-" + policy, "pool": "prefill", "policy": policy, "reason": "prefill-queue-full"}) == 2


def test_conditional_disaggregation_off_by_default():
    pl = make(prefill=("p1:1",), decode=("d1:1",))
    for i in range(20):
        d = pl.choose(prompt(3000, seed=i))
        assert d.prefill == "p1:1"
        pl.on_request_start(d, prompt(3000, seed=i))
