"""The prefix index (tandem.router.index) on its own: events in, longest-prefix matches out."""

from __future__ import annotations

import random

import numpy as np

from tandem.engine.hashing import chain_hashes
from tandem.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KVEventPublisher
from tandem.proto.convert import events_to_proto
from tandem.router.index import PrefixIndex, iter_chain_hashes

BS = 4


def prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(1, 50000) for _ in range(n)]


def stored(tokens, upto=None):
    hs = chain_hashes(tokens, BS)[:upto]
    return [BlockStored([h], None, [], BS) for h in hs]


def test_lazy_hashes_equal_engine_hashes():
    for n in (0, 3, 4, 17, 64, 1001):
        t = prompt(n, n)
        assert list(iter_chain_hashes(t, BS)) == chain_hashes(t, BS)
        assert list(iter_chain_hashes(np.array(t, dtype=np.int64), 16)) == chain_hashes(t, 16)


def test_stored_removed_cleared():
    idx = PrefixIndex(BS)
    a, b = idx.add_replica("a:1", "prefill"), idx.add_replica("b:1", "prefill")
    t = prompt(40)                                   # 10 full blocks
    assert idx.apply_batch("a:1", 0, [AllBlocksCleared()], snapshot=True)
    assert idx.apply_batch("a:1", 1, stored(t))       # a holds all 10
    assert idx.apply_batch("b:1", 5, stored(t, 3), snapshot=True)   # b holds the first 3
    assert idx.match(t) == ({a: 10, b: 3}, 10)
    assert idx.match_endpoints(t) == {"a:1": 40, "b:1": 12}
    # a loses block 4: its *leading* run is now 4 blocks even though blocks 5.. remain
    hs = chain_hashes(t, BS)
    assert idx.apply_batch("a:1", 2, [BlockRemoved([hs[4]])])
    assert idx.match(t)[0] == {a: 4, b: 3}
    # a prompt sharing 2 blocks then diverging
    t2 = t[:8] + prompt(20, 9)
    assert idx.match(t2)[0] == {a: 2, b: 2}
    assert idx.match(prompt(40, 7)) == ({}, 0)       # nobody: stops after one block
    # limit to b only
    assert idx.match(t, 1 << b)[0] == {b: 3}
    assert idx.apply_batch("a:1", 3, [AllBlocksCleared()])
    assert idx.match(t)[0] == {b: 3}
    assert len(idx) == 3 and idx.blocks_of("a:1") == 0
    idx.remove_replica("b:1")
    assert idx.match(t) == ({}, 0) and len(idx) == 0


def test_seq_gap_refused_and_snapshot_resyncs():
    idx = PrefixIndex(BS)
    a = idx.add_replica("a:1", "prefill")
    t = prompt(20)
    hs = chain_hashes(t, BS)
    assert not idx.apply_batch("a:1", 1, stored(t))   # no snapshot yet: not trusted
    assert idx.apply_batch("a:1", 7, stored(t, 2), snapshot=True)
    assert idx.is_exact("a:1")
    assert not idx.apply_batch("a:1", 9, stored(t))   # 8 went missing
    assert idx.match(t)[0] == {a: 2}                  # the gapped batch applied nothing
    # the resubscription's snapshot replaces everything the index knew
    assert idx.apply_batch("a:1", 12, [AllBlocksCleared(), BlockStored(hs[:4], None, [], BS)], snapshot=True)
    assert idx.match(t)[0] == {a: 4}
    assert idx.apply_batch("a:1", 13, [BlockStored([hs[4]], hs[3], [], BS)])
    assert idx.match(t)[0] == {a: 5}


def test_proto_batches_from_a_real_publisher():
    """The worker's publisher -> events_to_proto -> the index: the wire path minus gRPC."""
    pub = KVEventPublisher()
    blocks: dict[int, list[int]] = {}
    pub.snapshot_fn = lambda: [BlockStored([h], None, [], BS) for h in blocks]
    t = prompt(32)
    hs = chain_hashes(t, BS)
    for h in hs[:3]:
        blocks[h] = []
    q = pub.subscribe()
    for h in hs[3:6]:
        pub.stored(h, None, [], BS)
    pub.flush()
    pub.removed(hs[0])
    pub.flush()
    idx = PrefixIndex(BS)
    s = idx.add_replica("w:1", "decode")
    first = True
    while not q.empty():
        batch: EventBatch = q.get()
        m = events_to_proto(batch, "w")
        assert idx.apply_batch("w:1", m.seq, m.events, snapshot=first)
        first = False
        if batch.seq == 1:
            assert idx.match(t)[0] == {s: 6}
    assert idx.match(t)[0] == {}                      # block 0 removed: no leading run


def test_bulk_store_and_walk_is_exact_with_many_replicas():
    idx = PrefixIndex(BS)
    rng = random.Random(1)
    base = prompt(400, 3)
    want = {}
    for r in range(16):
        idx.add_replica(f"r{r}:1", "prefill")
        n = rng.randrange(0, 100)
        want[r] = n
        idx.apply_batch(f"r{r}:1", 0, stored(base, n), snapshot=True)
    got, _ = idx.match(base)
    assert got == {r: n for r, n in want.items() if n}
