"""A small `Placement` (see router/types.py): static endpoints, round-robin or least in-flight,
health from each worker's Info RPC. The front end uses it when router/placement.py (the real
placement: prefix index, cache-aware policy, DNS/Kubernetes discovery) is not installed, and its
tests run against it.

Data flow: `start()` probes every replica once (so the router is ready as soon as a decode
replica answers), then a background task calls ``Info`` on each replica every
``--health-interval`` seconds; a replica is healthy while Info answers with ``ready`` and its load
fields are copied into its `Replica`. ``choose`` picks a healthy decode replica and, where one is
healthy, a prefill replica, skipping ``exclude`` (the front end's failed endpoints); with no
prefill replica left the decode replica prefills itself. The front end's on_request_* calls keep
``in_flight`` per replica, which least-load ranks first.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging

import grpc

from tandem import metrics as M
from tandem.proto import worker_pb2 as pb
from tandem.proto import worker_pb2_grpc as pb_grpc
from tandem.proto.convert import VERSION
from tandem.router.types import Decision, NoReplicaError, Replica
from tandem.router.replicas import CHANNEL_OPTIONS

log = logging.getLogger("tandem.router.placement")

POLICIES = ("cache-aware", "least-load", "round-robin")


def add_placement_arguments(p: argparse.ArgumentParser) -> None:
    """The placement flags of `tandem router` (the contract with the Kubernetes operator)."""
    g = p.add_argument_group("placement")
    g.add_argument("--policy", choices=POLICIES, default="cache-aware",
                   help="how replicas are chosen (this fallback placement runs cache-aware as "
                        "least-load: it has no prefix index)")
    g.add_argument("--discovery", choices=["static", "dns", "kubernetes"], default="static",
                   help="where replicas come from (this fallback placement: static only)")
    g.add_argument("--prefill", default="", help="static prefill endpoints, host:port,...")
    g.add_argument("--decode", default="", help="static decode endpoints, host:port,...")
    g.add_argument("--prefill-dns", default="", help="DNS name of the prefill pool (dns discovery)")
    g.add_argument("--decode-dns", default="", help="DNS name of the decode pool (dns discovery)")
    g.add_argument("--namespace", default="default", help="Kubernetes namespace (kubernetes discovery)")
    g.add_argument("--prefill-selector", default="", help="label selector of prefill pods")
    g.add_argument("--decode-selector", default="", help="label selector of decode pods")
    g.add_argument("--worker-grpc-port", type=int, default=50061, help="workers' gRPC port")
    g.add_argument("--health-interval", type=float, default=1.0,
                   help="seconds between Info probes of each replica")


def build_placement(args: argparse.Namespace) -> "SimplePlacement":
    if args.discovery != "static":
        raise SystemExit(f"--discovery {args.discovery} needs router/placement.py; this build has "
                         "only the static fallback placement")
    split = lambda s: [e.strip() for e in (s or "").split(",") if e.strip()]  # noqa: E731
    decode = split(args.decode)
    if not decode:
        raise SystemExit("--decode: at least one decode endpoint is needed with --discovery static")
    model = args.served_model_name or ""
    return SimplePlacement(split(args.prefill), decode, policy=args.policy, model=model,
                           interval=args.health_interval)


class SimplePlacement:
    def __init__(self, prefill: list[str], decode: list[str], policy: str = "round-robin",
                 model: str = "", interval: float = 1.0):
        if policy == "cache-aware":
            log.warning("no prefix index in the fallback placement: cache-aware runs as least-load")
            policy = "least-load"
        self.policy = policy
        self.block_size = 16
        self.model = model
        self.interval = interval
        self._pools = {"prefill": [Replica(e, "prefill") for e in prefill],
                       "decode": [Replica(e, "decode") for e in decode]}
        self._rr = {"prefill": itertools.count(), "decode": itertools.count()}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: asyncio.Task | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._probe_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for ch in self._channels.values():
            await ch.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._probe_all()

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self._probe(r) for pool in self._pools.values() for r in pool))

    async def _probe(self, r: Replica) -> None:
        ch = self._channels.get(r.endpoint)
        if ch is None:
            ch = self._channels[r.endpoint] = grpc.aio.insecure_channel(r.endpoint, options=CHANNEL_OPTIONS)
        stub = (pb_grpc.PrefillWorkerStub if r.pool == "prefill" else pb_grpc.DecodeWorkerStub)(ch)
        try:
            info = await stub.Info(pb.InfoRequest(version=VERSION), timeout=max(1.0, self.interval))
        except grpc.aio.AioRpcError as e:
            healthy = False
            if r.healthy:
                log.warning("%s replica %s is unhealthy: %s", r.pool, r.endpoint, e.code().name)
        else:
            healthy = info.ready
            r.worker_id, r.running, r.waiting = info.worker_id, info.running, info.waiting
            r.queued_prompt_tokens = info.queued_prompt_tokens
            r.free_blocks, r.total_blocks = info.free_blocks, info.total_blocks
            if info.layout.block_size:
                self.block_size = info.layout.block_size
            if healthy and not r.healthy:
                log.info("%s replica %s (%s) is healthy", r.pool, r.endpoint, info.worker_id)
        r.healthy = healthy
        M.ROUTER_REPLICA_HEALTHY.labels(self.model, r.pool, r.endpoint).set(1 if healthy else 0)

    # ---- Placement ---------------------------------------------------------------------------------
    def replicas(self, pool: str) -> list[Replica]:
        return list(self._pools.get(pool, []))

    def _pick(self, pool: str, exclude) -> Replica | None:
        cands = [r for r in self._pools[pool] if r.healthy and r.endpoint not in exclude]
        if not cands:
            return None
        start = next(self._rr[pool])
        # rotate so that ties (and round-robin) move on from the previous choice
        cands = cands[start % len(cands):] + cands[:start % len(cands)]
        if self.policy == "least-load":
            return min(cands, key=lambda r: (r.in_flight, r.running + r.waiting, r.queued_prompt_tokens))
        return cands[0]

    def choose(self, token_ids: list[int], exclude: set[str] = frozenset()) -> Decision:
        d = self._pick("decode", exclude)
        if d is None:
            raise NoReplicaError("no healthy decode replica" + (" left to retry on" if exclude else ""))
        p = self._pick("prefill", exclude)
        reason = ("no-prefill-replica" if p is None
                  else "round-robin" if self.policy == "round-robin" else "load-balance")
        return Decision(prefill=p.endpoint if p else None, decode=d.endpoint, policy=self.policy,
                        reason=reason)

    def _replica(self, endpoint: str | None, pool: str) -> Replica | None:
        return next((r for r in self._pools[pool] if r.endpoint == endpoint), None)

    def on_request_start(self, decision: Decision, token_ids: list[int]) -> None:
        for ep, pool in ((decision.prefill, "prefill"), (decision.decode, "decode")):
            if (r := self._replica(ep, pool)) is not None:
                r.in_flight += 1

    def on_first_token(self, decision: Decision) -> None:
        # the prompt has left the prefill replica: it no longer counts as its load
        if (r := self._replica(decision.prefill, "prefill")) is not None:
            r.in_flight = max(0, r.in_flight - 1)
        decision.scores["prefill_released"] = True

    def on_request_end(self, decision: Decision, ok: bool) -> None:
        if not decision.scores.get("prefill_released"):
            if (r := self._replica(decision.prefill, "prefill")) is not None:
                r.in_flight = max(0, r.in_flight - 1)
        if (r := self._replica(decision.decode, "decode")) is not None:
            r.in_flight = max(0, r.in_flight - 1)
