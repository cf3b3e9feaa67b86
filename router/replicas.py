"""One worker replica as the router watches it: its Info poll (load + health) and its KV-event
stream (feeding the prefix index).

Data flow, per replica, two asyncio tasks on one gRPC channel:
  * poll: ``Info`` every ``interval`` seconds (sooner after `poke`, e.g. when a request there
    failed). The answer refreshes the `Replica` load fields; ``ready=false`` or an RPC failure
    marks it unhealthy (tandem_router_replica_healthy), a later success healthy again. A failed
    poll also cancels the event stream: a half-open connection would otherwise keep the index
    "exact" on a replica that is gone.
  * events: ``KVEvents`` subscription; every batch goes to `PrefixIndex.apply_batch` (the first
    one as the snapshot). A seq gap resubscribes at once; a failed or ended stream switches the
    replica to the approximate index (tandem_router_prefix_index_exact = 0) and resubscribes
    with backoff. The index itself flips the metric back to 1 on the next snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable

import grpc

from tandem.engine.hashing import HASH_VERSION
from tandem.proto import worker_pb2 as pb
from tandem.proto import worker_pb2_grpc as pb_grpc
from tandem.proto.convert import VERSION
from tandem.router.index import PrefixIndex
from tandem.router.types import Replica

log = logging.getLogger("tandem.router.replicas")

# Workers take tens of seconds to load a model, and a restarted one is back in seconds: with
# gRPC's default reconnect backoff (1 s growing 1.6x per failure, up to 120 s) a replica that
# became ready could stay unused for 20 s or more. Cap the backoff at 2 s.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]


class ReplicaMonitor:
    def __init__(self, endpoint: str, pool: str, index: PrefixIndex, interval: float = 0.5,
                 timeout: float = 2.0, on_health: Callable[[Replica], None] | None = None,
                 on_info: Callable[[Replica, pb.WorkerInfo], None] | None = None):
        self.replica = Replica(endpoint=endpoint, pool=pool)
        self.endpoint = endpoint
        self.slot = -1                    # its prefix-index slot (set by placement)
        self.index = index
        self.interval = interval
        self.timeout = timeout
        self.on_health = on_health
        self.on_info = on_info
        self.pending_tokens = 0           # prompt tokens routed here and not yet prefilled
        self.last_info: pb.WorkerInfo | None = None
        self.last_ok = 0.0
        self._channel: grpc.aio.Channel | None = None
        self._stub = None
        self._tasks: list[asyncio.Task] = []
        self._poke = asyncio.Event()
        self._events_call = None
        self._stream_cancelled = False
        self._warned: set[str] = set()

    async def start(self) -> None:
        if self._tasks:
            return        # already polling: a second start would double the KV-event stream
        self._channel = grpc.aio.insecure_channel(self.endpoint, options=CHANNEL_OPTIONS)
        stub_cls = pb_grpc.PrefillWorkerStub if self.replica.pool == "prefill" else pb_grpc.DecodeWorkerStub
        self._stub = stub_cls(self._channel)
        self._tasks = [asyncio.create_task(self._poll_loop(), name=f"info {self.endpoint}"),
                       asyncio.create_task(self._events_loop(), name=f"kv-events {self.endpoint}")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def poke(self) -> None:
        """Poll Info now instead of at the next interval."""
        self._poke.set()

    # ---- health + load -----------------------------------------------------------------------
    def _set_healthy(self, healthy: bool, why: str = "") -> None:
        if healthy != self.replica.healthy:
            log.log(logging.INFO if healthy else logging.WARNING, "%s replica %s is %s%s",
                    self.replica.pool, self.endpoint, "healthy" if healthy else "unhealthy",
                    f" ({why})" if why else "")
        self.replica.healthy = healthy
        if self.on_health is not None:
            self.on_health(self.replica)

    def apply_info(self, info: pb.WorkerInfo) -> None:
        r = self.replica
        r.worker_id = info.worker_id
        r.free_blocks, r.total_blocks = info.free_blocks, info.total_blocks
        r.running, r.waiting = info.running, info.waiting
        r.queued_prompt_tokens = info.queued_prompt_tokens
        self.last_info, self.last_ok = info, time.monotonic()
        if info.role and info.role != r.pool and "role" not in self._warned:
            self._warned.add("role")
            log.warning("%s was discovered as %s but says it is %s", self.endpoint, r.pool, info.role)
        if info.hash_version and info.hash_version != HASH_VERSION and "hash" not in self._warned:
            self._warned.add("hash")
            log.warning("%s hashes blocks with version %d, the router with %d: no prefix matches",
                        self.endpoint, info.hash_version, HASH_VERSION)
        if self.on_info is not None:
            self.on_info(r, info)
        self._set_healthy(bool(info.ready), "" if info.ready else "worker says not ready")

    async def _poll_loop(self) -> None:
        while True:
            try:
                info = await self._stub.Info(pb.InfoRequest(version=VERSION), timeout=self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:          # AioRpcError mostly; anything else must not end polling
                why = e.code().name if isinstance(e, grpc.aio.AioRpcError) else repr(e)
                self._set_healthy(False, f"Info: {why}")
                self._cancel_stream()
            else:
                self.apply_info(info)
            self._poke.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.interval)

    # ---- KV events ---------------------------------------------------------------------------------
    def _cancel_stream(self) -> None:
        # grpc.aio raises asyncio.CancelledError in the reader of a call cancelled locally; the
        # flag tells that apart from the task itself being cancelled (stop()).
        if self._events_call is not None and not self._events_call.done():
            self._stream_cancelled = True
            self._events_call.cancel()

    async def _events_loop(self) -> None:
        backoff = 0.2
        while True:
            gap, call = False, None
            try:
                call = self._events_call = self._stub.KVEvents(pb.KVEventsRequest(version=VERSION))
                first = True
                async for batch in call:
                    if not self.index.apply_batch(self.endpoint, batch.seq, batch.events, snapshot=first):
                        gap = True
                        self._cancel_stream()
                        break
                    first, backoff = False, 0.2
            except asyncio.CancelledError:
                if not self._stream_cancelled:
                    raise
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    log.debug("KV events from %s: %s", self.endpoint, e.code().name)
            except Exception:               # a bad batch must not leave the index "exact" and stale
                log.exception("KV events from %s", self.endpoint)
            finally:
                if call is not None and not call.done():
                    call.cancel()
                self._events_call = None
                self._stream_cancelled = False
            if gap:
                continue              # resubscribe at once: the snapshot resynchronises
            self.index.set_approximate(self.endpoint)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
