"""The paged KV cache's bookkeeping: a pool of fixed-size blocks with reference counts and a
prefix cache keyed by chained block hashes (`tandem.engine.hashing`).

Life of a block: `allocate` takes it from the free list (evicting its cached identity if it had
one), requests hold references, and `free` returns it to the *end* of the free list while keeping
its hash, so it can still be hit until it is the least recently freed block and gets reused (LRU).
`cache_full_blocks` publishes blocks whose KV has been computed; `match_prefix` finds the longest
run of a new prompt's full blocks that is cached, checking the stored tokens, not only hashes.

Block 0 is reserved and never handed out: padded batch slots (CUDA graphs) write there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tandem.engine.hashing import ROOT_HASH, block_hash
from tandem.engine.kv_events import BlockStored, KVEventPublisher


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    NULL_BLOCK = 0

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 events: KVEventPublisher | None = None):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.blocks[0].ref_count = 1  # the null block is permanently taken
        # Insertion order is LRU order: allocation pops from the front, frees append to the back.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[int, int] = {}   # hash -> block id
        self.events = events or KVEventPublisher()
        self.events.snapshot_fn = self._snapshot

    # ---- capacity -----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks with no reference (cached ones included: they can be reclaimed)."""
        return len(self._free)

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        return 1.0 - self.num_free / self.usable_blocks

    # ---- allocation ---------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"need {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            blk = self.blocks[bid]
            if blk.hash is not None:
                self._evict(blk)
            blk.ref_count = 1
            out.append(bid)
        return out

    def free(self, block_ids: list[int]) -> None:
        # Reverse order: a sequence's tail blocks are the least likely to be shared, so they
        # should be evicted first.
        for bid in reversed(block_ids):
            blk = self.blocks[bid]
            assert blk.ref_count > 0, f"double free of block {bid}"
            blk.ref_count -= 1
            if blk.ref_count == 0:
                if blk.hash is None:
                    # Uncached blocks are worthless: reuse them before cached ones.
                    self._free[bid] = None
                    self._free.move_to_end(bid, last=False)
                else:
                    self._free[bid] = None

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference to cached blocks (a prefix hit)."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_count == 0:
                del self._free[bid]
            blk.ref_count += 1

    # ---- prefix cache -------------------------------------------------------------------------
    def match_prefix(self, token_ids, hashes: list[int]) -> list[int]:
        """Block ids of the longest cached prefix. ``hashes`` are the chained hashes of the
        prompt's full blocks. Does not take references (call `touch`)."""
        if not self.enable_caching:
            return []
        bs = self.block_size
        out = []
        for i, h in enumerate(hashes):
            bid = self._cached.get(h)
            if bid is None:
                break
            if self.blocks[bid].token_ids != tuple(token_ids[i * bs:(i + 1) * bs]):
                break  # a 64-bit collision: never serve another prompt's KV
            out.append(bid)
        return out

    def cache_full_blocks(self, block_ids: list[int], range_tokens, hashes: list[int],
                          start: int, end: int) -> None:
        """Publish blocks ``start..end-1`` of a sequence (their KV is computed);
        ``range_tokens`` are the tokens of exactly those blocks."""
        if not self.enable_caching:
            return
        bs = self.block_size
        for i in range(start, end):
            blk = self.blocks[block_ids[i]]
            if blk.hash is not None:
                continue  # already cached (a prefix hit, or published before preemption)
            h = hashes[i]
            if h in self._cached:
                continue  # an identical block exists; this copy stays private
            parent = hashes[i - 1] if i > 0 else ROOT_HASH
            blk.hash, blk.parent_hash = h, parent
            j = i - start
            blk.token_ids = tuple(range_tokens[j * bs:(j + 1) * bs])
            self._cached[h] = blk.block_id
            self.events.stored(h, parent if i > 0 else None, blk.token_ids, bs)

    def _evict(self, blk: Block) -> None:
        if self._cached.get(blk.hash) == blk.block_id:
            del self._cached[blk.hash]
            self.events.removed(blk.hash)
        blk.hash = blk.parent_hash = blk.token_ids = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block not in use. Returns False if some are still referenced."""
        if any(b.ref_count for b in self.blocks[1:]):
            return False
        for blk in self.blocks[1:]:
            if blk.hash is not None:
                blk.hash = blk.parent_hash = blk.token_ids = None
        self._cached.clear()
        self.events.cleared()
        return True

    def _snapshot(self) -> list[BlockStored]:
        return [BlockStored([b.hash], b.parent_hash if b.parent_hash != ROOT_HASH else None,
                            list(b.token_ids), self.block_size)
                for b in self.blocks if b.hash is not None and self._cached.get(b.hash) == b.block_id]

    def check_invariants(self, live_refs: dict[int, int] | None = None) -> None:
        """Asserts the pool is consistent; with ``live_refs`` (block -> expected references),
        that reference counts match exactly (no leaks)."""
        for blk in self.blocks[1:]:
            in_free = blk.block_id in self._free
            assert (blk.ref_count == 0) == in_free, f"block {blk.block_id}: ref {blk.ref_count}, free {in_free}"
            if live_refs is not None:
                assert blk.ref_count == live_refs.get(blk.block_id, 0), \
                    f"block {blk.block_id}: ref {blk.ref_count} != {live_refs.get(blk.block_id, 0)}"
        for h, bid in self._cached.items():
            assert self.blocks[bid].hash == h
        if self.enable_caching:
            for blk in self.blocks[1:]:
                if blk.hash is not None and blk.token_ids is not None:
                    assert block_hash(blk.parent_hash or ROOT_HASH, blk.token_ids) == blk.hash
