"""`ReplicaPlacement`: the router's `Placement` (tandem.router.types) built from discovery, replica
monitors, the prefix index and a policy.

Data flow:
  * a `Discovery` (static / DNS / Kubernetes) publishes the endpoint set of each pool; for every
    endpoint that appears, placement creates a `ReplicaMonitor` (Info poll + KV-event stream)
    and an index slot; for every one that leaves, it stops both. No restart needed.
  * `choose(token_ids, exclude)`: candidates = healthy replicas not in ``exclude``; one index walk
    over the prompt's chained hashes (restricted to the candidates) gives each one's cached
    prefix; the policy picks a prefill replica (none healthy: ``prefill=None``, the decode
    replica prefills itself) and a decode replica (none: `NoReplicaError`). With
    ``max_prefill_queue_tokens`` a backed-up prefill replica's request may go to the decode
    replica instead (`_overflow`, conditional disaggregation).
  * `on_request_start` / `on_first_token` / `on_request_end`: the router's own load accounting
    (in-flight requests, prompt tokens sent and not yet prefilled), fresher than the Info polls;
    and, for replicas whose event stream is down, routing history for the approximate index.

Metrics: tandem_router_routing_decisions (per pool, with the pool's own reason) and
tandem_router_decision_duration_seconds, both in `choose` (``records_decision_metrics = True``
tells the front end not to count them again); tandem_router_replica_healthy and
tandem_router_prefix_index_exact per replica. tandem_router_prefix_matched_tokens is the front
end's (it counts ``Decision.matched_tokens`` once, for the attempt that served the request).

Everything runs on the router's asyncio loop; `choose` is synchronous and does no I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from tandem.metrics import (ROUTER_DECISION_SECONDS, ROUTER_DECISIONS, ROUTER_INDEX_MODE,
                            ROUTER_REPLICA_HEALTHY)
from tandem.router.discovery import Discovery, StaticDiscovery
from tandem.router.index import PrefixIndex
from tandem.router.policies import Candidate, ScoreWeights, make_policy
from tandem.router.replicas import ReplicaMonitor
from tandem.router.types import Decision, NoReplicaError, Replica

log = logging.getLogger("tandem.router.placement")

POOLS = ("prefill", "decode")


@dataclass
class _Flight:
    """What one started request added to the load accounting, so its end can take it back."""
    prefill: str | None
    decode: str
    pending_tokens: int
    prefill_open: bool = True


class ReplicaPlacement:
    records_decision_metrics = True

    def __init__(self, discovery: Discovery | None = None, policy: str = "cache-aware",
                 weights: ScoreWeights | None = None, info_interval: float = 0.5,
                 approx_ttl: float = 120.0, block_size: int = 0, model: str = "tandem",
                 info_timeout: float = 2.0, max_prefill_queue_tokens: int = 0,
                 max_local_prefill_tokens: int = 8192):
        self.discovery = discovery or StaticDiscovery()
        self.policy = policy
        self.weights = weights or ScoreWeights()
        self._policy = make_policy(policy, self.weights)
        self.auto_block_size = block_size <= 0
        self.block_size = block_size if block_size > 0 else 16     # engine default until told
        self.index = PrefixIndex(self.block_size, ttl=approx_ttl)
        self.index.on_mode_change = self._index_mode
        self.info_interval = info_interval
        self.info_timeout = info_timeout
        self.model = model
        # Conditional disaggregation: when the chosen prefill replica already has more than this
        # many prompt tokens queued (0: never), a decode replica with fewer than
        # max_local_prefill_tokens of its own prompts queued prefills the request itself.
        self.max_prefill_queue_tokens = max_prefill_queue_tokens
        self.max_local_prefill_tokens = max_local_prefill_tokens
        self.monitors: dict[str, dict[str, ReplicaMonitor]] = {p: {} for p in POOLS}
        self._flights: dict[int, _Flight] = {}
        self._started = False
        self._decision_hist = ROUTER_DECISION_SECONDS.labels(model)
        self._decision_ctr: dict[tuple[str, str], object] = {}
        self._warned_bs: set[str] = set()

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        self.discovery.subscribe(self.set_endpoints)
        for pool in POOLS:
            self.set_endpoints(pool, self.discovery.current(pool))
        await self.discovery.start()
        for pool in POOLS:
            for m in list(self.monitors[pool].values()):
                await m.start()           # idempotent: set_endpoints may have scheduled it too

    async def stop(self) -> None:
        self._started = False
        await self.discovery.stop()
        for pool in POOLS:
            for ep in list(self.monitors[pool]):
                await self._remove(pool, ep)

    async def wait_ready(self, timeout: float = 30.0, pools=("decode",), exact: bool = False) -> None:
        """Wait until every listed pool has a healthy replica (and, with ``exact``, until every
        healthy replica's index is exact). For tests and start-up logs."""
        deadline = time.monotonic() + timeout
        while True:
            ok = all(any(r.healthy and (not exact or r.exact_index) for r in self.replicas(p)) for p in pools)
            if ok:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no healthy replicas in {pools} after {timeout}s: "
                                   f"{[(r.endpoint, r.healthy, r.exact_index) for p in pools for r in self.replicas(p)]}")
            await asyncio.sleep(0.05)

    # ---- discovery -------------------------------------------------------------------------------
    def set_endpoints(self, pool: str, endpoints) -> None:
        """The discovered endpoint set of ``pool`` (a discovery callback; also usable directly)."""
        current = self.monitors[pool]
        wanted = set(endpoints)
        for ep in sorted(wanted - current.keys()):
            other = next((p for p in POOLS if p != pool and ep in self.monitors[p]), None)
            if other:
                log.warning("%s is discovered in both pools; keeping it in %s", ep, other)
                continue
            m = current[ep] = ReplicaMonitor(ep, pool, self.index, self.info_interval, self.info_timeout,
                                             on_health=self._health, on_info=self._on_info)
            m.slot = self.index.add_replica(ep, pool)       # stable until the replica leaves
            self._health(m.replica)
            self._index_mode(ep, False)
            log.info("%s replica %s joined", pool, ep)
            if self._started:
                asyncio.get_running_loop().create_task(m.start())
        for ep in sorted(current.keys() - wanted):
            log.info("%s replica %s left", pool, ep)
            m = self._forget(pool, ep)          # out of choose() at once; the RPCs stop after
            if m is not None and self._started:
                asyncio.get_running_loop().create_task(m.stop())

    async def _remove(self, pool: str, ep: str) -> None:
        m = self._forget(pool, ep)
        if m is not None:
            await m.stop()

    def _forget(self, pool: str, ep: str) -> ReplicaMonitor | None:
        m = self.monitors[pool].pop(ep, None)
        if m is None:
            return None
        self.index.remove_replica(ep)
        for gauge, labels in ((ROUTER_REPLICA_HEALTHY, (self.model, pool, ep)), (ROUTER_INDEX_MODE, (self.model, ep))):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass
        return m

    def _health(self, r: Replica) -> None:
        ROUTER_REPLICA_HEALTHY.labels(self.model, r.pool, r.endpoint).set(1 if r.healthy else 0)

    def _index_mode(self, endpoint: str, exact: bool) -> None:
        for pool in POOLS:
            m = self.monitors[pool].get(endpoint)
            if m is not None:
                m.replica.exact_index = exact
        ROUTER_INDEX_MODE.labels(self.model, endpoint).set(1 if exact else 0)

    def _on_info(self, r: Replica, info) -> None:
        bs = info.layout.block_size
        if not bs or bs == self.block_size:
            return
        if self.auto_block_size and not any(m.last_info for p in POOLS for m in self.monitors[p].values()
                                            if m.replica is not r):
            # events carry the workers' own hashes, so nothing stored needs resyncing; only
            # approximate history hashed with the old size is useless (it expires)
            log.info("block size %d (from %s)", bs, r.endpoint)
            self.block_size = self.index.block_size = bs
        elif r.endpoint not in self._warned_bs:
            self._warned_bs.add(r.endpoint)
            log.warning("%s uses %d-token blocks, the router %d: its prefix matches are missed "
                        "(set --block-size to the workers' value)", r.endpoint, bs, self.block_size)

    # ---- Placement API ---------------------------------------------------------------------------
    def replicas(self, pool: str) -> list[Replica]:
        return [m.replica for m in self.monitors[pool].values()]

    def choose(self, token_ids: list[int], exclude: set[str] = frozenset()) -> Decision:
        t0 = time.perf_counter()
        pre = [m for m in self.monitors["prefill"].values() if m.replica.healthy and m.endpoint not in exclude]
        dec = [m for m in self.monitors["decode"].values() if m.replica.healthy and m.endpoint not in exclude]
        if not dec:
            self._count("decode", "no-decode-replica")
            raise NoReplicaError("no healthy decode replica" + (f" (excluded: {sorted(exclude)})" if exclude else ""))
        # one walk for both pools, limited to the candidates (it stops once none holds a block);
        # done for every policy, since matched_tokens is reported either way
        mask = 0
        for m in pre:
            mask |= 1 << m.slot
        for m in dec:
            mask |= 1 << m.slot
        blocks, _ = self.index.match(token_ids, mask)
        bs = self.block_size
        n = len(token_ids)
        if pre:
            pc = self._policy.choose_prefill(
                [Candidate(m.replica, blocks.get(m.slot, 0) * bs, m.pending_tokens) for m in pre], n)
            prefill, p_reason, p_cached = pc.endpoint, pc.reason, pc.cached_tokens
        else:
            pc, prefill, p_reason, p_cached = None, None, "no-prefill-replica", 0
        dc = self._policy.choose_decode([Candidate(m.replica, blocks.get(m.slot, 0) * bs) for m in dec], n, bs)
        if prefill is not None and self._overflow(prefill, dc.endpoint, n - dc.cached_tokens):
            prefill, p_reason, p_cached = None, "prefill-queue-full", dc.cached_tokens
        self._count("prefill", p_reason)
        self._count("decode", dc.reason)
        decision = Decision(prefill=prefill, decode=dc.endpoint, policy=self.policy,
                            reason=p_reason, matched_tokens=p_cached,
                            decode_matched_tokens=dc.cached_tokens,
                            scores={"prefill": pc.scores if pc else {}, "decode": dc.scores,
                                    "decode_reason": dc.reason})
        self._decision_hist.observe(time.perf_counter() - t0)
        return decision

    def _overflow(self, prefill: str, decode: str, uncached: int) -> bool:
        """Prefill on the decode replica instead? Only while the prefill replica is backed up
        and the decode replica's own queue of prompts stays short: a decode step that also
        prefills is slower for every sequence in it, so it takes overflow, not the base load."""
        if not self.max_prefill_queue_tokens:
            return False
        p, d = self.monitors["prefill"].get(prefill), self.monitors["decode"].get(decode)
        if p is None or d is None:
            return False
        if max(p.pending_tokens, p.replica.queued_prompt_tokens) <= self.max_prefill_queue_tokens:
            return False
        return d.pending_tokens + uncached <= self.max_local_prefill_tokens

    def _count(self, pool: str, reason: str) -> None:
        key = (pool, reason)
        c = self._decision_ctr.get(key)
        if c is None:
            c = self._decision_ctr[key] = ROUTER_DECISIONS.labels(self.model, pool, self.policy, reason)
        c.inc()

    def _monitor(self, endpoint: str | None) -> ReplicaMonitor | None:
        if endpoint is None:
            return None
        return self.monitors["prefill"].get(endpoint) or self.monitors["decode"].get(endpoint)

    def on_request_start(self, decision: Decision, token_ids: list[int]) -> None:
        # prompt tokens someone must compute before the first token: the prefill replica, or
        # (no prefill replica) the decode replica itself, beyond what it has cached
        cached = decision.matched_tokens if decision.prefill else decision.decode_matched_tokens
        pending = max(len(token_ids) - cached, 0)
        f = self._flights[id(decision)] = _Flight(decision.prefill, decision.decode, pending)
        p, d = self._monitor(f.prefill), self._monitor(f.decode)
        if p is not None:
            p.replica.in_flight += 1
            p.pending_tokens += f.pending_tokens
        if d is not None:
            d.replica.in_flight += 1
            if p is None:
                d.pending_tokens += f.pending_tokens
        # approximate index: whoever computes the prompt caches it (a no-op for exact replicas)
        for m in (p, d):
            if m is not None and not m.replica.exact_index:
                self.index.record(m.endpoint, token_ids)

    def on_first_token(self, decision: Decision) -> None:
        f = self._flights.get(id(decision))
        if f is not None:
            self._close_prefill(f)

    def on_request_end(self, decision: Decision, ok: bool) -> None:
        f = self._flights.pop(id(decision), None)
        if f is None:
            return
        self._close_prefill(f)
        d = self._monitor(f.decode)
        if d is not None:
            d.replica.in_flight = max(d.replica.in_flight - 1, 0)
        if not ok:          # maybe the replica, maybe the request: let the next Info poll tell
            for m in (self._monitor(f.prefill), d):
                if m is not None and self._started:
                    m.poke()

    def _close_prefill(self, f: _Flight) -> None:
        if not f.prefill_open:
            return
        f.prefill_open = False
        p = self._monitor(f.prefill)
        if p is not None:
            p.replica.in_flight = max(p.replica.in_flight - 1, 0)
            p.pending_tokens = max(p.pending_tokens - f.pending_tokens, 0)
        elif (d := self._monitor(f.decode)) is not None:
            d.pending_tokens = max(d.pending_tokens - f.pending_tokens, 0)


