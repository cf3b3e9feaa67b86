"""TCP backend: a streaming fallback for clusters without NIXL, with the same states and API.

Flow (every engine listens; a sender opens one connection per peer engine, shared by requests):

    prefill engine                                     decode engine (listener)
    create_sender -> link to peer (lazy)  --connect--> accept; HELLO(name) names the peer
    send_layer(l, ready) -> job queue
    writer thread: wait ready, then per (layer, run chunk)
      DATA(rid, layer, dst block, n, bytes) ========>  reader thread: recv into staging, then,
                                                       holding the receiver's lock, copy into kv
    finish(payload) -> DONE(rid, payload) ---------->  receiver DONE, payload; ACK(rid) back
    link reader: ACK -> sender DONE          <--------
                 REJECT -> sender FAILED     <--------  receiver aborted / unknown request

Why staging on the receiving side even for CPU tensors: a frame lands in kv only while the
receiver's lock is held and it is still live, so once ``abort()`` returns no byte of that request
is written any more and the decode engine may reuse the blocks at once. GPU tensors are staged
through pinned memory on both sides (socket -> pinned -> device and back).

A dropped connection fails every live transfer that used it ("peer_lost"): on the sender side all
requests of the link, on the receiving side every receiver bound to the connection or expecting
that peer by name.
"""

from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
import time
from typing import Any, Optional

import numpy as np
import torch

from .base import (LOCAL_FAILURES, KVReceiver, KVSender, KVTransferEngine, PeerHandle,
                   ReadySignal, TransferConfig, is_ready, reject_reason)

log = logging.getLogger("tandem.kvtransfer.tcp")

_HELLO, _DATA, _DONE, _ABORT, _ACK, _REJECT = range(6)
# kind, len(rid), layer, first dst block, number of blocks, body length; then rid, then body.
_HDR = struct.Struct("!BHIIIQ")


def _frame(kind: int, rid: str, layer: int = 0, block: int = 0, n: int = 0,
           body_len: int = 0) -> bytes:
    r = rid.encode()
    return _HDR.pack(kind, len(r), layer, block, n, body_len) + r


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        k = sock.recv_into(view)
        if not k:
            raise ConnectionError("peer closed the connection")
        view = view[k:]


def _read_frame(sock: socket.socket) -> tuple[int, str, int, int, int, int]:
    hdr = bytearray(_HDR.size)
    _recv_exact(sock, memoryview(hdr))
    kind, rlen, layer, block, n, body_len = _HDR.unpack(hdr)
    rid = bytearray(rlen)
    _recv_exact(sock, memoryview(rid))
    return kind, rid.decode(), layer, block, n, body_len


def _recv_body(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf))
    return bytes(buf)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
        except OSError:
            pass


class _Staging:
    """A bounce buffer between the socket and kv; pinned when kv lives on a GPU."""

    def __init__(self, kv: torch.Tensor, nbytes: int):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=kv.is_cuda)
        self.np = self.tensor.numpy()


class TcpEngine(KVTransferEngine):
    backend = "tcp"

    def __init__(self, kv, *, name: Optional[str] = None, config: Optional[TransferConfig] = None,
                 host: str = "127.0.0.1", port: int = 0, advertise_host: Optional[str] = None,
                 chunk_bytes: int = 4 << 20):
        super().__init__(kv, name=name, config=config)
        self.flat = kv.view(-1).view(torch.uint8)  # byte view: offsets from layout.byte_ranges
        self.flat_np = None if kv.is_cuda else self.flat.numpy()
        self.chunk_blocks = max(1, chunk_bytes // self.layout.block_bytes)
        self.chunk_bytes = self.chunk_blocks * self.layout.block_bytes
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.2)  # the accept loop notices close() within this
        if advertise_host is None:
            advertise_host = socket.gethostbyname(socket.gethostname()) if host in ("", "0.0.0.0") else host
        self.address = (advertise_host, self._listener.getsockname()[1])
        self._links: dict[str, _Link] = {}  # outgoing, by peer name
        self._conns: dict[str, _Conn] = {}  # incoming, by peer name (latest connection)
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop, "accept")

    def _spawn(self, fn, what: str, *args) -> threading.Thread:
        t = threading.Thread(target=fn, args=args, name=f"kv-tcp-{what}", daemon=True)
        t.start()
        with self._reg_lock:  # the accept and link threads spawn too
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        return t

    def _handshake_extra(self) -> dict[str, Any]:
        return {"host": self.address[0], "port": self.address[1]}

    def _connect_peer(self, peer: PeerHandle) -> None:
        pass  # the connection opens with the first sender, in the link's own thread

    def _new_sender(self, peer, request_id, src_blocks, dst_blocks) -> "TcpSender":
        with self._reg_lock:
            link = self._links.get(peer.name)
            if link is None or link.dead:
                link = self._links[peer.name] = _Link(self, peer)
        return TcpSender(self, peer, request_id, src_blocks, dst_blocks, link)

    def _new_receiver(self, request_id, dst_blocks, expected_peer) -> "TcpReceiver":
        return TcpReceiver(self, request_id, dst_blocks, expected_peer)

    # ---- receiving side ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            _tune(sock)
            self._spawn(_Conn(self, sock).serve, "conn")

    def _close_backend(self) -> None:
        self._listener.close()
        with self._reg_lock:
            links, conns = list(self._links.values()), list(self._conns.values())
        for link in links:
            link.shutdown(drain_s=1.0)  # the 'closed' aborts queued by close() go out first
        for conn in conns:
            conn.shutdown()
        with self._reg_lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=5)


