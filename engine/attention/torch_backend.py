"""Portable attention: per sequence, gather its pages and run PyTorch SDPA with a causal mask
offset by the tokens already in the cache. Slow but obviously right; the reference for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.engine.attention.base import AttentionBackend, StepMetadata, write_kv


class TorchAttention(AttentionBackend):
    name = "torch"

    def __init__(self, cfg, block_size: int):
        self.cfg = cfg
        self.block_size = block_size
        self.meta: StepMetadata | None = None
        self._masks: list = []
        self._tables: list = []

    def plan(self, meta: StepMetadata) -> None:
        self.meta = meta
        dev = meta.slot_k.device
        self._masks, self._tables = [], []
        for n, kv_len, table in zip(meta.qo_lens, meta.kv_lens, meta.block_tables):
            nb = -(-kv_len // self.block_size)
            self._tables.append(torch.tensor(table[:nb], dtype=torch.long, device=dev))
            if n == 1:
                self._masks.append(None)          # one query sees the whole context
            elif n == kv_len:
                self._masks.append("causal")
            else:
                past = kv_len - n
                rows = torch.arange(n, device=dev).unsqueeze(1)
                cols = torch.arange(kv_len, device=dev).unsqueeze(0)
                self._masks.append(cols <= rows + past)

    def forward(self, layer, q, k, v, kv_layer):
        meta = self.meta
        bs = self.block_size
        write_kv(kv_layer, k, v, meta.slot_k, bs)
        out = torch.empty_like(q)
        start = 0
        for n, kv_len, table, mask in zip(meta.qo_lens, meta.kv_lens, self._tables, self._masks):
            pages = kv_layer[table]                             # [nb, 2, bs, kvh, d]
            kk = pages[:, 0].reshape(-1, *pages.shape[-2:])[:kv_len].transpose(0, 1)
            vv = pages[:, 1].reshape(-1, *pages.shape[-2:])[:kv_len].transpose(0, 1)
            qq = q[start:start + n].transpose(0, 1)             # [heads, n, d]
            o = F.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=None if isinstance(mask, str) else mask,
                is_causal=isinstance(mask, str), enable_gqa=True)
            out[start:start + n] = o.transpose(0, 1)
            start += n
        return out