# ---- command line (the front end's `tandem router` adds these and calls build_placement) ----------
def add_placement_arguments(parser) -> None:
    from tandem.router.policies import POLICIES
    g = parser.add_argument_group("placement")
    g.add_argument("--policy", choices=POLICIES, default="cache-aware",
                   help="how to pick replicas (default cache-aware: cached prefix vs load)")
    g.add_argument("--discovery", choices=["static", "dns", "kubernetes"], default=None,
                   help="replica source (default: dns if --prefill-dns/--decode-dns is given, else static)")
    g.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT[,...]",
                   help="static prefill worker endpoints (repeatable or comma-separated)")
    g.add_argument("--decode", action="append", default=[], metavar="HOST:PORT[,...]",
                   help="static decode worker endpoints")
    g.add_argument("--prefill-dns", default=None, metavar="NAME:PORT",
                   help="headless Service name of the prefill pool, re-resolved periodically")
    g.add_argument("--decode-dns", default=None, metavar="NAME:PORT", help="same for the decode pool")
    g.add_argument("--dns-interval", type=float, default=5.0, help="seconds between DNS lookups")
    g.add_argument("--namespace", default=None,
                   help="namespace of the EndpointSlices (default: this pod's, else 'default')")
    g.add_argument("--prefill-selector", default=None, help="label selector of the prefill EndpointSlices")
    g.add_argument("--decode-selector", default=None, help="label selector of the decode EndpointSlices")
    g.add_argument("--kubeconfig", default=None, help="kubeconfig outside a cluster (default: $KUBECONFIG)")
    g.add_argument("--worker-grpc-port", type=int, default=50061,
                   help="workers' gRPC port where an EndpointSlice names no 'grpc' port")
    g.add_argument("--info-interval", "--health-interval", type=float, default=0.5, dest="info_interval",
                   help="seconds between Info polls (load + health) per replica")
    g.add_argument("--info-timeout", type=float, default=2.0, help="Info RPC deadline; a miss marks unhealthy")
    g.add_argument("--approx-ttl", type=float, default=120.0,
                   help="seconds a replica without a KV-event stream is assumed to cache a routed prompt")
    g.add_argument("--block-size", type=int, default=0,
                   help="KV block size the workers hash with (0: learn it from their Info)")
    g.add_argument("--max-prefill-queue-tokens", type=int, default=0,
                   help="conditional disaggregation (experimental): once the chosen prefill replica "
                        "has more prompt tokens queued than this, a decode replica with room prefills "
                        "the request itself (0, the default: always use the prefill pool). On 2x H200 "
                        "with 16384 it raised TPOT more than it saved TTFT (bench/RESULTS.md)")
    g.add_argument("--max-local-prefill-tokens", type=int, default=8192,
                   help="with --max-prefill-queue-tokens: the most prompt tokens one decode replica may "
                        "have queued for its own prefill")
    w = parser.add_argument_group("cache-aware weights (score = w_prefix*cached - w_load*load, in tokens)")
    for name, default in ScoreWeights().__dict__.items():
        w.add_argument("--" + name.replace("_", "-"), type=float, default=default, dest=name,
                       help=f"(default {default:g})")


