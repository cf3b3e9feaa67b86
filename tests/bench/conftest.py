"""Fixtures for the benchmark client tests: a tokenizer trained on the spot and a fake server.

``FakeServer`` is a real aiohttp HTTP server on 127.0.0.1 (its own thread and event loop, so
both ``asyncio.run(run_benchmark(...))`` and the synchronous CLI can talk to it). It streams
OpenAI-style SSE with the delays and token counts a test sets, injects failures, and records
what it saw: arrival times, bodies, and the peak number of requests in flight.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from typing import Any, Callable

import pytest
from aiohttp import web


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A small byte-level BPE (600 ids, two special tokens) trained on stdlib source text."""
    import argparse
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [inspect.getsource(m) for m in (json, asyncio.events, argparse, textwrap)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    return str(d)


Delay = float | Callable[[int, dict], float]


class FakeServer:
    """OpenAI-compatible streaming server with scripted timing.

    first_delay: seconds before the first text chunk (or f(index, body) -> seconds);
    gap: seconds between text chunks; chunks: text chunks per request (default: max_tokens);
    tokens_per_chunk: what usage reports per chunk; send_usage: emit the usage event;
    fail: f(index, body) -> HTTP status to answer instead (None: serve normally);
    truncate: f(index) -> True to close the stream before [DONE].
    """

    def __init__(self, first_delay: Delay = 0.0, gap: float = 0.0, chunks: int | None = None,
                 tokens_per_chunk: int = 1, send_usage: bool = True,
                 fail: Callable[[int, dict], int | None] | None = None,
                 truncate: Callable[[int], bool] | None = None, model: str = "fake-model"):
        self.first_delay, self.gap, self.chunks = first_delay, gap, chunks
        self.tokens_per_chunk, self.send_usage = tokens_per_chunk, send_usage
        self.fail, self.truncate, self.model = fail, truncate, model
        self.arrivals: list[float] = []
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "FakeServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    # -- handlers ----------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.monotonic())
        body = await request.json()
        index = len(self.bodies)
        self.bodies.append(body)
        self.paths.append(request.path)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status = self.fail(index, body) if self.fail else None
            if status:
                return web.json_response({"error": {"message": f"injected {status}"}},
                                         status=status)
            return await self._stream(request, index, body)
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, index: int, body: dict) -> web.StreamResponse:
        chat = request.path.endswith("chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        if chat:  # real servers open with a role-only delta: it must not count as TTFT
            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        delay = self.first_delay(index, body) if callable(self.first_delay) else self.first_delay
        await asyncio.sleep(delay)
        n = self.chunks or int(body.get("max_tokens", 16))
        for i in range(n):
            if i:
                await asyncio.sleep(self.gap)
            piece = f" word{i}"
            choice = ({"index": 0, "delta": {"content": piece}} if chat
                      else {"index": 0, "text": piece})
            await send({"choices": [choice]})
            if self.truncate and self.truncate(index) and i == n // 2:
                return resp  # handler returns mid-stream: the client sees EOF without [DONE]
        if self.send_usage:
            await send({"choices": [], "usage": {"prompt_tokens": 7,
                                                 "completion_tokens": n * self.tokens_per_chunk}})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
def fake_server():
    """Factory: ``with fake_server(**kw) as srv:`` starts a FakeServer."""
    return FakeServer
