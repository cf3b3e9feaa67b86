"""Backend-neutral interface: one engine per worker process, one sender or receiver per request.

Data and control flow for one request (decode reserved ``dst_blocks``, prefill computes them):

    decode worker                                      prefill worker
    engine = create_engine(b, kv)                      engine = create_engine(b, kv)
    info_d = engine.handshake_info()  --control plane-->  peer_d = engine.connect(info_d)
    peer_p = engine.connect(info_p)  <--control plane--   info_p = engine.handshake_info()
    rx = engine.create_receiver(rid, dst, peer_p)
                                      --rid, dst------>   tx = engine.create_sender(peer_d, rid, src, dst)
                                                          for l in layers: compute; tx.send_layer(l, ev)
                                      <==KV pages======   (backend writes into decode's kv tensor)
                                      <--done+payload--   tx.finish(first_token_bytes)
    rx.poll() -> DONE, rx.payload     --ack----------->   tx.poll() -> DONE (src blocks may be freed)

Both ends poll: ``poll()`` never blocks, and it is where timeouts are noticed, so an engine loop
that polls once per step sees a stalled or dead peer within ``transfer_timeout_s``. Senders and
receivers move BOOTSTRAPPING -> TRANSFERRING -> DONE, or to FAILED from any live state; the
``failure`` attribute then holds one of the FAILURE_REASONS, which are also the metric label.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from tandem import metrics

from .layout import BlockRun, KVLayout, check_blocks, merge_runs

log = logging.getLogger("tandem.kvtransfer")

FAILURE_REASONS = (
    "bootstrap_timeout",  # nothing happened within bootstrap_timeout_s of creation
    "transfer_timeout",   # started, then no progress for transfer_timeout_s
    "aborted",            # abort() on this side
    "peer_aborted",       # the other side aborted and told us
    "peer_lost",          # the connection to the peer dropped (peer process died)
    "transfer_error",     # the backend reported an error for a posted transfer
    "rejected",           # the peer refused the request (unknown request id, wrong blocks)
    "closed",             # the engine was closed while the transfer was live
)

# Failures that start on this side: the peer is told (abort notification/frame) when possible.
LOCAL_FAILURES = ("aborted", "transfer_timeout", "bootstrap_timeout", "closed", "transfer_error")


class KVPoll(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (KVPoll.DONE, KVPoll.FAILED)


class TransferError(RuntimeError):
    """Misuse of a sender/receiver (e.g. send_layer after finish); not a transfer failure."""


@dataclass(frozen=True)
class TransferConfig:
    # Generous by default: a request may wait in the prefill queue before its first layer.
    bootstrap_timeout_s: float = 300.0
    # A started transfer that makes no progress for this long is declared dead.
    transfer_timeout_s: float = 30.0
    model: str = ""  # the metrics' "model" label


# A layer is ready to be read when this says so: a CUDA event (or anything with .query()), or a
# callable polled without blocking that returns True once the layer's pages are written.
ReadySignal = Union[Callable[[], bool], Any, None]


def is_ready(ready: ReadySignal) -> bool:
    if ready is None:
        return True
    if hasattr(ready, "query"):
        return bool(ready.query())
    return bool(ready())


@dataclass(frozen=True)
class PeerHandle:
    """What connect() learnt about a peer engine; pass it to create_sender/create_receiver."""
    name: str
    backend: str
    layout: KVLayout
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def reject_reason(body: bytes) -> tuple[str, str]:
    """A receiver's REJECT message body -> (failure reason, detail) on the sender.

    An empty body means the receiving engine does not hold the request (protocol rejection);
    otherwise the body is the receiver's own failure reason (it aborted or timed out)."""
    text = body.decode(errors="replace")
    if text in ("", "rejected"):
        return "rejected", text or "receiver does not hold the request"
    return "peer_aborted", text


