"""The router's HTTP side (aiohttp): the OpenAI-compatible API plus /health, /ready, /metrics and
/openapi.json.

POST /v1/completions and /v1/chat/completions: body -> `openai_protocol.parse_*` (type checks,
tokenization, context check) -> one `GenRequest` per choice (prompts x n; choice i > 0 of a seeded
request samples with seed + i) -> `Frontend.generate` for each, concurrently -> either one JSON
body, or an SSE stream whose headers go out with the first chunk, so that anything failing before
the first token (bad request, overload, no replica) still gets its HTTP status. A failure after
that is an ``error`` event followed by ``data: [DONE]``. Every error body has OpenAI's shape
``{"error": {message, type, param, code}}``; the server never answers 422. A client that goes
away cancels the handler (handler_cancellation), which cancels the workers' calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tandem import metrics as M
from tandem.router.errors import APIError, BadRequest, ModelNotFound, api_error
from tandem.router.frontend import Frontend, GenRequest
from tandem.router.openai_format import Choice, Formatter
from tandem.router.openai_protocol import Prepared, parse_chat, parse_completion
from tandem.router.openapi import openapi_document

log = logging.getLogger("tandem.router.http")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def error_response(e: APIError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers())


@web.middleware
async def openai_errors(request: web.Request, handler):
    """aiohttp's own refusals (unknown path, wrong method, body too large) in OpenAI's shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        err = APIError(f"{e.reason}: {request.method} {request.path}", code=None)
        err.status, err.type = e.status, "invalid_request_error" if e.status < 500 else "server_error"
        return web.json_response(err.body(), status=e.status)


class HTTPFront:
    def __init__(self, frontend: Frontend, tokenizer, model: str, model_dir: str,
                 ignore_unknown_fields: bool = False):
        self.fe, self.tok, self.model, self.model_dir = frontend, tokenizer, model, model_dir
        self.ignore_unknown = ignore_unknown_fields
        self.created = int(time.time())
        self._openapi = json.dumps(openapi_document()).encode()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[openai_errors], client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    # ---- small endpoints -----------------------------------------------------------------------------
    async def health(self, _):
        return web.json_response({"status": "ok"})

    async def ready(self, _):
        ok = self.fe.ready()
        decode = [{"endpoint": r.endpoint, "healthy": r.healthy} for r in self.fe.placement.replicas("decode")]
        return web.json_response({"ready": ok, "decode": decode}, status=200 if ok else 503)

    async def metrics(self, _):
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, _):
        return web.Response(body=self._openapi, content_type="application/json")

    def model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "tandem",
                "root": self.model_dir, "max_model_len": self.fe.max_model_len}

    async def models(self, _):
        return web.json_response({"object": "list", "data": [self.model_card()]})

    # ---- generation --------------------------------------------------------------------------------
    async def completions(self, request: web.Request):
        return await self._serve(request, "completions")

    async def chat(self, request: web.Request):
        return await self._serve(request, "chat")

    async def _body(self, request: web.Request):
        raw = await request.read()
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def _prepare(self, kind: str, body) -> Prepared:
        if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"] not in ("", self.model):
            raise ModelNotFound(body["model"])
        if kind == "completions":
            return parse_completion(body, self.model, self.tok, self.fe.check_context, self.ignore_unknown)
        return parse_chat(body, self.model, self.tok, self.fe.check_context, self.fe.max_model_len,
                          self.ignore_unknown)

    async def _serve(self, request: web.Request, kind: str):
        status = "500"
        try:
            prep = self._prepare(kind, await self._body(request))
            rid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}"
            fmt = Formatter(kind, rid, int(time.time()), self.model, self.tok, prep.logprobs,
                            prep.include_usage)
            subs = self._fan_out(prep, rid)
            if prep.stream:
                resp, status = await self._stream(request, prep, fmt, subs)
                return resp
            body = await self._collect(prep, fmt, subs)
            status = "200"
            return web.json_response(body)
        except asyncio.CancelledError:
            status = "499"               # the client went away
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            err = api_error(e)
            status = str(err.status)
            if err.status >= 500:
                log.warning("%s request failed: %s", kind, err.message)
            return error_response(err)
        finally:
            M.ROUTER_REQUESTS.labels(self.model, kind, status).inc()

    @staticmethod
    def _fan_out(prep: Prepared, rid: str) -> list[GenRequest]:
        subs = []
        for p, (ids, params) in enumerate(zip(prep.prompts, prep.params)):
            for j in range(prep.n):
                sp = dataclasses.replace(params)
                if sp.seed is not None and j:
                    sp.seed = (sp.seed + j + (1 << 63)) % (1 << 64) - (1 << 63)
                subs.append(GenRequest(f"{rid}-{p * prep.n + j}", ids, sp))
        return subs

    async def _run(self, req: GenRequest, on_delta) -> None:
        async with contextlib.aclosing(self.fe.generate(req)) as it:
            async for d in it:
                await on_delta(d)

    async def _collect(self, prep: Prepared, fmt: Formatter, subs: list[GenRequest]) -> dict:
        choices = [Choice(i) for i in range(len(subs))]

        def adder(c):
            async def add(d):
                c.add(d)
            return add

        tasks = [asyncio.create_task(self._run(s, adder(c))) for s, c in zip(subs, choices)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return fmt.response(choices, fmt.usage(choices, [len(p) for p in prep.prompts], prep.n))

    async def _stream(self, request, prep: Prepared, fmt: Formatter, subs: list[GenRequest]):
        choices = [Choice(i) for i in range(len(subs))]
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i, s):
            try:
                async def put(d):
                    await q.put((i, d))
                await self._run(s, put)
                await q.put((i, done))
            except Exception as e:  # noqa: BLE001 - handed to the writer below
                await q.put((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(subs)]
        resp: web.StreamResponse | None = None

        async def send(obj) -> None:
            nonlocal resp
            if resp is None:
                resp = web.StreamResponse(headers=SSE_HEADERS)
                await resp.prepare(request)
            await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

        status = "200"
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await q.get()
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    if resp is None:
                        raise item       # nothing sent yet: a plain error response
                    err = api_error(item)
                    status = str(err.status)
                    log.warning("stream failed after its first chunk: %s", err.message)
                    await send(err.body())
                    break
                choices[i].add(item)
                for chunk in fmt.chunks(choices[i], item):
                    subs[i].visible = True
                    await send(chunk)
            else:
                if prep.include_usage:
                    await send(fmt.usage_chunk(fmt.usage(choices, [len(p) for p in prep.prompts], prep.n)))
            await send(b"[DONE]")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            status = "499"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return resp, status
