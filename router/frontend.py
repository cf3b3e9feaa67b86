"""The request path shared by the HTTP (OpenAI) and gRPC (tandem.v1.Router) fronts.

A front parses and tokenizes a request into `GenRequest`s (one per choice) and iterates
`Frontend.generate(req)`, which:
  1. waits for admission (`Admission`: at most --max-in-flight requests on the workers, at most
     --max-queue more waiting, each for at most --queue-timeout; beyond that 429 / 503);
  2. asks the placement for a `Decision` and calls ``DecodeWorker.Generate`` on the chosen decode
     replica with ``prefill_endpoint`` set to the chosen prefill replica (channels are cached per
     endpoint);
  3. yields one `Delta` per GenerateResponse (text arrives detokenized, stop strings applied);
  4. if the call fails retryably (UNAVAILABLE & co.) before the client has seen anything of this
     request (`GenRequest.visible`, set by the front when it writes to the client), asks the
     placement again with the failed endpoint excluded (bounded attempts, exponential backoff);
     deltas already yielded but not shown are withdrawn with a ``reset`` delta. Once the client
     has seen output, a failure is the client's error (a retry would repeat or change text).
Cancelling the iteration (client gone) cancels the gRPC call, and the worker aborts the request.
Latency histograms, token counters and the routing-decision counters are updated here; request
counts by status are the fronts' (they know the status they answer).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc

from tandem import metrics as M
from tandem.engine.errors import InvalidRequestError
from tandem.engine.sampling import SamplingParams
from tandem.proto import worker_pb2 as pb
from tandem.proto import worker_pb2_grpc as pb_grpc
from tandem.proto.convert import VERSION, logprob_from_proto, params_to_proto
from tandem.router.errors import Overloaded, Unavailable, UpstreamError, UpstreamTimeout
from tandem.router.types import Decision, Placement
from tandem.router.replicas import CHANNEL_OPTIONS

log = logging.getLogger("tandem.router")

# Worker answers after which another replica may well succeed.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN}


@dataclass
class FrontendConfig:
    model: str                       # served model name (metrics label, API model id)
    model_dir: str
    max_in_flight: int = 256
    max_queue: int = 1024
    queue_timeout: float = 30.0
    retries: int = 3                 # extra attempts before the first token
    retry_backoff: float = 0.05      # seconds, doubled per attempt, capped at 1 s
    request_timeout: float = 600.0   # deadline of one Generate call
    model_info_interval: float = 10.0


@dataclass
class GenRequest:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    visible: bool = False            # the front has written some of this request's output




@dataclass
class Delta:
    token_ids: list[int]
    text: str
    logprobs: list                   # [(logprob, [(token id, logprob), ...]), ...]
    finish_reason: str | None = None
    stop_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reset: bool = False              # withdraw every earlier delta of this request (a retry)


class Admission:
    """A counting semaphore with a bounded FIFO of waiters, whose length is ROUTER_QUEUE."""

    def __init__(self, limit: int, max_queue: int, model: str):
        self.limit, self.max_queue, self.active = limit, max_queue, 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self._gauge = M.ROUTER_QUEUE.labels(model)

    async def acquire(self, timeout: float) -> None:
        if self.active < self.limit and not self.waiters:
            self.active += 1
            return
        if len(self.waiters) >= self.max_queue:
            raise Overloaded(f"the router's queue is full ({self.max_queue} requests waiting); "
                             "retry later", code="queue_full", retry_after=1)
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self._gauge.set(len(self.waiters))
        try:
            await asyncio.wait_for(fut, timeout)
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self.release()           # handed a slot while giving up: pass it on
            else:
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            self._gauge.set(len(self.waiters))
            if isinstance(e, asyncio.TimeoutError):
                raise Unavailable(f"the request waited {timeout:.0f}s for admission; the router is "
                                  "overloaded", code="queue_timeout", retry_after=1) from None
            raise
        self._gauge.set(len(self.waiters))

    def release(self) -> None:
        while self.waiters:
            f = self.waiters.popleft()
            if not f.done():
                f.set_result(None)       # the slot moves to the waiter; active is unchanged
                return
        self.active -= 1


def context_limit_from_config(model_dir: str) -> int:
    """max_position_embeddings (capped by a sliding window, as the engine does) of config.json:
    the context limit until a decode replica tells us its own max_model_len."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    cfg = cfg.get("text_config", cfg)
    limit = int(cfg.get("max_position_embeddings") or 0)
    if cfg.get("sliding_window"):
        limit = min(limit, int(cfg["sliding_window"])) if limit else int(cfg["sliding_window"])
    return limit