class _Conn:
    """One incoming connection: reads frames from a sender engine and writes them into kv."""

    def __init__(self, engine: TcpEngine, sock: socket.socket):
        self.engine, self.sock = engine, sock
        self.peer = "?"
        self._wlock = threading.Lock()
        self._rejected: set[str] = set()

    def reply(self, kind: int, rid: str, body: bytes = b"") -> None:
        try:
            with self._wlock:
                self.sock.sendall(_frame(kind, rid, body_len=len(body)) + body)
        except OSError:
            pass  # the read loop sees the broken connection and cleans up

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        e = self.engine
        staging = _Staging(e.kv, e.chunk_bytes)
        try:
            kind, self.peer, *_ = _read_frame(self.sock)
            if kind != _HELLO:
                raise ConnectionError("first frame is not HELLO")
            with e._reg_lock:
                e._conns[self.peer] = self
            while True:
                kind, rid, layer, block, n, body_len = _read_frame(self.sock)
                if kind == _DATA:
                    self._on_data(rid, layer, block, n, body_len, staging)
                    continue
                body = _recv_body(self.sock, body_len)
                rx = self._receiver(rid)
                if kind == _DONE:
                    if rx is None:
                        self._reject(rid)
                    elif rx._complete(body):
                        self.reply(_ACK, rid)
                elif kind == _ABORT and rx is not None:
                    rx._fail("peer_aborted", body.decode(errors="replace"))
        except (OSError, ConnectionError) as exc:
            if not e._closed:
                log.info("tcp: connection from %s ended: %s", self.peer, exc)
        finally:
            self.sock.close()
            with e._reg_lock:
                if e._conns.get(self.peer) is self:
                    del e._conns[self.peer]
                orphans = [r for r in e._receivers.values()
                           if r._conn is self or r.expected_peer == self.peer]
            for r in orphans:
                r._fail("peer_lost", f"connection from {self.peer} dropped")

    def _receiver(self, rid: str) -> Optional["TcpReceiver"]:
        rx = self.engine._receivers.get(rid)
        if rx is None or not rx._accepts(self.peer):
            return None
        return rx

    def _reject(self, rid: str, why: str = "") -> None:
        if rid not in self._rejected:  # once per request: the sender stops on the first REJECT
            if len(self._rejected) > 4096:
                self._rejected.clear()
            self._rejected.add(rid)
            self.reply(_REJECT, rid, why.encode())

    def _on_data(self, rid: str, layer: int, block: int, n: int, body_len: int,
                 staging: _Staging) -> None:
        e = self.engine
        lay = e.layout
        rx = self._receiver(rid)
        ok = (rx is not None and layer < lay.num_layers and body_len == n * lay.block_bytes
              and body_len <= e.chunk_bytes and rx._owns(block, n))
        if not ok:
            # Drain the body to stay in sync with the stream, then tell the sender to stop.
            left = body_len
            while left:
                k = min(left, len(staging.np))
                _recv_exact(self.sock, memoryview(staging.np)[:k])
                left -= k
            if rx is not None:  # a frame outside the reservation: the request cannot be trusted
                rx._fail("rejected", f"frame for layer {layer} blocks {block}+{n} not reserved")
            self._reject(rid)
            return
        _recv_exact(self.sock, memoryview(staging.np)[:body_len])
        off = lay.offset(layer, block)
        with rx._lock:
            if rx.state.terminal:
                return
            e.flat[off:off + body_len].copy_(staging.tensor[:body_len])
            rx.nbytes += body_len
            rx._conn = self
            rx._touch()


