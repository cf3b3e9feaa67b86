"""Placement policies: pure functions from candidate replicas (+ their cached prefix lengths) to a
choice, a reason and per-replica scores. No I/O and no state beyond a round-robin counter, so
they are unit-tested without workers; `tandem.router.placement` gathers the inputs.

cache-aware (default), prefill pool. Every term is in prompt tokens (prefill time is roughly
linear in them):

    score(r) = w_prefix * saved(r) - w_load * load(r)
    saved(r) = tokens of this prompt replica r already caches (leading full blocks)
    load(r)  = queued_prompt_tokens(r) + request_cost * (in_flight(r) + running(r))

``queued_prompt_tokens`` is the larger of the worker's own figure (Info poll, up to one interval
old) and what this router sent there and has not seen prefilled yet (fresh, but blind to other
routers). The highest score wins; equal scores go to the lower load, then round-robin. With
w_prefix = w_load = 1 the router sends a request to a cache holder unless the holder's backlog
exceeds the tokens it would save: the same trade sgl-router's imbalance threshold and Dynamo's
cost function make, in one formula.

cache-aware, decode pool (decode emits KV events too; a decode replica holding the prefix takes
fewer blocks over the wire and from its pool):

    score(d) = w_decode_prefix * saved(d) - w_decode_load * request_cost * (running + waiting + in_flight)
               - w_kv * kv_scale * used_fraction(d)

and a replica whose free blocks cannot hold the prompt is chosen only if every one is that full.

least-load: prefill by load(r) alone, decode by the load terms alone. round-robin: in turn.

Reasons (the ``reason`` label of tandem_router_routing_decisions): prefix-match (the winner holds
the longest cached prefix), load-balance (load decided: someone else held more, or nobody held
anything and loads differed), tie (top scores and loads equal: rotation decided), single-replica,
round-robin, least-load, no-prefill-replica (Decision.prefill None: decode prefills itself),
prefill-queue-full (conditional disaggregation, ReplicaPlacement: the prefill replica was backed
up, so the decode replica prefills this one).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields

from tandem.router.types import Replica

POLICIES = ("cache-aware", "least-load", "round-robin")


@dataclass
class ScoreWeights:
    w_prefix: float = 1.0           # per cached prompt token on the prefill replica
    w_load: float = 1.0             # per queued prompt token on the prefill replica
    request_cost: float = 256.0     # tokens one in-flight/running request counts as
    w_decode_prefix: float = 1.0    # per prompt token the decode replica already caches
    w_decode_load: float = 1.0      # per decode request (times request_cost)
    w_kv: float = 1.0               # decode KV-pool pressure (times kv_scale * used fraction)
    kv_scale: float = 4096.0

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(slots=True)
class Candidate:
    """One replica as a policy sees it."""
    replica: Replica
    cached_tokens: int = 0          # leading prompt tokens it caches (prefix index)
    pending_tokens: int = 0         # prompt tokens this router sent there, not yet prefilled
    endpoint: str = ""

    def __post_init__(self):
        self.endpoint = self.replica.endpoint


@dataclass
class Choice:
    endpoint: str | None
    reason: str
    cached_tokens: int = 0
    scores: dict[str, float] = field(default_factory=dict)


def prefill_load(c: Candidate, w: ScoreWeights) -> float:
    r = c.replica
    q = r.queued_prompt_tokens if r.queued_prompt_tokens > c.pending_tokens else c.pending_tokens
    return q + w.request_cost * (r.in_flight + r.running)


def decode_load(c: Candidate, w: ScoreWeights) -> float:
    r = c.replica
    return w.request_cost * (r.running + r.waiting + r.in_flight)


def _kv_used(r: Replica) -> float:
    return 1.0 - r.free_blocks / r.total_blocks if r.total_blocks else 0.0


class Policy:
    """A policy: ``choose_prefill`` / ``choose_decode`` over non-empty candidate lists (the
    caller handles empty pools). Subclasses override ``_score`` (None: round-robin)."""

    name = "?"
    rotate = False

    def __init__(self, weights: ScoreWeights | None = None):
        self.w = weights or ScoreWeights()
        self._turn = {"prefill": itertools.count(), "decode": itertools.count()}

    def choose_prefill(self, cands: list[Candidate], prompt_len: int) -> Choice:
        return self._pick("prefill", cands, prefill_load)

    def choose_decode(self, cands: list[Candidate], prompt_len: int, block_size: int) -> Choice:
        # a replica that cannot fit the prompt in its free blocks is a last resort
        bs = max(block_size, 1)
        need = -(-prompt_len // bs)
        fits = [c for c in cands if not c.replica.total_blocks
                or c.replica.free_blocks + c.cached_tokens // bs >= need]
        return self._pick("decode", fits or cands, decode_load)

    def _score(self, pool: str, c: Candidate, load: float) -> float:
        return -load

    def _pick(self, pool: str, cands: list[Candidate], load_fn) -> Choice:
        if self.rotate:
            c = cands[next(self._turn[pool]) % len(cands)]
            return Choice(c.endpoint, "single-replica" if len(cands) == 1 else "round-robin", c.cached_tokens)
        w = self.w
        loads = [load_fn(c, w) for c in cands]
        scores = {c.endpoint: self._score(pool, c, l) for c, l in zip(cands, loads)}
        if len(cands) == 1:
            c = cands[0]
            return Choice(c.endpoint, "single-replica", c.cached_tokens, scores)
        best = max(scores.values())
        top = [i for i, c in enumerate(cands) if scores[c.endpoint] >= best - 1e-9]
        if len(top) > 1:
            low = min(loads[i] for i in top)
            top = [i for i in top if loads[i] <= low + 1e-9]
        if len(top) > 1:
            win, reason = cands[top[next(self._turn[pool]) % len(top)]], "tie"
        else:
            win = cands[top[0]]
            reason = self._reason(win, cands)
        return Choice(win.endpoint, reason, win.cached_tokens, scores)

    def _reason(self, win: Candidate, cands: list[Candidate]) -> str:
        return self.name


class RoundRobin(Policy):
    name = "round-robin"
    rotate = True


class LeastLoad(Policy):
    name = "least-load"


class CacheAware(Policy):
    name = "cache-aware"

    def _score(self, pool, c, load):
        w = self.w
        if pool == "prefill":
            return w.w_prefix * c.cached_tokens - w.w_load * load
        return (w.w_decode_prefix * c.cached_tokens - w.w_decode_load * load
                - w.w_kv * w.kv_scale * _kv_used(c.replica))

    def _reason(self, win, cands):
        most = max(c.cached_tokens for c in cands)
        return "prefix-match" if most and win.cached_tokens == most else "load-balance"


def make_policy(name: str, weights: ScoreWeights | None = None) -> Policy:
    try:
        cls = {"cache-aware": CacheAware, "least-load": LeastLoad, "round-robin": RoundRobin}[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(weights)
