"""Runs an `LLMEngine` on a thread of its own and connects it to asyncio servers.

The engine (and everything that touches its KV memory, e.g. the KV-transfer engine) is only ever
used from this thread. Server coroutines send it work with `call(fn, ...)` (fn runs on the
engine thread between two steps, its result comes back as an awaitable) and receive each
request's outputs on an asyncio queue opened with `open_stream`. Every iteration the thread runs
queued commands, then the tick hooks (KV-transfer progress), then one engine step if there is
work; it sleeps only when there is neither work nor a pending transfer.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback

from tandem.engine.engine import LLMEngine, RequestOutput

log = logging.getLogger("tandem.engine")


class EngineDead(RuntimeError):
    pass


class EngineThread:
    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop | None = None):
        self.engine = engine
        self.loop = loop
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self.tick_hooks: list = []        # () -> None, every iteration
        self.busy_hooks: list = []        # () -> bool: keep spinning (e.g. transfers in flight)
        self.output_hooks: list = []      # (RequestOutput) -> bool: True if consumed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.error: BaseException | None = None
        self.last_step = time.monotonic()

    def start(self) -> None:
        self.loop = self.loop or asyncio.get_running_loop()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._cmds.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- from the asyncio side -------------------------------------------------------------------
    def call(self, fn, *args) -> asyncio.Future:
        """Runs ``fn(*args)`` on the engine thread; await the returned future for its result."""
        fut = self.loop.create_future()
        if not self.alive:
            fut.set_exception(EngineDead(f"engine thread is down: {self.error!r}"))
            return fut
        self._cmds.put((fn, args, fut))
        return fut

    def post(self, fn, *args) -> None:
        """Like `call`, without waiting for a result (e.g. from a cancelled coroutine)."""
        self._cmds.put((fn, args, None))

    def open_stream(self, request_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        return q

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    # ---- from the engine thread ------------------------------------------------------------------
    def deliver(self, request_id: str, item) -> None:
        """Sends an output (or an exception) to the request's stream, if one is open."""
        q = self._streams.get(request_id)
        if q is not None:
            self.loop.call_soon_threadsafe(q.put_nowait, item)

    def _resolve(self, fut, result=None, exc: BaseException | None = None) -> None:
        def settle():
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        self.loop.call_soon_threadsafe(settle)

    def _run_commands(self, block: bool) -> None:
        timeout = None
        while True:
            try:
                if block:
                    item = self._cmds.get(timeout=timeout if timeout is not None else 0.1)
                    block = False
                else:
                    item = self._cmds.get_nowait()
            except queue.Empty:
                return
            if item is None:
                return
            fn, args, fut = item
            try:
                res = fn(*args)
                if fut is not None:
                    self._resolve(fut, res)
            except BaseException as e:  # the caller decides what an error means
                if fut is not None:
                    self._resolve(fut, exc=e)
                else:
                    log.warning("engine command %s failed: %r", getattr(fn, "__name__", fn), e)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if any(h(out) for h in self.output_hooks):
                continue
            self.deliver(out.request_id, out)

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                idle = not eng.has_unfinished() and not any(h() for h in self.busy_hooks)
                self._run_commands(block=idle)
                for hook in self.tick_hooks:
                    hook()
                if eng.has_unfinished():
                    self._dispatch(eng.step())
                    self.last_step = time.monotonic()
                elif any(h() for h in self.busy_hooks):
                    time.sleep(0.0002)   # transfers in flight: poll often, but yield the GIL
        except BaseException as e:
            self.error = e
            log.error("engine thread died: %s", traceback.format_exc())
            for rid in list(self._streams):
                self.deliver(rid, EngineDead(f"engine failed: {e!r}"))