class _Link:
    """One outgoing connection to a peer engine: a writer thread fed by a job queue, and a reader
    thread for ACK/REJECT. Jobs: ("data", sender, layers, ready), ("done", sender),
    ("abort", sender, reason), or None to stop."""

    def __init__(self, engine: TcpEngine, peer: PeerHandle):
        self.engine, self.peer = engine, peer
        self.jobs: queue.Queue = queue.Queue()
        self.sock: Optional[socket.socket] = None
        self.dead = False
        self.why = ""
        self._writer = engine._spawn(self._write_loop, "link-w")

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Stop the link; with drain_s, let the writer flush queued frames (aborts) first."""
        self.jobs.put(None)
        if drain_s and self._writer is not threading.current_thread():
            self._writer.join(timeout=drain_s)
        self.dead = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _senders(self) -> list["TcpSender"]:
        with self.engine._reg_lock:
            return [s for s in self.engine._senders.values() if s._link is self]

    def _die(self, why: str) -> None:
        if not self.dead:
            log.info("tcp: link to %s lost: %s", self.peer.name, why)
        self.why = why
        self.shutdown()
        for s in self._senders():
            s._fail("peer_lost", why)

    def _write_loop(self) -> None:
        e = self.engine
        try:
            host, port = self.peer.extra["host"], int(self.peer.extra["port"])
            self.sock = socket.create_connection((host, port),
                                                 timeout=min(e.config.bootstrap_timeout_s, 30))
            self.sock.settimeout(None)
            _tune(self.sock)
            self.sock.sendall(_frame(_HELLO, e.name))
        except OSError as exc:
            self._die(f"connect: {exc}")
            return
        e._spawn(self._read_loop, "link-r")
        staging = _Staging(e.kv, e.chunk_bytes) if e.kv.is_cuda else None
        try:
            while not self.dead:
                job = self.jobs.get()
                if job is None:
                    return
                kind, s = job[0], job[1]
                if kind == "data":
                    self._send_layers(s, job[2], job[3], staging)
                elif kind == "done" and not s.state.terminal:
                    self.sock.sendall(_frame(_DONE, s.request_id, body_len=len(s.payload))
                                      + s.payload)
                    s._touch()  # now waiting for the ACK, within transfer_timeout
                elif kind == "abort":
                    why = job[2].encode()
                    self.sock.sendall(_frame(_ABORT, s.request_id, body_len=len(why)) + why)
        except OSError as exc:
            self._die(f"send: {exc}")

    def _send_layers(self, s: "TcpSender", layers: list[int], ready: ReadySignal,
                     staging: Optional[_Staging]) -> None:
        e = self.engine
        t0 = time.monotonic()
        while not s.state.terminal:
            try:
                if is_ready(ready):
                    break
            except Exception as exc:
                s._fail("transfer_error", f"ready signal raised {exc!r}")
            if time.monotonic() - t0 > e.config.transfer_timeout_s:
                s._fail("transfer_timeout", "layer never became ready")
            time.sleep(0.0002)
        cb = e.chunk_blocks
        # Long runs are split so that a frame fits the peer's staging buffer.
        pieces = [(r.src + i, r.dst + i, min(cb, r.n - i)) for r in s.runs for i in range(0, r.n, cb)]
        for layer in layers:
            for src, dst, n in pieces:
                if s.state.terminal:
                    return
                off, nbytes = e.layout.offset(layer, src), n * e.layout.block_bytes
                hdr = _frame(_DATA, s.request_id, layer, dst, n, nbytes)
                if staging is None:
                    data = memoryview(e.flat_np)[off:off + nbytes]
                else:
                    staging.tensor[:nbytes].copy_(e.flat[off:off + nbytes])
                    data = memoryview(staging.np)[:nbytes]
                self.sock.sendall(hdr)
                self.sock.sendall(data)
                s.nbytes += nbytes
                s._touch()

    def _read_loop(self) -> None:
        try:
            while True:
                kind, rid, _, _, _, body_len = _read_frame(self.sock)
                body = _recv_body(self.sock, body_len)
                s = self.engine._senders.get(rid)
                if s is None or s._link is not self:
                    continue
                if kind == _ACK:
                    s._set_done()
                elif kind == _REJECT:
                    s._fail(*reject_reason(body))
        except (OSError, ConnectionError) as exc:
            self._die(f"recv: {exc}")


class TcpSender(KVSender):
    engine: TcpEngine

    def __init__(self, engine, peer, request_id, src_blocks, dst_blocks, link: _Link):
        self._link = link
        super().__init__(engine, peer, request_id, src_blocks, dst_blocks)

    def _post_layers(self, layers: list[int], ready: ReadySignal) -> None:
        # Counted like nixl's descriptors (one per layer and merged run) for comparable stats.
        self.num_descriptors += len(self.runs) * len(layers)
        self._link.jobs.put(("data", self, layers, ready))

    def _post_finish(self) -> None:
        self._link.jobs.put(("done", self))

    def _poll_backend(self) -> None:
        # A link can die before this sender was registered with it (connect refused at once).
        if self._link.dead:
            self._fail("peer_lost", self._link.why or "connection closed")

    def _on_failed(self, reason: str) -> None:
        if reason in LOCAL_FAILURES:
            self._link.jobs.put(("abort", self, reason))


class TcpReceiver(KVReceiver):
    engine: TcpEngine

    def __init__(self, engine, request_id, dst_blocks, expected_peer):
        self._conn: Optional[_Conn] = None  # the connection its frames came through
        super().__init__(engine, request_id, dst_blocks, expected_peer)
        self._allowed = np.zeros(engine.layout.num_blocks + 1, dtype=bool)
        self._allowed[self.dst_blocks] = True

    def _owns(self, block: int, n: int) -> bool:
        """The frame writes only blocks this request reserved (never another request's pages)."""
        return block + n <= self.engine.layout.num_blocks and bool(self._allowed[block:block + n].all())

    def _on_failed(self, reason: str) -> None:
        if reason == "peer_aborted":
            return
        conn = self._conn or self.engine._conns.get(self.expected_peer or "")
        if conn is not None:
            conn.reply(_REJECT, self.request_id, reason.encode())
