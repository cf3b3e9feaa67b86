"""A scriptable fake worker for the placement tests: a real gRPC server (grpc.aio, loopback) that
answers Info from a settable `WorkerInfo` and serves KVEvents from a script, so the replica
monitor's real code path (channel, polls, stream, resubscription) runs without a model."""

from __future__ import annotations

import asyncio
import time

import grpc

from tandem.proto import worker_pb2 as pb
from tandem.proto import worker_pb2_grpc as pb_grpc


class FakeWorker(pb_grpc.PrefillWorkerServicer, pb_grpc.DecodeWorkerServicer):
    def __init__(self, role: str = "prefill", block_size: int = 16):
        self.role = role
        self.info = pb.WorkerInfo(version=pb.PROTOCOL_VERSION_1, worker_id=f"fake-{role}", role=role,
                                  layout=pb.KVLayout(block_size=block_size), hash_version=1,
                                  free_blocks=1000, total_blocks=1000, ready=True)
        self.events_ok = True            # False: KVEvents aborts UNAVAILABLE
        self.subscriptions = 0
        self.snapshot: list[int] = []    # hashes sent in each subscription's first batch
        self.seq = 0
        self.queues: list[asyncio.Queue] = []
        self.server: grpc.aio.Server | None = None
        self.endpoint = ""

    async def start(self) -> "FakeWorker":
        self.server = grpc.aio.server()
        (pb_grpc.add_PrefillWorkerServicer_to_server if self.role == "prefill"
         else pb_grpc.add_DecodeWorkerServicer_to_server)(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.endpoint = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)

    # ---- RPCs -------------------------------------------------------------------------------------
    async def Info(self, request, context):
        return self.info

    async def KVEvents(self, request, context):
        if not self.events_ok:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "events disabled")
        self.subscriptions += 1
        q: asyncio.Queue = asyncio.Queue()
        self.queues.append(q)
        yield self._batch(self.seq, [pb.KVEvent(cleared=pb.AllBlocksCleared()),
                                     pb.KVEvent(stored=pb.BlockStored(block_hashes=self.snapshot))])
        try:
            while True:
                batch = await q.get()
                if batch is None:
                    return
                yield batch
        finally:
            self.queues.remove(q)

    def _batch(self, seq, events):
        return pb.KVEventBatch(seq=seq, ts=time.time(), worker_id=self.info.worker_id, events=events)

    # ---- scripting --------------------------------------------------------------------------------
    def store(self, hashes: list[int], skip_seq: int = 0) -> None:
        """Publish a BlockStored batch; ``skip_seq`` > 0 leaves a gap in the sequence first."""
        self.snapshot.extend(hashes)
        self.seq += 1 + skip_seq
        b = self._batch(self.seq, [pb.KVEvent(stored=pb.BlockStored(block_hashes=hashes))])
        for q in self.queues:
            q.put_nowait(b)

    def end_streams(self) -> None:
        for q in self.queues:
            q.put_nowait(None)


async def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
