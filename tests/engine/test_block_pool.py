"""Block pool invariants, the prefix cache's LRU and verification, and KV events (in process and
to another process over TCP)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import pytest

from tandem.engine.block_pool import BlockPool, NoFreeBlocksError
from tandem.engine.hashing import ROOT_HASH, block_hash, chain_hashes
from tandem.engine.kv_events import BlockRemoved, BlockStored, KVEventPublisher, serve_events_tcp

BS = 4


def test_hash_is_chained_and_stable():
    toks = list(range(12))
    hs = chain_hashes(toks, BS)
    assert len(hs) == 3
    assert hs[0] == block_hash(ROOT_HASH, toks[:4])
    assert hs[2] == block_hash(hs[1], toks[8:12])
    # The documented definition, computed independently: the hash is a cross-process protocol.
    digest = hashlib.blake2b((0).to_bytes(8, "little") + struct.pack("<4I", 1, 2, 3, 4),
                             digest_size=8).digest()
    assert block_hash(0, [1, 2, 3, 4]) == int.from_bytes(digest, "little") == 0x09222804E3E39BA2
    assert chain_hashes([9, 9, 9, 9, 1], BS) == chain_hashes([9, 9, 9, 9, 2], BS)   # partial block ignored
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS)[1] != chain_hashes([0, 2, 3, 4, 5, 6, 7, 8], BS)[1]


def test_allocate_free_and_refcounts():
    pool = BlockPool(8, BS)
    assert pool.num_free == 7                      # block 0 is reserved
    a = pool.allocate(3)
    assert 0 not in a and pool.num_free == 4
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(5)
    pool.free(a)
    assert pool.num_free == 7
    with pytest.raises(AssertionError, match="double free"):
        pool.free(a[:1])
    pool.check_invariants(live_refs={})


def test_prefix_hits_lru_and_eviction_events():
    ev = KVEventPublisher()
    q = ev.subscribe()
    pool = BlockPool(6, BS, events=ev)
    toks = list(range(100, 112))
    hs = chain_hashes(toks, BS)
    blocks = pool.allocate(3)
    pool.cache_full_blocks(blocks, toks, hs, 0, 3)
    ev.flush()
    q.get()                                           # initial (empty) snapshot
    batch = q.get()
    assert [type(e) for e in batch.events] == [BlockStored] * 3
    assert batch.events[1].parent_hash == hs[0] and batch.events[0].parent_hash is None
    pool.free(blocks)
    assert pool.match_prefix(toks, hs) == blocks      # still cached after free
    hit = pool.match_prefix(toks, hs)[:2]
    pool.touch(hit)
    assert pool.blocks[hit[0]].ref_count == 1
    # 5 usable blocks: 2 held, 1 cached-free, 2 never used. Allocating 3 evicts the cached one.
    new = pool.allocate(3)
    assert blocks[2] in new
    ev.flush()
    removed = q.get().events
    assert removed == [BlockRemoved([hs[2]])]
    assert pool.match_prefix(toks, hs) == hit         # the first two survive
    pool.free(new)
    pool.free(hit)
    pool.check_invariants(live_refs={})


def test_lru_evicts_least_recently_freed_tail_first():
    pool = BlockPool(7, BS)
    t1, t2 = list(range(8)), list(range(50, 58))
    b1, b2 = pool.allocate(2), pool.allocate(2)
    pool.cache_full_blocks(b1, t1, chain_hashes(t1, BS), 0, 2)
    pool.cache_full_blocks(b2, t2, chain_hashes(t2, BS), 0, 2)
    pool.free(b1)
    pool.free(b2)
    # 2 never-used blocks go first, then sequence 1's tail block, then its head.
    got = pool.allocate(3)
    assert b1[1] in got and b1[0] not in got
    assert pool.match_prefix(t2, chain_hashes(t2, BS)) == b2


def test_token_mismatch_is_never_served():
    pool = BlockPool(4, BS)
    toks = [1, 2, 3, 4]
    b = pool.allocate(1)
    pool.cache_full_blocks(b, toks, chain_hashes(toks, BS), 0, 1)
    # Simulate a hash collision: same hash, other tokens.
    assert pool.match_prefix([9, 9, 9, 9], chain_hashes(toks, BS)) == []


def test_events_reach_another_process_over_tcp():
    ev = KVEventPublisher()
    pool = BlockPool(4, BS, events=ev)
    srv, port = serve_events_tcp(ev)
    reader = subprocess.Popen(
        [sys.executable, "-c",
         "import socket,sys; s=socket.create_connection(('127.0.0.1',%d)); f=s.makefile();"
         "[print(f.readline(), end='', flush=True) for _ in range(2)]" % port],
        stdout=subprocess.PIPE, text=True)
    try:
        snap = json.loads(reader.stdout.readline())   # the subscription's snapshot
        assert snap["events"][0]["type"] == "cleared"
        toks = [5, 6, 7, 8]
        b = pool.allocate(1)
        pool.cache_full_blocks(b, toks, chain_hashes(toks, BS), 0, 1)
        ev.flush()
        batch = json.loads(reader.stdout.readline())
        assert batch["seq"] == snap["seq"] + 1
        assert batch["events"] == [{"type": "stored", "block_hashes": chain_hashes(toks, BS),
                                    "parent_hash": None, "token_ids": toks, "block_size": BS}]
    finally:
        reader.kill()
        srv.close()