class Frontend:
    def __init__(self, cfg: FrontendConfig, placement: Placement):
        self.cfg = cfg
        self.placement = placement
        self.admission = Admission(cfg.max_in_flight, cfg.max_queue, cfg.model)
        self.max_model_len = context_limit_from_config(cfg.model_dir)
        self._max_len_from_worker = False
        self.draining = False            # SIGTERM: not ready, new requests get 503
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task] = []
        # placements that count their own decisions say so; otherwise they are counted here
        self._count_decisions = not getattr(placement, "records_decision_metrics", False)
        self._m = _Metrics(cfg.model)

    async def start(self) -> None:
        await self.placement.start()
        await self._refresh_model_info()
        self._tasks.append(asyncio.create_task(self._model_info_loop()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.placement.stop()
        for ch in self._channels.values():
            await ch.close()

    def ready(self) -> bool:
        return not self.draining and any(r.healthy for r in self.placement.replicas("decode"))

    def stub(self, endpoint: str) -> pb_grpc.DecodeWorkerStub:
        ch = self._channels.get(endpoint)
        if ch is None:
            ch = self._channels[endpoint] = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        return pb_grpc.DecodeWorkerStub(ch)

    # ---- the context limit ---------------------------------------------------------------------------
    async def _model_info_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0 if not self._max_len_from_worker else self.cfg.model_info_interval)
            try:
                await self._refresh_model_info()
            except Exception:  # noqa: BLE001 - keep the loop alive; the next round retries
                log.exception("refreshing model info failed")

    async def _refresh_model_info(self) -> None:
        """The smallest max_model_len among healthy decode replicas (a request must fit wherever
        it lands)."""
        lens = []
        for r in self.placement.replicas("decode"):
            if not r.healthy:
                continue
            try:
                info = await self.stub(r.endpoint).Info(pb.InfoRequest(version=VERSION), timeout=2)
            except grpc.aio.AioRpcError:
                continue
            if info.max_model_len:
                lens.append(info.max_model_len)
            if info.model and info.model != self.cfg.model:
                log.warning("decode replica %s serves %r, the router %r", r.endpoint, info.model,
                            self.cfg.model)
        if lens:
            if min(lens) != self.max_model_len:
                log.info("context limit: %d tokens (decode replicas' max_model_len)", min(lens))
            self.max_model_len, self._max_len_from_worker = min(lens), True

    def check_context(self, n_prompt: int, max_tokens: int, param: str = "prompt") -> None:
        limit = self.max_model_len
        if limit and n_prompt + max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the {'messages' if param == 'messages' else 'prompt'}, "
                f"{max_tokens} in the completion). Please reduce the length of the "
                f"{'messages' if param == 'messages' else 'prompt'} or completion.",
                param=param, code="context_length_exceeded")

    # ---- the request path ----------------------------------------------------------------------------
    async def generate(self, req: GenRequest) -> AsyncIterator[Delta]:
        arrival = time.monotonic()
        if self.draining:
            raise Unavailable("the router is shutting down", code="draining", retry_after=1)
        await self.admission.acquire(self.cfg.queue_timeout)
        self._m.in_flight.inc()
        try:
            async for d in self._dispatch(req, arrival):
                yield d
        finally:
            self._m.in_flight.dec()
            self.admission.release()

    async def _dispatch(self, req: GenRequest, arrival: float) -> AsyncIterator[Delta]:
        exclude: set[str] = set()
        proto_params = params_to_proto(req.params)
        for attempt in range(self.cfg.retries + 1):
            t = time.perf_counter()
            decision = self.placement.choose(req.token_ids, exclude)   # NoReplicaError: 503
            self._m.decided(decision, time.perf_counter() - t, self._count_decisions)
            rid = req.request_id if attempt == 0 else f"{req.request_id}-r{attempt}"
            call = self.stub(decision.decode).Generate(pb.GenerateRequest(
                version=VERSION, request_id=rid, token_ids=req.token_ids, params=proto_params,
                prefill_endpoint=decision.prefill or ""), timeout=self.cfg.request_timeout)
            self.placement.on_request_start(decision, req.token_ids)
            ok = sent = False
            first_at = last_at = 0.0
            try:
                async for resp in call:
                    now = time.monotonic()
                    if resp.token_ids:
                        if not first_at:
                            first_at = now
                            self.placement.on_first_token(decision)
                            self._m.first_token(now - arrival, len(req.token_ids), decision)
                        else:
                            self._m.itl.observe(now - last_at)
                        last_at = now
                    d = Delta(list(resp.token_ids), resp.text,
                              [logprob_from_proto(lp) for lp in resp.logprobs],
                              resp.finish_reason or None, resp.stop_reason or None,
                              resp.prompt_tokens, resp.completion_tokens, resp.cached_tokens)
                    if d.finish_reason:
                        ok = True
                        self._m.finished(arrival, first_at, now, d.completion_tokens)
                    sent = True
                    yield d
                    if ok:
                        return
                raise UpstreamError(f"decode replica {decision.decode} ended the stream without "
                                    "a finish reason", code="upstream_error")
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    details = e.details() or "invalid request"
                    # the replica's own context limit can be below the one the router checked
                    ctx = "max_model_len" in details or "context" in details
                    raise InvalidRequestError(details, param="prompt" if ctx else None,
                                              code="context_length_exceeded" if ctx else None) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise UpstreamTimeout(f"the request took longer than {self.cfg.request_timeout:.0f}s",
                                          code="timeout") from None
                if req.visible or code not in RETRYABLE or attempt == self.cfg.retries:
                    where = "after its first output" if req.visible else f"after {attempt + 1} attempt(s)"
                    raise UpstreamError(f"decode replica {decision.decode} failed {where}: "
                                        f"{code.name}: {e.details()}", code="upstream_error") from None
                if sent:
                    yield Delta([], "", [], reset=True)   # nothing reached the client: start over
                culprit = self._culprit(decision, e)
                exclude.add(culprit)
                log.warning("request %s: %s failed before the first token (%s: %s); retrying "
                            "without %s", req.request_id, decision.decode, code.name, e.details(), culprit)
                self._m.retries.inc()
            finally:
                if not call.done():
                    call.cancel()            # client gone or we gave up: the worker aborts
                self.placement.on_request_end(decision, ok)
            await asyncio.sleep(min(1.0, self.cfg.retry_backoff * 2 ** attempt))

    @staticmethod
    def _culprit(decision: Decision, e: grpc.aio.AioRpcError) -> str:
        """Which endpoint to avoid next: the decode worker names the prefill replica when the remote
        prefill (its RPC or the KV transfer) failed; otherwise the decode replica itself failed."""
        details = e.details() or ""
        if decision.prefill and (decision.prefill in details or "KV transfer" in details):
            return decision.prefill
        return decision.decode


