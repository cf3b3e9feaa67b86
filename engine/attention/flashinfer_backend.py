"""flashinfer paged attention on CUDA.

One plan per step: all-decode steps use the decode wrapper (or, under a CUDA graph, a wrapper
with fixed buffers sized for the graph's batch), any step with prompt tokens uses the prefill
wrapper for the whole batch (decoding sequences are just 1-token queries there). The page table is
built on the host in flashinfer's CSR form and copied once; `plan` must run outside graph capture.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from tandem.engine.attention.base import AttentionBackend, StepMetadata, write_kv

WORKSPACE_BYTES = 128 << 20


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"

    def __init__(self, cfg, block_size: int, device: torch.device):
        import flashinfer

        self.fi = flashinfer
        self.cfg = cfg
        self.block_size = block_size
        self.device = device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.graph_wrappers: dict[int, object] = {}
        self.meta: StepMetadata | None = None
        self._active = None

    def graph_wrapper(self, batch: int, max_pages: int):
        w = self.graph_wrappers.get(batch)
        if w is None:
            i32 = dict(dtype=torch.int32, device=self.device)
            w = self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True,
                paged_kv_indptr_buffer=torch.zeros(batch + 1, **i32),
                paged_kv_indices_buffer=torch.zeros(max_pages, **i32),
                paged_kv_last_page_len_buffer=torch.zeros(batch, **i32))
            self.graph_wrappers[batch] = w
        return w

    def page_table(self, meta: StepMetadata, pad_to: int = 0):
        bs = self.block_size
        n = meta.num_seqs
        pages = [-(-kv // bs) for kv in meta.kv_lens]
        n_pad = max(pad_to - n, 0)
        indptr = np.zeros(n + n_pad + 1, dtype=np.int32)
        np.cumsum(pages, out=indptr[1:n + 1])
        last = np.ones(n + n_pad, dtype=np.int32)
        last[:n] = [kv - (p - 1) * bs for kv, p in zip(meta.kv_lens, pages)]
        total = int(indptr[n])
        # padded rows read one page each: the reserved null block 0
        indices = np.zeros(total + n_pad, dtype=np.int32)
        indices[:total] = np.fromiter(
            itertools.chain.from_iterable(t[:p] for t, p in zip(meta.block_tables, pages)),
            dtype=np.int32, count=total)
        if n_pad:
            indptr[n + 1:] = total + np.arange(1, n_pad + 1)
        return torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(last)

    def plan(self, meta: StepMetadata, graph_batch: int | None = None) -> None:
        cfg = self.cfg
        self.meta = meta
        dt = self.workspace_dtype
        if graph_batch is not None:
            indptr, indices, last = self.page_table(meta, pad_to=graph_batch)
            w = self.graph_wrappers[graph_batch]
            w.plan(indptr, indices, last, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   self.block_size, q_data_type=dt, kv_data_type=dt)
        elif meta.decode_only:
            indptr, indices, last = self.page_table(meta)
            w = self.decode
            w.plan(indptr, indices, last, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   self.block_size, q_data_type=dt, kv_data_type=dt)
        else:
            indptr, indices, last = self.page_table(meta)
            qo = np.zeros(meta.num_seqs + 1, dtype=np.int32)
            np.cumsum(meta.qo_lens, out=qo[1:])
            w = self.prefill
            w.plan(torch.from_numpy(qo), indptr, indices, last, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, self.block_size, causal=True, q_data_type=dt, kv_data_type=dt)
        self._active = w

    @property
    def workspace_dtype(self) -> torch.dtype:
        return self.cfg.dtype

    def forward(self, layer, q, k, v, kv_layer):
        write_kv(kv_layer, k, v, self.meta.slot_k, self.block_size)
        return self._active.run(q, kv_layer)