def _pod_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def build_discovery(args) -> Discovery:
    from tandem.router.discovery import DnsDiscovery, KubernetesDiscovery
    mode = args.discovery or ("dns" if (args.prefill_dns or args.decode_dns) else "static")
    if mode == "static":
        return StaticDiscovery(args.prefill, args.decode)
    if mode == "dns":
        if not (args.prefill_dns or args.decode_dns):
            raise SystemExit("--discovery dns needs --prefill-dns and/or --decode-dns")
        return DnsDiscovery(args.prefill_dns, args.decode_dns, interval=args.dns_interval)
    if not args.decode_selector:
        raise SystemExit("--discovery kubernetes needs --decode-selector (and usually --prefill-selector)")
    return KubernetesDiscovery(args.namespace or _pod_namespace(),
                               {"prefill": args.prefill_selector, "decode": args.decode_selector},
                               port=args.worker_grpc_port, kubeconfig=args.kubeconfig)


def build_placement(args) -> ReplicaPlacement:
    weights = ScoreWeights(**{k: getattr(args, k) for k in ScoreWeights.field_names()})
    model = getattr(args, "served_model_name", None) or "tandem"
    return ReplicaPlacement(build_discovery(args), policy=args.policy, weights=weights,
                            info_interval=args.info_interval, approx_ttl=args.approx_ttl,
                            block_size=args.block_size, model=model, info_timeout=args.info_timeout,
                            max_prefill_queue_tokens=args.max_prefill_queue_tokens,
                            max_local_prefill_tokens=args.max_local_prefill_tokens)
