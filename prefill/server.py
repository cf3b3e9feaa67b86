"""`tandem prefill`: the prefill worker.

Prefill(request) runs the prompt through this worker's engine with max_tokens=1 (its own prefix
cache skips what it already holds) and writes the KV pages straight into the decode worker's
reserved blocks:
  * when the step that computes the prompt's last chunk is scheduled (engine step hook), a
    `KVSender` is created for the blocks the decode side is missing;
  * after each layer of that step (attention layer hook) the layer's pages are posted, gated on a
    CUDA event so the DMA never reads a half-written page: transfer overlaps the remaining layers;
  * when the first token is sampled, `finish()` sends it along as the completion payload;
  * the request's blocks stay allocated (`hold_blocks`) until the sender reports DONE or FAILED,
    then return to the pool (still prefix-cached). The RPC answers only then.
If the decode side vanishes or aborts (the RPC is cancelled), the sender is aborted and the blocks
freed. Handshake(decode metadata) connects the KV-transfer engines once per decode worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

import grpc
import torch

from tandem.engine.errors import InvalidRequestError
from tandem.engine.service import Worker, add_worker_arguments, run_worker
from tandem.proto import worker_pb2 as pb
from tandem.proto import worker_pb2_grpc as pb_grpc
from tandem.proto.convert import check_version, logprob_to_proto, params_from_proto

log = logging.getLogger("tandem.prefill")


@dataclass
class Job:
    request_id: str
    peer: object
    dst_blocks: list[int]
    decode_cached: int
    future: asyncio.Future
    sender: object = None
    first: tuple | None = None         # (token, logprob)
    prefill_cached: int = 0
    started: float = field(default_factory=time.monotonic)
    debug_delay_s: float = 0.0


class PrefillWorker(Worker, pb_grpc.PrefillWorkerServicer):
    role = "prefill"

    def __init__(self, args):
        super().__init__(args)
        self.jobs: dict[str, Job] = {}
        self.peers: dict[str, object] = {}          # decode worker id -> PeerHandle
        self._sending: list[Job] = []               # jobs whose final chunk runs this step

    def service_names(self) -> list[str]:
        return [pb.DESCRIPTOR.services_by_name["PrefillWorker"].full_name]

    def add_servicer(self, server) -> list[str]:
        pb_grpc.add_PrefillWorkerServicer_to_server(self, server)
        return self.service_names()

    def setup(self) -> None:
        self.engine.step_hooks.append(self._on_schedule)
        self.engine.runner.attn.layer_hook = self._on_layer
        self.thread.tick_hooks.append(self._tick)
        self.thread.busy_hooks.append(lambda: bool(self.jobs))
        self.thread.output_hooks.append(self._on_output)

    # ---- engine thread -------------------------------------------------------------------------------
    def _start(self, req: pb.PrefillRequest, peer, future) -> None:
        params = params_from_proto(req.params)
        params.max_tokens, params.min_tokens = 1, 0
        seq = self.engine.add_request(req.request_id, list(req.token_ids), params, detokenize=False)
        seq.hold_blocks = True
        bs = self.engine.pool.block_size
        expected = seq.blocks_needed(seq.prompt_len) - req.decode_cached_tokens // bs
        if req.decode_cached_tokens % bs or len(req.dst_block_ids) != expected:
            self.engine.abort_request(req.request_id)
            raise InvalidRequestError(
                f"dst_block_ids has {len(req.dst_block_ids)} blocks; a {seq.prompt_len}-token prompt "
                f"with {req.decode_cached_tokens} cached tokens needs {expected}", param="dst_block_ids")
        self.jobs[req.request_id] = Job(req.request_id, peer, list(req.dst_block_ids),
                                        req.decode_cached_tokens, future,
                                        debug_delay_s=self.args.debug_layer_delay_ms / 1000)

    def _on_schedule(self, sched) -> None:
        self._sending = []
        bs = self.engine.pool.block_size
        for s in sched.scheduled:
            job = self.jobs.get(s.seq.request_id)
            if job is None or not s.sample or job.sender is not None:
                continue
            # The prompt's last chunk runs now: every block is allocated, earlier ones computed.
            first = job.decode_cached // bs
            src = s.seq.block_ids[first:first + len(job.dst_blocks)]
            job.prefill_cached = s.seq.num_cached_tokens
            job.sender = self.kv.create_sender(job.peer, job.request_id, src, job.dst_blocks)
            self._sending.append(job)

    def _on_layer(self, layer: int) -> None:
        if not self._sending:
            return
        ready = None
        if self.engine.runner.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        for job in self._sending:
            if job.debug_delay_s:
                time.sleep(job.debug_delay_s)      # fault-injection for tests (--debug-layer-delay-ms)
            if job.sender is not None:
                job.sender.send_layer(layer, ready=ready)

    def _on_output(self, out) -> bool:
        job = self.jobs.get(out.request_id)
        if job is None:
            return False
        lp = out.new_logprobs[0] if out.new_logprobs else None
        job.first = (out.new_token_ids[0], lp)
        if job.sender is not None:
            job.sender.finish(json.dumps({"t": job.first[0], "lp": lp,
                                          "cached": max(job.prefill_cached - job.decode_cached, 0)}).encode())
        return True

    def _tick(self) -> None:
        if not self.jobs:
            return
        self.kv.progress()
        from tandem.kvtransfer import KVPoll
        for rid, job in list(self.jobs.items()):
            if job.sender is None:
                continue
            state = job.sender.poll()
            if state is KVPoll.DONE:
                self._end(job, None)
            elif state is KVPoll.FAILED:
                self._end(job, f"{job.sender.failure}: {job.sender.failure_detail}")
        self._flush_finished()

    def _flush_finished(self) -> None:
        """Wait (bounded) for the writes of prompts that just finished, so their completion
        notice goes out now. Otherwise it goes out at the next tick, after the next engine step:
        under load a long prefill step (~250 ms for 8k tokens of an 8B model on an H200) that the
        decode worker, and the client's first token, would wait for. One prompt's KV takes a few
        ms over NVLink (or DRAM), so the bound costs the next step little."""
        wait = self.args.kv_flush_wait_ms / 1000
        if wait <= 0:
            return
        busy = [j.sender for j in self.jobs.values() if j.sender is not None and j.sender.writes_pending()]
        deadline = time.monotonic() + wait
        while busy and time.monotonic() < deadline:
            for tx in busy:
                tx.poll()
            busy = [tx for tx in busy if tx.writes_pending()]

    def _end(self, job: Job, error: str | None) -> None:
        self.jobs.pop(job.request_id, None)
        self.engine.abort_request(job.request_id)     # frees held blocks, or stops a running prefill
        fut = job.future
        result = None if error else (job.first, job.sender.nbytes, time.monotonic() - job.started,
                                     job.prefill_cached)

        def settle():
            if not fut.done():
                fut.set_result((error, result))
        self.thread.loop.call_soon_threadsafe(settle)

    def _cancel(self, rid: str, reason: str) -> None:
        job = self.jobs.get(rid)
        if job is None:
            return
        if job.sender is not None:
            job.sender.abort(reason)
        self._end(job, reason)

    # ---- RPCs --------------------------------------------------------------------------------------
    async def Info(self, request, context):
        return self.info()

    async def KVEvents(self, request, context):
        async for batch in self.kv_events(request, context):
            yield batch

    async def Handshake(self, request, context):
        await check_version(request.version, context)
        from tandem.kvtransfer import LayoutMismatch
        try:
            handle = await self.thread.call(self.kv.connect, request.transfer_info)
        except LayoutMismatch as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{e} (decode {request.peer_id})")
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"handshake refused: {e}")
        self.peers[request.peer_id] = handle
        log.info("handshake from decode %s", request.peer_id)
        return pb.HandshakeResponse(transfer_info=self.kv.handshake_info(), info=self.info())

    async def Prefill(self, request, context):
        await check_version(request.version, context)
        if self.draining or not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker is draining or not ready")
        peer = self.peers.get(request.decode_peer_id)
        if peer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"unknown decode peer {request.decode_peer_id!r}: handshake first")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.in_flight += 1
        try:
            try:
                await self.thread.call(self._start, request, peer, future)
            except InvalidRequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            try:
                error, result = await future
            except asyncio.CancelledError:
                # the decode side hung up (died or aborted): stop sending, free the blocks
                self.thread.post(self._cancel, request.request_id, "decode cancelled")
                raise
            if error:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {error}")
            (token, lp), nbytes, seconds, cached = result
            resp = pb.PrefillResponse(first_token=token, prefill_cached_tokens=cached,
                                      bytes_sent=nbytes, transfer_seconds=seconds)
            if lp is not None:
                resp.first_logprob.CopyFrom(logprob_to_proto(lp))
            return resp
        finally:
            self.in_flight -= 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p, "prefill")
    p.add_argument("--kv-flush-wait-ms", type=float, default=5.0,
                   help="after a step that finished prompts, wait up to this long for their KV writes "
                        "to land so the decode worker hears of it before the next step, not after "
                        "(nixl; 0: never wait)")
    p.add_argument("--debug-layer-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    return run_worker(PrefillWorker, args)