def encode_info(backend: str, name: str, layout: KVLayout, extra: dict[str, Any]) -> bytes:
    """Handshake info on the wire: JSON; bytes values become {"b64": ...}."""
    enc = {k: {"b64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v
           for k, v in extra.items()}
    return json.dumps({"backend": backend, "name": name, "layout": layout.to_dict(),
                       "extra": enc}).encode()


def decode_info(info: Union[bytes, str, dict]) -> PeerHandle:
    d = json.loads(info) if isinstance(info, (bytes, str)) else info
    extra = {k: base64.b64decode(v["b64"]) if isinstance(v, dict) and "b64" in v else v
             for k, v in d.get("extra", {}).items()}
    return PeerHandle(d["name"], d["backend"], KVLayout.from_dict(d["layout"]), extra)


class _Transfer:
    """State machine, timeouts and metrics shared by senders and receivers.

    Backend threads (TCP) and the polling thread both move the state, so transitions go through
    ``_lock``; a transfer reaches a terminal state exactly once, which is what keeps the in-flight
    gauge and the failure counter honest.
    """

    direction = ""

    def __init__(self, engine: "KVTransferEngine", request_id: str):
        self.engine, self.request_id = engine, request_id
        self._lock = threading.RLock()
        self._state = KVPoll.BOOTSTRAPPING
        self.failure: Optional[str] = None
        self.failure_detail = ""
        self.created_at = time.monotonic()
        self._last_progress = self.created_at
        self._started_at: Optional[float] = None
        self.nbytes = 0  # bytes moved (sender: completed writes; receiver: as reported by sender)
        engine._metric(metrics.KV_TRANSFER_IN_FLIGHT, self.direction).inc()

    @property
    def state(self) -> KVPoll:
        return self._state

    def _touch(self) -> None:
        """Record progress: resets the stall timer, and BOOTSTRAPPING becomes TRANSFERRING."""
        with self._lock:
            now = time.monotonic()
            self._last_progress = now
            if self._state is KVPoll.BOOTSTRAPPING:
                self._state = KVPoll.TRANSFERRING
                self._started_at = now

    def _set_done(self) -> bool:
        with self._lock:
            if self._state.terminal:
                return False
            self._state = KVPoll.DONE
        now = time.monotonic()
        dur = max(now - (self._started_at or self.created_at), 1e-9)
        e = self.engine
        e._metric(metrics.KV_TRANSFER_IN_FLIGHT, self.direction).dec()
        e._metric(metrics.KV_TRANSFER_BYTES, self.direction).inc(self.nbytes)
        e._metric(metrics.KV_TRANSFER_SECONDS, self.direction).observe(dur)
        e._metric(metrics.KV_TRANSFER_GBPS, self.direction).set(self.nbytes / dur / 1e9)
        e._forget(self)
        return True

    def _fail(self, reason: str, detail: str = "") -> bool:
        """Move to FAILED (once) and release backend resources; False if already terminal."""
        assert reason in FAILURE_REASONS, reason
        with self._lock:
            if self._state.terminal:
                return False
            self._state = KVPoll.FAILED
            self.failure, self.failure_detail = reason, detail
        log.info("kv %s %s failed: %s %s", self.direction, self.request_id, reason, detail)
        e = self.engine
        e._metric(metrics.KV_TRANSFER_IN_FLIGHT, self.direction).dec()
        e._metric(metrics.KV_TRANSFER_FAILURES, self.direction, reason=reason).inc()
        try:
            self._on_failed(reason)
        finally:
            e._forget(self)
        return True

    def _on_failed(self, reason: str) -> None:
        """Backend hook: cancel what is posted, tell the peer when it makes sense."""

    def _check_timeouts(self) -> None:
        cfg, now = self.engine.config, time.monotonic()
        if self._state is KVPoll.BOOTSTRAPPING and now - self.created_at > cfg.bootstrap_timeout_s:
            self._fail("bootstrap_timeout", f"{cfg.bootstrap_timeout_s}s")
        elif (self._state is KVPoll.TRANSFERRING
              and now - self._last_progress > cfg.transfer_timeout_s):
            self._fail("transfer_timeout", f"no progress for {cfg.transfer_timeout_s}s")

    def poll(self) -> KVPoll:
        if not self._state.terminal:
            self.engine.progress()
            self._poll_backend()
            if not self._state.terminal:
                self._check_timeouts()
        return self._state

    def _poll_backend(self) -> None:
        """Backend hook run by poll(): advance posted work."""

    def abort(self, reason: str = "") -> None:
        """Stop this transfer now (FAILED, reason 'aborted'); the peer is told when possible."""
        self._fail("aborted", reason)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.request_id!r}, {self._state.name}"
                + (f", {self.failure}" if self.failure else "") + ")")


