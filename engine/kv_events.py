"""KV cache events: which blocks a worker holds, for the router's prefix index.

The block pool calls `KVEventPublisher.stored` / `removed` as blocks enter and leave the prefix
cache. Events are appended to the current batch; `flush()` (once per engine step) stamps the batch
with the next sequence number and hands it to every subscriber. Sequence numbers are consecutive
per publisher, so a subscriber that sees a gap knows it missed events and must resynchronise
(the publisher can always produce a full snapshot with `snapshot()`).

Subscribers are in-process queues (`subscribe()`); servers forward them to other processes
(the worker's gRPC KV-event stream, or `serve_events_tcp` below: newline-delimited JSON).
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from dataclasses import asdict, dataclass, field


@dataclass
class BlockStored:
    block_hashes: list[int]
    parent_hash: int | None
    token_ids: list[int]
    block_size: int
    type: str = "stored"


@dataclass
class BlockRemoved:
    block_hashes: list[int]
    type: str = "removed"


@dataclass
class AllBlocksCleared:
    type: str = "cleared"


@dataclass
class EventBatch:
    seq: int
    ts: float
    events: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"seq": self.seq, "ts": self.ts, "events": [asdict(e) for e in self.events]})


class KVEventPublisher:
    def __init__(self, max_queue: int = 10000):
        self._pending: list = []
        self._seq = 0
        self._subs: list[queue.Queue] = []
        self._lock = threading.Lock()
        self._max_queue = max_queue
        self.snapshot_fn = None   # set by the block pool: () -> list[BlockStored]

    def stored(self, block_hash: int, parent_hash: int | None, token_ids, block_size: int) -> None:
        if self._subs:
            self._pending.append(BlockStored([block_hash], parent_hash, list(token_ids), block_size))

    def removed(self, block_hash: int) -> None:
        if self._subs:
            self._pending.append(BlockRemoved([block_hash]))

    def cleared(self) -> None:
        if self._subs:
            self._pending.append(AllBlocksCleared())

    def subscribe(self) -> queue.Queue:
        """A queue of `EventBatch`; its first item is a snapshot of the cache (seq of that time)."""
        q: queue.Queue = queue.Queue(maxsize=self._max_queue)
        with self._lock:
            snap = self.snapshot_fn() if self.snapshot_fn else []
            q.put(EventBatch(self._seq, time.time(), [AllBlocksCleared(), *snap]))
            self._subs.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)

    def flush(self) -> None:
        if not self._pending:
            return
        with self._lock:
            self._seq += 1
            batch = EventBatch(self._seq, time.time(), self._pending)
            self._pending = []
            for q in list(self._subs):
                try:
                    q.put_nowait(batch)
                except queue.Full:
                    # A subscriber that cannot keep up is dropped; it sees the connection end
                    # and resubscribes (getting a fresh snapshot) rather than a silent gap.
                    self._subs.remove(q)
                    with q.mutex:
                        q.queue.clear()
                    q.put_nowait(None)


def serve_events_tcp(publisher: KVEventPublisher, host: str = "127.0.0.1", port: int = 0):
    """Streams event batches as JSON lines to every TCP client; returns (server socket, port).

    For debugging and for consumers without gRPC; the serving path uses the worker's gRPC stream.
    """
    srv = socket.create_server((host, port))
    srv.settimeout(0.5)

    def client(conn):
        q = publisher.subscribe()
        try:
            while True:
                batch = q.get()
                if batch is None:
                    break
                conn.sendall((batch.to_json() + "\n").encode())
        except OSError:
            pass
        finally:
            publisher.unsubscribe(q)
            conn.close()

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=client, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv, srv.getsockname()[1]