@dataclass
class _Metrics:
    model: str
    in_flight: object = field(init=False)

    def __post_init__(self):
        m = self.model
        self.in_flight = M.ROUTER_IN_FLIGHT.labels(m)
        self.ttft, self.itl = M.ROUTER_TTFT.labels(m), M.ROUTER_ITL.labels(m)
        self.tpot, self.e2e = M.ROUTER_TPOT.labels(m), M.ROUTER_E2E.labels(m)
        self.prompt, self.gen = M.ROUTER_PROMPT_TOKENS.labels(m), M.ROUTER_GENERATION_TOKENS.labels(m)
        self.matched = M.ROUTER_PREFIX_MATCHED_TOKENS.labels(m)
        self.decision_s = M.ROUTER_DECISION_SECONDS.labels(m)
        self.retries = M.ROUTER_RETRIES.labels(m)

    def decided(self, d: Decision, seconds: float, count: bool) -> None:
        if not count:
            return
        self.decision_s.observe(seconds)
        M.ROUTER_DECISIONS.labels(self.model, "decode", d.policy, d.reason).inc()
        M.ROUTER_DECISIONS.labels(self.model, "prefill", d.policy,
                                  d.reason if d.prefill else "no-prefill-replica").inc()

    def first_token(self, ttft: float, n_prompt: int, d: Decision) -> None:
        # counted for the attempt that served the request, so matched/prompt is a true ratio
        self.ttft.observe(ttft)
        self.prompt.inc(n_prompt)
        self.matched.inc(d.matched_tokens)

    def finished(self, arrival: float, first_at: float, end: float, n_out: int) -> None:
        self.e2e.observe(end - arrival)
        self.gen.inc(n_out)
        if first_at and n_out > 1:
            self.tpot.observe((end - first_at) / (n_out - 1))
