"""The engine's KV memory layout, and how block ids become byte ranges.

Each worker allocates one tensor ``kv[num_layers, num_blocks, 2, block_size, num_kv_heads,
head_dim]``. Block ``b`` of layer ``l`` is one contiguous run of ``block_bytes`` bytes at
``(l * num_blocks + b) * block_bytes`` from ``kv.data_ptr()``. Both transfer backends turn a
request's (src block, dst block) pairs into byte ranges with the helpers here:

    src_blocks, dst_blocks --merge_runs--> [BlockRun(src, dst, n)]   (once per request)
    BlockRun x layer       --byte_ranges--> (src offset, dst offset, nbytes) per layer

The two sides may have a different ``num_blocks`` (each sizes its pool to its own memory), so the
layer stride differs per side; everything else must match, which :meth:`KVLayout.check_compatible`
enforces before any byte moves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

# Fields that must be equal on both sides of a transfer, in the order a mismatch is reported.
_MUST_MATCH = ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype")


class LayoutMismatch(ValueError):
    """The peer's KV layout cannot receive (or send) our blocks. ``field`` names what differs."""

    def __init__(self, field: str, local: Any, peer: Any):
        self.field, self.local, self.peer = field, local, peer
        super().__init__(f"KV layout mismatch: {field} differs (local {local!r}, peer {peer!r})")


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the wire form of a dtype."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"

    def __post_init__(self) -> None:
        for f in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"KVLayout.{f} must be positive, got {getattr(self, f)!r}")
        self.torch_dtype  # raises on an unknown dtype name

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"KVLayout.dtype: unknown torch dtype {self.dtype!r}")
        return dt

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer: K and V of block_size tokens."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def layer_stride(self) -> int:
        """Bytes from one layer's block b to the next layer's block b."""
        return self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_stride

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, self.num_blocks, 2, self.block_size, self.num_kv_heads,
                self.head_dim)

    def offset(self, layer: int, block: int) -> int:
        return layer * self.layer_stride + block * self.block_bytes

    @classmethod
    def from_tensor(cls, kv: torch.Tensor) -> "KVLayout":
        if kv.dim() != 6 or kv.shape[2] != 2:
            raise ValueError("kv must be [num_layers, num_blocks, 2, block_size, num_kv_heads, "
                             f"head_dim], got shape {tuple(kv.shape)}")
        if not kv.is_contiguous():
            raise ValueError("kv must be contiguous: block offsets are computed from data_ptr()")
        L, N, _, B, H, D = (int(s) for s in kv.shape)
        return cls(L, N, B, H, D, dtype_name(kv.dtype))

    def allocate(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.torch_dtype, device=device)

    def check_compatible(self, peer: "KVLayout") -> None:
        """Raise LayoutMismatch naming the first field that differs; num_blocks may differ."""
        for f in _MUST_MATCH:
            if getattr(self, f) != getattr(peer, f):
                raise LayoutMismatch(f, getattr(self, f), getattr(peer, f))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVLayout":
        missing = [f for f in cls.__dataclass_fields__ if f not in d]
        if missing:
            raise ValueError(f"KVLayout dict lacks {missing}")
        return cls(**{f: d[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class BlockRun:
    """``n`` blocks consecutive on both sides: src[src..src+n) -> dst[dst..dst+n)."""
    src: int
    dst: int
    n: int


def merge_runs(src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> list[BlockRun]:
    """Group pairs (src_blocks[i], dst_blocks[i]) into runs consecutive on BOTH sides, in order.

    A run becomes one descriptor (one DMA) per layer instead of n, which is what makes page-table
    fragmentation cheap: a freshly allocated pool usually hands out long consecutive runs.
    """
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks")
    runs: list[BlockRun] = []
    if not len(src_blocks):
        return runs
    s0 = d0 = prev_s = prev_d = None
    n = 0
    for s, d in zip(src_blocks, dst_blocks):
        s, d = int(s), int(d)
        if n and s == prev_s + 1 and d == prev_d + 1:
            n += 1
        else:
            if n:
                runs.append(BlockRun(s0, d0, n))
            s0, d0, n = s, d, 1
        prev_s, prev_d = s, d
    runs.append(BlockRun(s0, d0, n))
    return runs


def check_blocks(blocks: Sequence[int], num_blocks: int, what: str, unique: bool) -> None:
    """Reject ids outside [0, num_blocks), and repeated ids where writes would collide."""
    arr = np.asarray(blocks, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_blocks):
        raise ValueError(f"{what}: block ids must lie in [0, {num_blocks}), got "
                         f"min {arr.min()} max {arr.max()}")
    if unique and np.unique(arr).size != arr.size:
        raise ValueError(f"{what}: repeated block ids (two writes to one page)")


def byte_ranges(runs: Iterable[BlockRun], layers: Iterable[int], src: KVLayout,
                dst: KVLayout) -> np.ndarray:
    """[k, 3] int64 array of (src offset, dst offset, nbytes), one row per (layer, run).

    Rows are never merged across layers: layer l+1's block b sits a whole layer_stride after
    layer l's, and the strides differ when the sides' num_blocks differ.
    """
    runs = list(runs)
    layers = np.asarray(list(layers), dtype=np.int64)
    if not runs or not layers.size:
        return np.zeros((0, 3), dtype=np.int64)
    rs = np.array([(r.src, r.dst, r.n) for r in runs], dtype=np.int64)
    bb = src.block_bytes
    out = np.empty((layers.size, len(runs), 3), dtype=np.int64)
    out[:, :, 0] = layers[:, None] * src.layer_stride + rs[None, :, 0] * bb
    out[:, :, 1] = layers[:, None] * dst.layer_stride + rs[None, :, 1] * bb
    out[:, :, 2] = rs[None, :, 2] * bb
    return out.reshape(-1, 3)