class KVSender(_Transfer):
    """Prefill side of one request: writes src_blocks of every layer into the peer's dst_blocks."""

    direction = "send"

    def __init__(self, engine: "KVTransferEngine", peer: PeerHandle, request_id: str,
                 src_blocks: Sequence[int], dst_blocks: Sequence[int]):
        check_blocks(src_blocks, engine.layout.num_blocks, "src_blocks", unique=False)
        check_blocks(dst_blocks, peer.layout.num_blocks, "dst_blocks", unique=True)
        self.runs: list[BlockRun] = merge_runs(src_blocks, dst_blocks)
        self.peer = peer
        self.num_blocks = len(src_blocks)
        self.num_descriptors = 0  # (layer, run) descriptors posted so far
        self._layers_sent: set[int] = set()
        self._finished = False
        self.payload: Optional[bytes] = None
        super().__init__(engine, request_id)

    def send_layer(self, layer: int, ready: ReadySignal = None) -> None:
        """Queue layer ``layer``'s blocks; they are posted once ``ready`` says the layer is written."""
        self.send_layers([layer], ready)

    def send_layers(self, layers: Optional[Sequence[int]] = None, ready: ReadySignal = None) -> None:
        """Queue several layers at once (all of them by default), one descriptor per (layer, run)."""
        layers = list(range(self.engine.layout.num_layers) if layers is None else layers)
        if self._finished:
            raise TransferError(f"{self.request_id}: send after finish()")
        bad = [l for l in layers if not 0 <= l < self.engine.layout.num_layers]
        dup = [l for l in layers if l in self._layers_sent]
        if bad or dup:
            raise TransferError(f"{self.request_id}: layers out of range {bad} or sent twice {dup}")
        self._layers_sent.update(layers)
        if self._state.terminal:
            return  # a failed transfer swallows further layers; the caller sees poll() == FAILED
        self._post_layers(layers, ready)

    def finish(self, payload: bytes = b"") -> None:
        """No more layers; deliver ``payload`` with completion once every posted write has landed."""
        if self._finished:
            raise TransferError(f"{self.request_id}: finish() called twice")
        missing = sorted(set(range(self.engine.layout.num_layers)) - self._layers_sent)
        if missing and not self._state.terminal:
            raise TransferError(f"{self.request_id}: finish() before layers {missing} were sent")
        self._finished = True
        self.payload = bytes(payload)
        if not self._state.terminal:
            self._post_finish()

    def writes_pending(self) -> bool:
        """finish() was called and the completion notice waits only for posted writes to land,
        which only this process's polling notices (nixl). A caller that can spare a few ms polls
        again now rather than after its next long step. False where a backend thread sends the
        notice by itself (tcp)."""
        return False

    def _post_layers(self, layers: list[int], ready: ReadySignal) -> None:
        raise NotImplementedError

    def _post_finish(self) -> None:
        raise NotImplementedError


class KVReceiver(_Transfer):
    """Decode side of one request: owns the reservation of dst_blocks until DONE or FAILED."""

    direction = "recv"

    def __init__(self, engine: "KVTransferEngine", request_id: str, dst_blocks: Sequence[int],
                 expected_peer: Optional[str]):
        check_blocks(dst_blocks, engine.layout.num_blocks, "dst_blocks", unique=True)
        self.dst_blocks = [int(b) for b in dst_blocks]
        self.expected_peer = expected_peer
        self.payload: Optional[bytes] = None
        super().__init__(engine, request_id)

    @property
    def expected_bytes(self) -> int:
        """Every layer of every reserved block: what a complete transfer delivers."""
        return len(self.dst_blocks) * self.engine.layout.num_layers * self.engine.layout.block_bytes

    def _accepts(self, peer_name: str) -> bool:
        return self.expected_peer is None or peer_name == self.expected_peer

    def _complete(self, payload: bytes) -> bool:
        """The sender says it is done: DONE if every byte arrived, else FAILED (False)."""
        if self.nbytes != self.expected_bytes:
            self._fail("transfer_error", f"completion after {self.nbytes} of "
                                         f"{self.expected_bytes} bytes")
            return False
        self.payload = payload
        return self._set_done()


