"""`tandem decode`: the decode worker (and, for short or uncached prompts, a colocated one).

Generate(request, prefill_endpoint) on the asyncio side:
  1. on the engine thread, reserve KV blocks for the prompt, reusing this worker's prefix cache
     (`LLMEngine.reserve_remote`), and open a `KVReceiver` for the blocks still missing. If too
     few tokens are missing (--remote-prefill-threshold), no prefill endpoint was given, or the
     pool has no room, the prompt is queued here instead (conditional disaggregation);
  2. call Prefill on the prefill worker with the destination block ids (after a one-time
     Handshake that exchanges KV-transfer metadata and checks the layouts agree);
  3. the engine thread's tick polls the receiver: when the KV has landed (DONE, carrying the first
     token) the sequence joins the running batch (`commit_remote`); on FAILED, or if the Prefill
     call fails first, the blocks are freed and the client gets UNAVAILABLE (retryable);
  4. tokens stream back as GenerateResponse messages until the sequence finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import dataclass

import grpc

from tandem.engine.errors import InvalidRequestError
from tandem.engine.service import Worker, add_worker_arguments, run_worker
from tandem.proto import worker_pb2 as pb
from tandem.proto import worker_pb2_grpc as pb_grpc
from tandem.proto.convert import (VERSION, check_version, logprob_to_proto,
                                  params_from_proto, params_to_proto)

log = logging.getLogger("tandem.decode")


class TransferFailed(RuntimeError):
    pass


@dataclass
class Pending:
    """A request whose prompt KV is on its way from a prefill worker."""
    receiver: object
    started: float
    prefill_cached: int = 0


@dataclass
class PrefillPeer:
    endpoint: str
    channel: grpc.aio.Channel
    stub: pb_grpc.PrefillWorkerStub
    handle: object            # kvtransfer PeerHandle
    info: pb.WorkerInfo


class DecodeWorker(Worker, pb_grpc.DecodeWorkerServicer):
    role = "decode"

    def __init__(self, args):
        super().__init__(args)
        self.pending: dict[str, Pending] = {}
        self.peers: dict[str, PrefillPeer] = {}
        self._peer_locks: dict[str, asyncio.Lock] = {}
        # blocks of failed remote prefills wait here before reuse: a nixl write already posted by
        # a live-but-late prefill could still land in them (tcp guarantees it cannot)
        self.quarantine: list[tuple[float, str]] = []
        self.quarantine_s = args.failed_transfer_quarantine if args.kv_transfer == "nixl" else 0.0

    def service_names(self) -> list[str]:
        return [pb.DESCRIPTOR.services_by_name["DecodeWorker"].full_name]

    def add_servicer(self, server) -> list[str]:
        pb_grpc.add_DecodeWorkerServicer_to_server(self, server)
        return self.service_names()

    def setup(self) -> None:
        self.thread.tick_hooks.append(self._tick)
        self.thread.busy_hooks.append(lambda: bool(self.pending or self.quarantine))

    # ---- engine-thread side ------------------------------------------------------------------------
    def _tick(self) -> None:
        if not self.pending and not self.quarantine:
            return
        self.kv.progress()
        from tandem.kvtransfer import KVPoll
        for rid, p in list(self.pending.items()):
            state = p.receiver.poll()
            if state is KVPoll.DONE:
                del self.pending[rid]
                msg = json.loads(p.receiver.payload or b"{}")
                lp = msg.get("lp")
                out = self.engine.commit_remote(rid, int(msg["t"]), tuple(lp) if lp else None,
                                                remote_cached_tokens=int(msg.get("cached", 0)))
                self.thread.deliver(rid, out)
            elif state is KVPoll.FAILED:
                del self.pending[rid]
                self._release(rid)
                self.thread.deliver(rid, TransferFailed(
                    f"KV transfer failed: {p.receiver.failure}"))
        now = time.monotonic()
        while self.quarantine and self.quarantine[0][0] <= now:
            self.engine.release_remote(self.quarantine.pop(0)[1])

    def _release(self, rid: str) -> None:
        if self.quarantine_s > 0:
            self.quarantine.append((time.monotonic() + self.quarantine_s, rid))
        else:
            self.engine.release_remote(rid)

    def _admit(self, rid, ids, params, peer: PrefillPeer | None):
        """Engine thread: reserve for remote prefill, or queue locally. Returns the remote
        reservation (dst blocks, decode-cached tokens) or None for local."""
        if peer is not None:
            seq = self.engine.reserve_remote(rid, ids, params, self.args.remote_prefill_threshold)
            if seq is not None:
                first = seq.num_computed_tokens // seq.block_size
                dst = seq.block_ids[first:]
                try:
                    recv = self.kv.create_receiver(rid, dst, expected_peer=peer.handle)
                except Exception:
                    self.engine.release_remote(rid)
                    raise
                self.pending[rid] = Pending(recv, time.monotonic())
                return dst, seq.num_computed_tokens
        self.engine.add_request(rid, ids, params)
        return None

    def _fail_remote(self, rid: str, reason: str) -> bool:
        """Engine thread: the Prefill call failed. True if the request was still waiting for its
        KV (and is now released); False if the KV had already landed."""
        p = self.pending.pop(rid, None)
        if p is None:
            return False
        p.receiver.abort(reason)
        self._release(rid)
        return True

    def _abort(self, rid: str) -> bool:
        if self._fail_remote(rid, "aborted"):
            return True
        return self.engine.abort_request(rid)

    # ---- prefill peers ---------------------------------------------------------------------------
    async def _peer(self, endpoint: str, refresh: bool = False) -> PrefillPeer:
        lock = self._peer_locks.setdefault(endpoint, asyncio.Lock())
        async with lock:
            peer = self.peers.get(endpoint)
            if peer is not None and not refresh:
                return peer
            channel = grpc.aio.insecure_channel(endpoint)
            stub = pb_grpc.PrefillWorkerStub(channel)
            resp = await stub.Handshake(pb.HandshakeRequest(
                version=VERSION, peer_id=self.worker_id, transfer_info=self.kv.handshake_info(),
                info=self.info()), timeout=30)
            handle = await self.thread.call(self.kv.connect, resp.transfer_info)
            if peer is not None:
                await peer.channel.close()
            peer = self.peers[endpoint] = PrefillPeer(endpoint, channel, stub, handle, resp.info)
            log.info("handshake with prefill %s (%s) done", endpoint, resp.info.worker_id)
            return peer

    # ---- RPCs --------------------------------------------------------------------------------------
    async def Info(self, request, context):
        return self.info()

    async def KVEvents(self, request, context):
        async for batch in self.kv_events(request, context):
            yield batch

    async def Abort(self, request, context):
        await check_version(request.version, context)
        return pb.AbortResponse(found=await self.thread.call(self._abort, request.request_id))

    async def Generate(self, request, context):
        await check_version(request.version, context)
        if self.draining or not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker is draining or not ready")
        rid, ids = request.request_id, list(request.token_ids)
        params = params_from_proto(request.params)
        try:
            self.engine.validate(ids, params)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.in_flight += 1
        queue = self.thread.open_stream(rid)
        finished = False
        try:
            peer = None
            if request.prefill_endpoint:
                try:
                    peer = await self._peer(request.prefill_endpoint)
                except (grpc.aio.AioRpcError, Exception) as e:
                    reason = e.details() if isinstance(e, grpc.aio.AioRpcError) else repr(e)
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        f"prefill {request.prefill_endpoint} unreachable: {reason}")
            try:
                remote = await self.thread.call(self._admit, rid, ids, params, peer)
            except InvalidRequestError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            mode = "remote" if remote else "local"
            if remote:
                await self._remote_prefill(context, peer, rid, ids, params, *remote)
            first = True
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{item}; the request can be retried")
                out = item
                resp = pb.GenerateResponse(
                    token_ids=out.new_token_ids, text=out.new_text,
                    logprobs=[logprob_to_proto(lp) for lp in out.new_logprobs],
                    finish_reason=out.finish_reason or "", stop_reason=str(out.stop_reason or ""),
                    prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                    cached_tokens=out.num_cached_tokens, prefill_mode=mode if first else "")
                first = False
                yield resp
                if out.finished:
                    finished = True
                    return
        finally:
            self.thread.close_stream(rid)
            self.in_flight -= 1
            if not finished:
                self.thread.post(self._abort, rid)

    async def _remote_prefill(self, context, peer, rid, ids, params, dst, cached) -> None:
        req = pb.PrefillRequest(version=VERSION, request_id=rid, token_ids=ids,
                                params=params_to_proto(params), decode_peer_id=self.worker_id,
                                dst_block_ids=dst, decode_cached_tokens=cached)
        timeout = self.args.bootstrap_timeout + self.args.transfer_timeout
        try:
            try:
                await peer.stub.Prefill(req, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION or "handshake" not in (e.details() or ""):
                    raise
                # the prefill worker restarted and forgot us: handshake again, retry once
                peer = await self._peer(peer.endpoint, refresh=True)
                await peer.stub.Prefill(req, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if await self.thread.call(self._fail_remote, rid, f"prefill RPC {e.code().name}"):
                code = (grpc.StatusCode.INVALID_ARGUMENT if e.code() == grpc.StatusCode.INVALID_ARGUMENT
                        else grpc.StatusCode.UNAVAILABLE)
                await context.abort(code, f"prefill {peer.endpoint} failed: {e.code().name}: "
                                          f"{e.details()}" + ("" if code == grpc.StatusCode.INVALID_ARGUMENT
                                                              else "; the request can be retried"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p, "decode")
    p.add_argument("--remote-prefill-threshold", type=int, default=64,
                   help="prefill here when fewer prompt tokens than this are missing from the "
                        "local prefix cache (conditional disaggregation); 1 = always remote")
    p.add_argument("--failed-transfer-quarantine", type=float, default=5.0,
                   help="seconds the blocks of a failed nixl transfer wait before reuse")


def run(args: argparse.Namespace) -> int:
    return run_worker(DecodeWorker, args)
