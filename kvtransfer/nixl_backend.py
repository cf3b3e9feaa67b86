"""NIXL backend: one-sided WRITEs from the prefill's kv tensor into the decode's, over UCX.

Flow for one request:

    prefill (initiator)                                decode (target)
    register kv once; add_remote_agent(decode md)      register kv once; add_remote_agent(prefill md)
    send_layer(l, ready) -> queued until ready
      ready -> initialize_xfer(WRITE, merged runs of
               layer l, notif "L|rid") ; transfer()  ==> bytes land in kv, no CPU on this side
    poll(): check_xfer_state -> DONE, release handle   get_new_notifs(): "L|rid" -> TRANSFERRING
    finish(payload); once all writes DONE:
      send_notif("D|rid|nbytes|payload")          -->  "D|rid" -> DONE, payload; send_notif("K|rid")
    "K|rid" -> DONE                               <--

Writes are posted per layer (or per send_layers() call) with ``initialize_xfer`` over descriptors
that ``merge_runs`` already merged, so a request of n consecutive blocks costs one descriptor per
layer. The completion notification is sent only after every write of the request reports DONE,
because notifications of separate transfers are not ordered with each other's data. The ack ("K")
lets the sender tell a delivered transfer from one written into a dead process's memory.

All notifications of an engine are drained in one place (``progress``) and dispatched by request
id, since one agent serves every receiver and sender of the process. A nixl receiver cannot stop
writes already posted by its peer: after a decode-side abort, in-flight WRITEs may still land in
the aborted request's blocks (see ``NixlReceiver``).
"""

from __future__ import annotations

import collections
import logging
import struct
from typing import Any, Optional, Sequence

import numpy as np

from .base import (LOCAL_FAILURES, KVReceiver, KVSender, KVTransferEngine, PeerHandle,
                   ReadySignal, TransferConfig, is_ready, reject_reason)
from .layout import byte_ranges

log = logging.getLogger("tandem.kvtransfer.nixl")

# Notification kinds (first byte). Sender -> receiver: L layer landed, D done (+payload),
# A sender aborted. Receiver -> sender: K ack of D, R receiver aborted / rejected the request.
_LAYER, _DONE, _ABORT, _ACK, _REJECT = b"L", b"D", b"A", b"K", b"R"
_NBYTES = struct.Struct("<Q")


def _reason(exc: Exception) -> str:
    # UCX tells a vanished peer apart from other errors; report it as such.
    return "peer_lost" if "REMOTE_DISCONNECT" in repr(exc) else "transfer_error"


def _msg(kind: bytes, rid: str, body: bytes = b"") -> bytes:
    return kind + rid.encode() + b"\0" + body


def _parse(msg: bytes) -> tuple[bytes, str, bytes]:
    rid, _, body = msg[1:].partition(b"\0")
    return msg[:1], rid.decode(), body


