"""Two-process harness for the tests and the benchmark: each PeerProcess is a spawned process
owning one kv tensor and one engine, driven over a pipe.

    parent ──call("op", ...)──> child: runs _Peer.op(...) ──(ok, result)──> parent

Transfers live in the child (keyed by request id), so the parent can create a receiver in one
process, a sender in the other, move layers one at a time, kill either process mid-transfer, and
read the kv blocks back to compare them.
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing import get_context
from typing import Any, Optional, Sequence

from .layout import KVLayout


class RemoteError(RuntimeError):
    """An exception raised inside the peer process; the message carries its type and text."""


class PeerProcess:
    def __init__(self, backend: str, layout: KVLayout, *, device: str = "cpu",
                 config: Optional[dict] = None, name: Optional[str] = None,
                 engine_kwargs: Optional[dict] = None, start_timeout: float = 60):
        ctx = get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, daemon=True,
                                args=(child, backend, layout.to_dict(), device, config or {},
                                      name, engine_kwargs or {}))
        self.proc.start()
        child.close()
        self.info: bytes = self.call("handshake", timeout=start_timeout)
        self.name: str = self.call("name")

    def call(self, op: str, *args: Any, timeout: float = 60, **kwargs: Any) -> Any:
        self.start(op, *args, **kwargs)
        return self.result(timeout)

    def start(self, op: str, *args: Any, **kwargs: Any) -> None:
        """Begin ``op`` without waiting, so that both peers can work at once; then result()."""
        self._conn.send((op, args, kwargs))

    def result(self, timeout: float = 60) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"no answer from the peer within {timeout}s")
        ok, val = self._conn.recv()
        if not ok:
            raise RemoteError(val)
        return val

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=20)
            except (TimeoutError, EOFError, OSError, RemoteError):
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.kill()
        self._conn.close()


def _serve(conn, backend, layout_d, device, config, name, engine_kwargs) -> None:
    import logging
    peer = _Peer(backend, KVLayout.from_dict(layout_d), device, config, name, engine_kwargs)
    logging.getLogger("nixl").setLevel(logging.WARNING)  # after nixl configured its logging
    while True:
        try:
            op, args, kwargs = conn.recv()
        except (EOFError, OSError):
            break
        try:
            conn.send((True, getattr(peer, op)(*args, **kwargs)))
        except Exception as e:  # reported to the parent, which raises RemoteError
            conn.send((False, f"{type(e).__name__}: {e}"))
        if op == "exit":
            break


class _Peer:
    """Operations the parent can call; transfers are kept by request id in tx / rx."""

    def __init__(self, backend, layout: KVLayout, device, config, name, engine_kwargs):
        import torch

        from . import TransferConfig, create_engine
        self.torch = torch
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        self.kv = layout.allocate(device).zero_()
        self.engine = create_engine(backend, self.kv, name=name, config=TransferConfig(**config),
                                    **engine_kwargs)
        self.peers: dict = {}
        self.tx: dict = {}
        self.rx: dict = {}

    def handshake(self) -> bytes:
        return self.engine.handshake_info()

    def name(self) -> str:
        return self.engine.name

    def connect(self, info: bytes) -> str:
        p = self.engine.connect(info)
        self.peers[p.name] = p
        return p.name

    def fill(self, blocks: Optional[Sequence[int]] = None, value: Optional[float] = None,
             seed: int = 0) -> None:
        """Random data (or ``value``) into ``blocks`` of every layer (all blocks if None)."""
        torch = self.torch
        idx = slice(None) if blocks is None else torch.as_tensor(list(blocks), dtype=torch.long)
        shape = self.kv[:, idx].shape
        if value is None:
            g = torch.Generator().manual_seed(seed)
            data = torch.randn(shape, generator=g).to(self.kv.dtype)
        else:
            data = torch.full(shape, value, dtype=self.kv.dtype)
        self.kv[:, idx] = data.to(self.kv.device)
        if self.kv.is_cuda:
            torch.cuda.synchronize()

    def digest(self, blocks: Sequence[int]) -> str:
        """sha1 of kv[:, blocks]: compares large transfers without shipping the bytes."""
        import hashlib
        return hashlib.sha1(self.read(blocks).tobytes()).hexdigest()

    def read(self, blocks: Sequence[int]):
        """kv[:, blocks] as raw bytes, [num_layers, len(blocks), block_bytes] uint8 numpy."""
        t = self.kv[:, self.torch.as_tensor(list(blocks), dtype=self.torch.long)].contiguous()
        return t.view(self.torch.uint8).reshape(t.shape[0], t.shape[1], -1).cpu().numpy()

    # ---- transfers -------------------------------------------------------------------------
    def receiver(self, rid: str, dst: Sequence[int], expected: Optional[str] = None) -> str:
        self.rx[rid] = self.engine.create_receiver(rid, dst, self.peers.get(expected, expected))
        return self.rx[rid].state.name

    def sender(self, peer: str, rid: str, src: Sequence[int], dst: Sequence[int]) -> int:
        self.tx[rid] = self.engine.create_sender(self.peers[peer], rid, src, dst)
        return len(self.tx[rid].runs)

    def send_layer(self, rid: str, layer: int, ready_after_s: float = 0.0) -> str:
        t = time.monotonic() + ready_after_s
        ready = (lambda: time.monotonic() >= t) if ready_after_s else None
        self.tx[rid].send_layer(layer, ready)
        return self.tx[rid].poll().name

    def compute_and_send_layer(self, rid: str, layer: int, blocks: Sequence[int], seed: int,
                               spin_cycles: int = 50_000_000) -> str:
        """GPU only: write random data into ``blocks`` of ``layer`` on a side stream that is
        still busy (a spin kernel first), and send the layer gated on the stream's event, as
        the prefill loop does. A backend that ignored the event would copy the old pages."""
        torch = self.torch
        stream = torch.cuda.Stream()
        idx = torch.as_tensor(list(blocks), device=self.kv.device)
        g = torch.Generator(device=self.kv.device).manual_seed(seed)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(spin_cycles)
            data = torch.randn(self.kv[layer, idx].shape, generator=g, device=self.kv.device)
            self.kv[layer].index_copy_(0, idx, data.to(self.kv.dtype))
            ev = torch.cuda.Event()
            ev.record(stream)
        self._keep = getattr(self, "_keep", [])[-64:] + [stream]  # alive until it has run
        self.tx[rid].send_layer(layer, ev)
        return self.tx[rid].poll().name

    def send_layers(self, rid: str, layers: Optional[Sequence[int]] = None) -> str:
        self.tx[rid].send_layers(layers)
        return self.tx[rid].poll().name

    def finish(self, rid: str, payload: bytes = b"") -> str:
        self.tx[rid].finish(payload)
        return self.tx[rid].poll().name

    def abort(self, side: str, rid: str, reason: str = "test") -> str:
        t = (self.tx if side == "tx" else self.rx)[rid]
        t.abort(reason)
        return t.state.name

    def poll(self, side: str, rid: str) -> dict:
        t = (self.tx if side == "tx" else self.rx)[rid]
        st = t.poll()
        return {"state": st.name, "failure": t.failure, "detail": t.failure_detail,
                "payload": getattr(t, "payload", None) if st.name == "DONE" else None,
                "nbytes": t.nbytes, "descriptors": getattr(t, "num_descriptors", None)}

    def wait(self, side: str, rid: str, timeout: float = 30.0) -> dict:
        """Poll until terminal or timeout; adds 'waited' (seconds)."""
        t0 = time.monotonic()
        while True:
            r = self.poll(side, rid)
            if r["state"] in ("DONE", "FAILED") or time.monotonic() - t0 > timeout:
                r["waited"] = time.monotonic() - t0
                return r
            time.sleep(0.0005)

    def transfer(self, peer: str, rid: str, src: Sequence[int], dst: Sequence[int],
                 layerwise: bool = True, payload: bytes = b"", timeout: float = 60.0) -> dict:
        """A whole send, timed here: create, all layers, finish, poll until terminal."""
        t0 = time.perf_counter()
        self.sender(peer, rid, src, dst)
        tx = self.tx[rid]
        if layerwise:
            for layer in range(self.engine.layout.num_layers):
                tx.send_layer(layer)
                tx.poll()
        else:
            tx.send_layers()
        tx.finish(payload)
        r = self.wait("tx", rid, timeout)
        r["seconds"] = time.perf_counter() - t0
        del self.tx[rid]
        return r

    def progress_for(self, seconds: float) -> None:
        """What a worker loop does between requests: engine.progress() every step."""
        t = time.monotonic() + seconds
        while time.monotonic() < t:
            self.engine.progress()
            time.sleep(0.0005)

    def live(self) -> int:
        return self.engine.live_transfers()

    def metric(self, name: str, labels: dict) -> Optional[float]:
        from prometheus_client import REGISTRY
        return REGISTRY.get_sample_value(name, labels)

    def p2p_copy(self, nbytes: int, src_gpu: int, dst_gpu: int, iters: int = 5) -> float:
        """GB/s of a plain torch device-to-device copy of nbytes (best of iters)."""
        torch = self.torch
        a = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src_gpu}")
        b = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_gpu}")
        best = float("inf")
        for _ in range(iters + 1):
            torch.cuda.synchronize(src_gpu), torch.cuda.synchronize(dst_gpu)
            t0 = time.perf_counter()
            b.copy_(a, non_blocking=True)
            torch.cuda.synchronize(src_gpu), torch.cuda.synchronize(dst_gpu)
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e9

    def exit(self) -> None:
        self.engine.close()
