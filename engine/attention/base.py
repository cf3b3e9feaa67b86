"""The attention backend interface and the per-step description it is planned with."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepMetadata:
    """One engine step, flattened. Host lists are for the torch backend and for planning;
    the tensors live on the model's device.

    For sequence i: its new tokens are rows ``qo_indptr[i]:qo_indptr[i+1]`` of the batch, its KV
    after this step has ``kv_lens[i]`` tokens in blocks ``block_tables[i]``.
    """

    qo_lens: list[int]
    kv_lens: list[int]
    block_tables: list[list[int]]
    slot_k: torch.Tensor          # [tokens] int64: row of the flattened layer cache for each new K
    decode_only: bool

    @property
    def num_seqs(self) -> int:
        return len(self.qo_lens)


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_k: torch.Tensor,
             block_size: int) -> None:
    """Stores new K/V into a layer cache laid out ``[blocks, 2, block_size, kv_heads, head_dim]``.

    Viewing the layer as rows of ``[kv_heads, head_dim]``, the K of (block b, offset o) is row
    ``b*2*block_size + o`` and its V is ``block_size`` rows further, so one index per token
    serves both (the slot is computed once per step, not per layer).
    """
    flat = kv_layer.view(-1, kv_layer.shape[-2], kv_layer.shape[-1])
    flat.index_copy_(0, slot_k, k)
    flat.index_copy_(0, slot_k + block_size, v)


class AttentionBackend:
    def plan(self, meta: StepMetadata) -> None:
        raise NotImplementedError

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_layer: torch.Tensor) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Writes k/v, returns
        attention output [tokens, heads, dim]."""
        raise NotImplementedError

    def after_layer(self, layer: int) -> None:
        """Called after each layer's forward; the prefill worker hooks KV transfer here."""
        hook = getattr(self, "layer_hook", None)
        if hook is not None:
            hook(layer)