class NixlEngine(KVTransferEngine):
    backend = "nixl"

    def __init__(self, kv, *, name: Optional[str] = None, config: Optional[TransferConfig] = None,
                 nixl_backends: Sequence[str] = ("UCX",)):
        super().__init__(kv, name=name, config=config)
        from nixl._api import nixl_agent, nixl_agent_config  # optional dependency

        self.agent = nixl_agent(self.name, nixl_agent_config(backends=list(nixl_backends)))
        # One registration of the whole tensor: every block of every layer lies inside it, so
        # any merged run is a valid descriptor without per-request registration.
        self._reg = self.agent.register_memory(kv)
        self.mem_type = "VRAM" if kv.is_cuda else "DRAM"
        self.dev_id = (kv.device.index or 0) if kv.is_cuda else 0
        self.base = kv.data_ptr()

    def _handshake_extra(self) -> dict[str, Any]:
        return {"agent_metadata": self.agent.get_agent_metadata(), "base_addr": self.base,
                "dev_id": self.dev_id, "mem_type": self.mem_type}

    def _connect_peer(self, peer: PeerHandle) -> None:
        name = self.agent.add_remote_agent(peer.extra["agent_metadata"])
        # add_remote_agent returns bytes, while notifications are keyed by str.
        name = name.decode() if isinstance(name, bytes) else name
        if name != peer.name:
            raise ValueError(f"nixl agent calls itself {name!r}, handshake says {peer.name!r}")

    def _new_sender(self, peer, request_id, src_blocks, dst_blocks) -> "NixlSender":
        return NixlSender(self, peer, request_id, src_blocks, dst_blocks)

    def _new_receiver(self, request_id, dst_blocks, expected_peer) -> "NixlReceiver":
        return NixlReceiver(self, request_id, dst_blocks, expected_peer)

    def _notify(self, peer_name: str, msg: bytes) -> bool:
        try:
            self.agent.send_notif(peer_name, msg)
            return True
        except Exception as e:  # peer unknown (never connected) or gone
            log.warning("nixl: notification to %s failed: %s", peer_name, e)
            return False

    def progress(self) -> None:
        # The one place notifications are drained: get_new_notifs() hands each message out once,
        # so dispatching here keeps receivers from stealing each other's messages.
        with self._reg_lock:
            if self._closed:
                return
            for peer_name, msgs in self.agent.get_new_notifs().items():
                for m in msgs:
                    self._dispatch(peer_name, m)

    def _dispatch(self, peer: str, msg: bytes) -> None:
        kind, rid, body = _parse(msg)
        if kind in (_LAYER, _DONE, _ABORT):
            rx = self._receivers.get(rid)
            if rx is None or not rx._accepts(peer):
                if rx is not None:
                    log.warning("nixl: %s from %s for %s, which expects %s", kind, peer, rid,
                                rx.expected_peer)
                if kind != _ABORT:  # stop a sender writing for a request we no longer hold
                    self._notify(peer, _msg(_REJECT, rid))
                return
            rx._on_notif(peer, kind, body)
        elif kind in (_ACK, _REJECT):
            tx = self._senders.get(rid)
            if tx is not None and tx.peer.name == peer:
                if kind == _ACK:
                    tx._set_done()
                else:
                    tx._fail(*reject_reason(body))
        else:
            log.warning("nixl: unknown notification %r from %s", msg[:32], peer)

    def _close_backend(self) -> None:
        for name in list(self._peers):
            try:
                self.agent.remove_remote_agent(name)
            except Exception as e:
                log.debug("nixl: remove_remote_agent(%s): %s", name, e)
        self._peers.clear()
        try:
            self.agent.deregister_memory(self._reg)
        except Exception as e:
            log.warning("nixl: deregister_memory: %s", e)
        self.agent = None


