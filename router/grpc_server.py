"""The router's gRPC side: ``tandem.v1.Router`` (Generate, ListModels), gRPC health (SERVING while
at least one decode replica is healthy, as /ready) and server reflection.

Generate: RouterGenerateRequest -> token ids (text through the tokenizer, chat through the chat
template, token ids as given) and SamplingParams (max_tokens 0 -> 16, top_p 0 -> 1.0, since
proto3 cannot tell unset from 0) -> the same `Frontend.generate` path as HTTP -> one
RouterGenerateResponse per worker message. Errors map to status codes through `errors.APIError`
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem import metrics as M
from tandem.proto import router_pb2 as rpb
from tandem.proto import router_pb2_grpc as rpb_grpc
from tandem.proto import worker_pb2 as pb
from tandem.proto.convert import logprob_to_proto, params_from_proto
from tandem.router.errors import ModelNotFound, api_error
from tandem.router.frontend import Frontend, GenRequest
from tandem.router.openai_protocol import COMPLETIONS_DEFAULT_MAX_TOKENS

log = logging.getLogger("tandem.router.grpc")

SERVICE = rpb.DESCRIPTOR.services_by_name["Router"].full_name


class RouterService(rpb_grpc.RouterServicer):
    def __init__(self, frontend: Frontend, tokenizer, model: str):
        self.fe, self.tok, self.model = frontend, tokenizer, model
        self.created = int(time.time())

    def _prepare(self, request: rpb.RouterGenerateRequest) -> GenRequest:
        if request.model and request.model != self.model:
            raise ModelNotFound(request.model)
        which = request.WhichOneof("input")
        param = "prompt"
        if which == "text":
            ids = self.tok.encode(request.text)
        elif which == "token_ids":
            ids = list(request.token_ids.ids)
        elif which == "chat":
            param = "messages"
            msgs = [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                    for m in request.chat.messages]
            agp = request.chat.add_generation_prompt if request.chat.HasField("add_generation_prompt") else True
            ids = self.tok.encode_chat(msgs, agp)
        else:
            ids = []
        if not ids:
            from tandem.engine.errors import InvalidRequestError
            raise InvalidRequestError("the prompt is empty: set text, token_ids or chat", param="prompt")
        params = params_from_proto(request.params)
        params.max_tokens = params.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        params.top_p = params.top_p or 1.0
        params.validate()
        self.fe.check_context(len(ids), params.max_tokens, param)
        return GenRequest(request.request_id or f"grpc-{uuid.uuid4().hex}", ids, params)

    async def Generate(self, request, context):
        status = "500"
        try:
            if request.version not in (pb.PROTOCOL_VERSION_UNSPECIFIED, pb.PROTOCOL_VERSION_1):
                status = "400"
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"protocol version {request.version} is not supported; this "
                                    "router speaks PROTOCOL_VERSION_1")
            first = True
            try:
                req = self._prepare(request)
                async for d in self.fe.generate(req):
                    if d.reset:        # a retry withdrew deltas that were never sent: none here
                        continue
                    req.visible = True
                    yield rpb.RouterGenerateResponse(
                        token_ids=d.token_ids, text=d.text,
                        logprobs=[logprob_to_proto(lp) for lp in d.logprobs],
                        finish_reason=d.finish_reason or "", stop_reason=d.stop_reason or "",
                        prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens,
                        cached_tokens=d.cached_tokens, request_id=req.request_id if first else "")
                    first = False
                status = "200"
            except asyncio.CancelledError:
                status = "499"
                raise
            except Exception as e:  # noqa: BLE001 - every failure becomes a status code
                err = api_error(e)
                status = str(err.status)
                await context.abort(err.grpc_code, err.message)
        finally:
            M.ROUTER_REQUESTS.labels(self.model, "grpc", status).inc()

    async def ListModels(self, request, context):
        return rpb.ListModelsResponse(models=[rpb.ModelCard(
            id=self.model, max_model_len=self.fe.max_model_len, owned_by="tandem", created=self.created)])


class GRPCFront:
    def __init__(self, frontend: Frontend, tokenizer, model: str, host: str, port: int):
        self.fe = frontend
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                               ("grpc.max_send_message_length", 64 << 20)])
        rpb_grpc.add_RouterServicer_to_server(RouterService(frontend, tokenizer, model), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self._task: asyncio.Task | None = None
        self._serving: bool | None = None

    async def start(self) -> None:
        await self.server.start()
        await self._update_health()
        self._task = asyncio.create_task(self._health_loop())

    async def stop(self, grace: float = 1.0) -> None:
        if self._task:
            self._task.cancel()
        await self.set_serving(False)
        await self.server.stop(grace)

    async def set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        st = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, st)

    async def _update_health(self) -> None:
        await self.set_serving(self.fe.ready())

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._update_health()