class KVTransferEngine(ABC):
    """Per-process owner of the registered kv tensor and of the connections to peers."""

    backend = ""

    def __init__(self, kv: torch.Tensor, *, name: Optional[str] = None,
                 config: Optional[TransferConfig] = None):
        self.kv = kv
        self.layout = KVLayout.from_tensor(kv)
        self.name = name or f"tandem-{self.backend}-{uuid.uuid4().hex[:12]}"
        self.config = config or TransferConfig()
        self._peers: dict[str, PeerHandle] = {}
        self._senders: dict[str, KVSender] = {}
        self._receivers: dict[str, KVReceiver] = {}
        self._reg_lock = threading.RLock()
        self._closed = False

    # ---- public API -----------------------------------------------------------------------
    def handshake_info(self) -> bytes:
        """Everything a peer needs to connect(), as bytes for the control plane to carry."""
        return encode_info(self.backend, self.name, self.layout, self._handshake_extra())

    def connect(self, peer_info: Union[bytes, str, dict, PeerHandle]) -> PeerHandle:
        """Check the peer's layout against ours and open (or reuse) the connection to it."""
        peer = peer_info if isinstance(peer_info, PeerHandle) else decode_info(peer_info)
        if peer.backend != self.backend:
            raise ValueError(f"peer {peer.name} uses backend {peer.backend!r}, we use {self.backend!r}")
        self.layout.check_compatible(peer.layout)
        with self._reg_lock:
            known = self._peers.get(peer.name)
            if known is not None:
                return known
            self._connect_peer(peer)
            self._peers[peer.name] = peer
            return peer

    def create_sender(self, peer: PeerHandle, request_id: str, src_blocks: Sequence[int],
                      dst_blocks: Sequence[int]) -> KVSender:
        self._check_open()
        if peer.name not in self._peers:
            raise ValueError(f"unknown peer {peer.name!r}: connect() to it first")
        with self._reg_lock:
            self._check_unique(self._senders, request_id)
            tx = self._new_sender(peer, request_id, src_blocks, dst_blocks)
            self._senders[request_id] = tx
        return tx

    def create_receiver(self, request_id: str, dst_blocks: Sequence[int],
                        expected_peer: Union[PeerHandle, str, None] = None) -> KVReceiver:
        self._check_open()
        name = expected_peer
        if isinstance(expected_peer, PeerHandle):
            # nixl needs the sender's metadata loaded to acknowledge it; connect() is cached.
            name = self.connect(expected_peer).name
        with self._reg_lock:
            self._check_unique(self._receivers, request_id)
            rx = self._new_receiver(request_id, dst_blocks, name)
            self._receivers[request_id] = rx
        return rx

    def close(self) -> None:
        """Fail every live transfer ('closed'), drop connections, deregister memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._reg_lock:
            live = list(self._senders.values()) + list(self._receivers.values())
        for t in live:
            t._fail("closed")
        self._close_backend()

    def __enter__(self) -> "KVTransferEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def live_transfers(self) -> int:
        with self._reg_lock:
            return len(self._senders) + len(self._receivers)

    # ---- helpers for backends -------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"engine {self.name} is closed")

    @staticmethod
    def _check_unique(table: dict, request_id: str) -> None:
        # Checked before construction: a rejected duplicate must not notify the live one's peer.
        if request_id in table:
            raise ValueError(f"request {request_id!r} already has a live transfer here")

    def _forget(self, t: _Transfer) -> None:
        table = self._senders if t.direction == "send" else self._receivers
        with self._reg_lock:
            if table.get(t.request_id) is t:
                del table[t.request_id]

    def _metric(self, m, direction: str, **extra):
        return m.labels(model=self.config.model, backend=self.backend, direction=direction, **extra)

    # ---- backend hooks --------------------------------------------------------------------
    @abstractmethod
    def _handshake_extra(self) -> dict[str, Any]: ...

    @abstractmethod
    def _connect_peer(self, peer: PeerHandle) -> None: ...

    @abstractmethod
    def _new_sender(self, peer: PeerHandle, request_id: str, src_blocks: Sequence[int],
                    dst_blocks: Sequence[int]) -> KVSender: ...

    @abstractmethod
    def _new_receiver(self, request_id: str, dst_blocks: Sequence[int],
                      expected_peer: Optional[str]) -> KVReceiver: ...

    def progress(self) -> None:
        """Drain backend events (nixl notifications) and dispatch them to their transfers.

        Every poll() calls it; a worker loop should also call it once per step, so that
        requests this engine no longer holds are rejected and acks go out while no
        receiver is being polled. Cheap when there is nothing to do."""

    @abstractmethod
    def _close_backend(self) -> None: ...