class NixlSender(KVSender):
    engine: NixlEngine

    def __init__(self, engine: NixlEngine, peer, request_id, src_blocks, dst_blocks):
        super().__init__(engine, peer, request_id, src_blocks, dst_blocks)
        self._pending: collections.deque = collections.deque()  # (layers, ready) not yet posted
        self._handles: list = []  # (xfer handle, nbytes) posted, not yet DONE
        self._done_sent = False
        x = peer.extra
        self._remote = (int(x["base_addr"]), int(x["dev_id"]), x["mem_type"])

    def _post_layers(self, layers: list[int], ready: ReadySignal) -> None:
        self._pending.append((layers, ready))
        self._poll_backend()

    def _post_finish(self) -> None:
        self._poll_backend()

    def writes_pending(self) -> bool:
        return self._finished and not self._done_sent and not self._state.terminal

    def _pump(self) -> None:
        """Post queued layers whose ready signal has fired, in order (events fire in order).

        Every layer that is ready by now goes out in ONE transfer request: NIXL/UCX pay a fixed
        cost per request (descriptor setup, completion tracking, a notification), which at
        NVLink speeds costs more than moving a layer's pages. Layers become ready one by one
        while the model is ahead of the poller, and all at once when it is behind; either way
        nothing waits for a later layer.
        """
        e = self.engine
        batch: list[int] = []
        while self._pending and not self._state.terminal:
            layers, ready = self._pending[0]
            try:
                if not is_ready(ready):
                    break
            except Exception as exc:
                self._fail("transfer_error", f"ready signal raised {exc!r}")
                return
            self._pending.popleft()
            batch.extend(layers)
        if not batch or self._state.terminal:
            return
        rows = byte_ranges(self.runs, batch, e.layout, self.peer.layout)
        if not len(rows):
            return
        rbase, rdev, rmem = self._remote
        local = np.stack([rows[:, 0] + e.base, rows[:, 2],
                          np.full(len(rows), e.dev_id)], axis=1).astype(np.uint64)
        remote = np.stack([rows[:, 1] + rbase, rows[:, 2],
                           np.full(len(rows), rdev)], axis=1).astype(np.uint64)
        try:
            h = e.agent.initialize_xfer(
                "WRITE", e.agent.get_xfer_descs(local, e.mem_type),
                e.agent.get_xfer_descs(remote, rmem), self.peer.name,
                _msg(_LAYER, self.request_id))
            st = e.agent.transfer(h)
        except Exception as exc:
            self._fail(_reason(exc), f"post: {exc!r}")
            return
        self._handles.append((h, int(rows[:, 2].sum())))
        self.num_descriptors += len(rows)
        self._touch()
        if st == "ERR":
            self._fail("transfer_error", "transfer() returned ERR")

    def _poll_backend(self) -> None:
        e = self.engine
        self._pump()
        remaining, error = [], False
        for h, n in self._handles:
            st = "PROC" if error or self._state.terminal else e.agent.check_xfer_state(h)
            if st == "PROC":
                remaining.append((h, n))
                continue
            e.agent.release_xfer_handle(h)
            if st == "DONE":
                self.nbytes += n
                self._touch()
            else:
                error = True
        self._handles = remaining
        if error:
            self._fail("transfer_error", "check_xfer_state returned ERR")
        if self._state.terminal:
            return
        if self._finished and not self._pending and not self._handles and not self._done_sent:
            # Every write is complete at the target, so the notification cannot overtake data.
            self._done_sent = True
            self._touch()
            if not e._notify(self.peer.name, _msg(_DONE, self.request_id,
                                                  _NBYTES.pack(self.nbytes) + self.payload)):
                self._fail("peer_lost", "could not send completion")

    def _on_failed(self, reason: str) -> None:
        e = self.engine
        for h, _ in self._handles:
            try:
                # Releasing a handle still in flight asks the backend to cancel it.
                e.agent.release_xfer_handle(h)
            except Exception as exc:
                # Dropping it is enough: the handle's finalizer queues it on the agent, which
                # releases it again when the agent goes.
                log.warning("nixl: %s: could not cancel an in-flight transfer: %s",
                            self.request_id, exc)
        self._handles.clear()
        self._pending.clear()
        if reason in LOCAL_FAILURES:
            e._notify(self.peer.name, _msg(_ABORT, self.request_id, reason.encode()))


class NixlReceiver(KVReceiver):
    """Learns about its transfer only through notifications: the data itself arrives one-sided.

    abort() tells the sender (when known) to stop, but writes it already posted may still land in
    dst_blocks: the engine should not hand those blocks to another request until the sender's
    transfer timeout has passed.
    """

    engine: NixlEngine

    def __init__(self, engine, request_id, dst_blocks, expected_peer):
        super().__init__(engine, request_id, dst_blocks, expected_peer)
        self._sender_name: Optional[str] = expected_peer

    def _on_notif(self, peer: str, kind: bytes, body: bytes) -> None:
        self._sender_name = peer
        if kind == _LAYER:
            self._touch()
        elif kind == _DONE:
            # One-sided writes leave no count here: trust the sender's, checked against the
            # reservation so that a sender which skipped layers cannot complete the request.
            self.nbytes = _NBYTES.unpack_from(body)[0]
            self._touch()
            if self._complete(body[_NBYTES.size:]):
                self.engine._notify(peer, _msg(_ACK, self.request_id))
        elif kind == _ABORT:
            self._fail("peer_aborted", body.decode(errors="replace"))

    def _on_failed(self, reason: str) -> None:
        if self._sender_name and reason != "peer_aborted":
            self.engine._notify(self._sender_name, _msg(_REJECT, self.request_id, reason.encode()))
