"""The router's global prefix index: which KV blocks each prefill and decode replica holds.

Data flow:
  * exact: each replica's ``KVEvents`` stream (see `tandem.router.replicas`) hands its batches to
    `PrefixIndex.apply_batch`. The first batch of a subscription is a snapshot (cleared + stored)
    and replaces what the index knew of that replica; later batches must carry consecutive ``seq``
    numbers, and a gap makes `apply_batch` return False so the caller resubscribes (and gets a
    fresh snapshot) instead of serving from a silently wrong view.
  * approximate: while a replica's stream is down, `PrefixIndex.record` (called by placement when
    it routes a prompt there) assumes the replica caches every full block of that prompt for
    ``ttl`` seconds. When a stream drops, what the index last knew exactly decays the same way.
  * query: `PrefixIndex.match` walks a prompt's chained block hashes (tandem.engine.hashing, the
    hash the workers' events carry) and reports, per replica, how many *leading* full blocks it
    holds. The walk stops at the first block no replica holds, so a prompt nobody has seen costs
    one hash and one dict lookup.

Layout: ``owners`` maps block hash -> bitmask of replica slots (a Python int; 16 replicas fit in
one machine word), so one dict lookup per block answers for every replica at once. Per slot,
``held`` maps hash -> expiry (``inf`` while exact). Approximate expiries sit in a FIFO (one TTL
for all, so insertion order is expiry order) swept lazily on every record/match.

Single-threaded by design: everything runs on the router's asyncio loop.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from tandem.engine.hashing import ROOT_HASH

log = logging.getLogger("tandem.router.index")

INF = math.inf


def iter_chain_hashes(tokens, block_size: int, chunk_blocks: int = 8) -> Iterator[int]:
    """The hashes of ``tandem.engine.hashing.chain_hashes(tokens, block_size)``, lazily.

    Same definition (BLAKE2b-64 over u64_le(parent) || u32_le tokens), but the tokens are encoded
    ``chunk_blocks`` blocks at a time so the caller can stop early: the index walk usually needs
    only the blocks some replica holds, and encoding a whole 8k-token prompt up front would cost
    more than the walk. tests/router checks it against chain_hashes."""
    n_full = len(tokens) // block_size
    parent = ROOT_HASH.to_bytes(8, "little")
    blake = hashlib.blake2b
    step = 4 * block_size
    for b0 in range(0, n_full, chunk_blocks):
        nb = min(chunk_blocks, n_full - b0)
        buf = _packer(nb * block_size)(*tokens[b0 * block_size:(b0 + nb) * block_size])
        for off in range(0, nb * step, step):
            parent = blake(parent + buf[off:off + step], digest_size=8).digest()
            yield int.from_bytes(parent, "little")


@functools.lru_cache(maxsize=64)
def _packer(n: int):
    return struct.Struct(f"<{n}I").pack


@dataclass
class SlotState:
    endpoint: str
    pool: str
    exact: bool = False
    seq: int | None = None          # last applied seq of the live subscription (None: none yet)
    warned_block_size: bool = False


class PrefixIndex:
    def __init__(self, block_size: int = 16, ttl: float = 120.0,
                 clock: Callable[[], float] = time.monotonic, max_approx_blocks: int = 1 << 20):
        self.block_size = block_size
        self.ttl = ttl
        self.clock = clock
        self.max_approx_blocks = max_approx_blocks
        self.owners: dict[int, int] = {}              # block hash -> bitmask of slots
        self.held: list[dict[int, float]] = []        # slot -> {hash: expiry (inf = exact)}
        self.slots: list[SlotState | None] = []
        self.slot_of: dict[str, int] = {}             # endpoint -> slot
        self._expiry: deque[tuple[float, int, int]] = deque()   # (expiry, slot, hash), FIFO
        self.on_mode_change: Callable[[str, bool], None] | None = None

    # ---- replicas ------------------------------------------------------------------------------
    def add_replica(self, endpoint: str, pool: str) -> int:
        if endpoint in self.slot_of:
            return self.slot_of[endpoint]
        try:
            slot = self.slots.index(None)       # reuse a freed slot: keeps the masks short
        except ValueError:
            slot = len(self.slots)
            self.slots.append(None)
            self.held.append({})
        self.slots[slot] = SlotState(endpoint, pool)
        self.slot_of[endpoint] = slot
        return slot

    def remove_replica(self, endpoint: str) -> None:
        slot = self.slot_of.pop(endpoint, None)
        if slot is None:
            return
        self._clear_slot(slot)
        self.slots[slot] = None

    def is_exact(self, endpoint: str) -> bool:
        slot = self.slot_of.get(endpoint)
        return slot is not None and self.slots[slot].exact

    def blocks_of(self, endpoint: str) -> int:
        slot = self.slot_of.get(endpoint)
        return 0 if slot is None else len(self.held[slot])

    def set_approximate(self, endpoint: str) -> None:
        """The replica's event stream is gone: from now on its entries expire after ``ttl`` and
        routing history (`record`) feeds it. Idempotent."""
        slot = self.slot_of.get(endpoint)
        if slot is None:
            return
        st = self.slots[slot]
        st.seq = None
        if not st.exact:
            return
        st.exact = False
        expiry = self.clock() + self.ttl
        held = self.held[slot]
        for h in held:
            held[h] = expiry
            self._expiry.append((expiry, slot, h))
        self._mode_changed(st)

    def _mode_changed(self, st: SlotState) -> None:
        log.info("prefix index for %s %s is now %s", st.pool, st.endpoint,
                 "exact (KV events)" if st.exact else "approximate (routing history)")
        if self.on_mode_change is not None:
            self.on_mode_change(st.endpoint, st.exact)

    # ---- exact: KV events ------------------------------------------------------------------------
    def apply_batch(self, endpoint: str, seq: int, events: Iterable, snapshot: bool = False) -> bool:
        """Apply one KVEventBatch's events (``tandem.v1`` messages or tandem.engine.kv_events
        dataclasses). ``snapshot``: the first batch of a subscription. Returns False, applying
        nothing, when ``seq`` does not follow the last one: the caller must resubscribe."""
        slot = self.slot_of.get(endpoint)
        if slot is None:
            return True           # replica left while its stream was still delivering
        st = self.slots[slot]
        if snapshot:
            self._clear_slot(slot)
        elif st.seq is None or seq != st.seq + 1:
            log.warning("KV events from %s: seq %s after %s; resubscribing", endpoint, seq, st.seq)
            return False
        st.seq = seq
        for ev in events:
            kind = getattr(ev, "type", None) or ev.WhichOneof("event")
            if kind == "stored":
                e = getattr(ev, "stored", ev)
                if e.block_size and e.block_size != self.block_size and not st.warned_block_size:
                    st.warned_block_size = True
                    log.warning("%s stores %d-token blocks, the index hashes %d-token blocks: "
                                "its prefix matches will be missed", endpoint, e.block_size, self.block_size)
                self._store(slot, e.block_hashes, INF)
            elif kind == "removed":
                self._remove(slot, getattr(ev, "removed", ev).block_hashes)
            elif kind == "cleared":
                self._clear_slot(slot)
        if not st.exact:
            st.exact = True
            self._mode_changed(st)
        return True

    def _store(self, slot: int, hashes: Iterable[int], expiry: float) -> None:
        bit = 1 << slot
        owners, held = self.owners, self.held[slot]
        for h in hashes:
            owners[h] = owners.get(h, 0) | bit
            held[h] = expiry

    def _remove(self, slot: int, hashes: Iterable[int]) -> None:
        keep = ~(1 << slot)
        owners, held = self.owners, self.held[slot]
        for h in hashes:
            if held.pop(h, None) is None:
                continue
            m = owners.get(h, 0) & keep
            if m:
                owners[h] = m
            else:
                owners.pop(h, None)

    def _clear_slot(self, slot: int) -> None:
        held = self.held[slot]
        self._remove(slot, list(held))
        held.clear()

    # ---- approximate: routing history ------------------------------------------------------------
    def record(self, endpoint: str, token_ids, hashes: list[int] | None = None) -> None:
        """Placement routed ``token_ids`` to ``endpoint``: if its index is approximate, assume it
        now caches every full block of the prompt for ``ttl`` seconds (a live event stream is
        the truth otherwise, and this is a no-op)."""
        slot = self.slot_of.get(endpoint)
        if slot is None or self.slots[slot].exact:
            return
        now = self.clock()
        self.expire(now)
        expiry = now + self.ttl
        hs = hashes if hashes is not None else list(iter_chain_hashes(token_ids, self.block_size))
        self._store(slot, hs, expiry)
        self._expiry.extend((expiry, slot, h) for h in hs)
        # bound memory if the TTL is long and traffic heavy: drop the oldest history first
        while len(self._expiry) > self.max_approx_blocks:
            self._expire_one(self._expiry.popleft(), force=True)

    def expire(self, now: float | None = None) -> None:
        q = self._expiry
        if not q:
            return
        now = self.clock() if now is None else now
        while q and q[0][0] <= now:
            self._expire_one(q.popleft())

    def _expire_one(self, item: tuple[float, int, int], force: bool = False) -> None:
        expiry, slot, h = item
        # skip stale FIFO entries: the block was re-recorded later, or the slot became exact
        if self.held[slot].get(h) == expiry or (force and self.held[slot].get(h, INF) != INF):
            self._remove(slot, (h,))

    # ---- query -----------------------------------------------------------------------------------
    def match(self, token_ids, limit_mask: int = -1) -> tuple[dict[int, int], int]:
        """Longest cached prefix per replica slot: ({slot: leading full blocks held}, blocks
        hashed). Slots holding nothing of the prompt are absent. ``limit_mask`` restricts the
        walk to some slots (e.g. the healthy, not excluded ones), so it stops sooner."""
        self.expire()
        owners = self.owners
        alive = limit_mask
        depth = 0
        out: dict[int, int] = {}
        for h in iter_chain_hashes(token_ids, self.block_size):
            m = owners.get(h, 0) & alive
            if m != alive:
                if depth:
                    _assign(out, alive & ~m, depth)
                alive = m
                if not m:
                    break
            depth += 1
        else:
            if depth and alive:
                _assign(out, alive, depth)
        return out, depth

    def match_endpoints(self, token_ids) -> dict[str, int]:
        """{endpoint: cached prefix tokens} for every replica holding some of the prompt."""
        blocks, _ = self.match(token_ids)
        return {self.slots[s].endpoint: n * self.block_size for s, n in blocks.items()}

    def mask_of(self, endpoints: Iterable[str]) -> int:
        m = 0
        for e in endpoints:
            s = self.slot_of.get(e)
            if s is not None:
                m |= 1 << s
        return m

    def __len__(self) -> int:
        return len(self.owners)


def _assign(out: dict[int, int], mask: int, depth: int) -> None:
    while mask:
        low = mask & -mask
        out[low.bit_length() - 1] = depth
        mask ^= low
