"""The chained block hash: the one identity of a KV block that the engine's prefix cache, the
decode pool and the router all share, across processes and machines.

Definition (version 1, stable; changing it is a protocol change):

    ROOT = 0
    block_hash(parent, tokens) = u64_le( BLAKE2b-64( u64_le(parent) || u32_le(t0) || ... ) )

where ``tokens`` are exactly ``block_size`` token ids of one *full* block, ``parent`` is the hash
of the previous block of the same sequence (``ROOT`` for the first), ``u64_le``/``u32_le`` are
little-endian encodings and BLAKE2b-64 is BLAKE2b with an 8-byte digest (``hashlib.blake2b(...,
digest_size=8)``). Partial blocks have no hash. Because each hash covers its parent, equal hashes
mean equal prefixes (up to a 2^-64 collision, which the engine still guards against by comparing
the stored tokens).
"""

from __future__ import annotations

import hashlib

import numpy as np

HASH_VERSION = 1
ROOT_HASH = 0


def block_hash(parent: int, tokens) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    h.update(np.asarray(tokens, dtype="<u4").tobytes())
    return int.from_bytes(h.digest(), "little")


def chain_hashes(tokens, block_size: int, parent: int = ROOT_HASH, start_block: int = 0) -> list[int]:
    """Hashes of every full block of ``tokens`` from ``start_block`` on (``parent`` being the hash
    of block ``start_block - 1``)."""
    arr = np.asarray(tokens, dtype="<u4")
    out = []
    for b in range(start_block, len(arr) // block_size):
        h = hashlib.blake2b(digest_size=8)
        h.update(parent.to_bytes(8, "little"))
        h.update(arr[b * block_size:(b + 1) * block_size].tobytes())
        parent = int.from_bytes(h.digest(), "little")
        out.append(parent)
    return out
