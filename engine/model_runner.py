"""Runs one scheduled step on the device: flatten the batch, plan attention, run the model
(replaying a CUDA graph for small all-decode batches), sample.

Owns the model weights, the KV cache tensor and the sampler. The KV cache is ONE tensor
``[layers, blocks, 2, block_size, kv_heads, head_dim]``: layer l's cache is ``kv[l]`` (flashinfer's
single-tensor NHD layout), and block b of layer l is one contiguous run of bytes, which is what
KV transfer between workers moves.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from tandem.engine.attention import StepMetadata, create_backend
from tandem.engine.config import EngineConfig, ModelConfig
from tandem.engine.loader import init_random, load_safetensors
from tandem.engine.model import CausalLM
from tandem.engine.sampling import SampleOutput, Sampler
from tandem.engine.scheduler import SchedulerOutput

log = logging.getLogger("tandem.engine")

GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but no CUDA GPU is available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, max_model_len: int):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = model_cfg.dtype
        self.block_size = cfg.block_size
        t0 = time.monotonic()
        fuse = self.device.type == "cuda" and not cfg.enforce_eager and cfg.extra.get("fuse", True)
        self.model = CausalLM(model_cfg, self.device, self.dtype, max_positions=max_model_len, fuse=fuse)
        if cfg.load_format == "random":
            init_random(self.model, seed=cfg.seed)
        else:
            load_safetensors(self.model, cfg.model)
        log.info("loaded %s weights in %.1fs", cfg.load_format, time.monotonic() - t0)
        self.attn = create_backend(cfg.attention_backend, self.device, model_cfg, cfg.block_size)
        self.num_blocks = cfg.num_kv_blocks or self._blocks_that_fit()
        shape = (model_cfg.num_layers, self.num_blocks, 2, cfg.block_size,
                 model_cfg.num_kv_heads, model_cfg.head_dim)
        # zeros, not empty: padded graph rows read block 0, and garbage could be NaN
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.sampler = Sampler(self.device)
        self.graphs: dict[int, tuple] = {}
        if (self.device.type == "cuda" and self.attn.name == "flashinfer" and not cfg.enforce_eager):
            self._capture_graphs()

    # ---- memory ---------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        m = self.model_cfg
        return (m.num_layers * 2 * self.block_size * m.num_kv_heads * m.head_dim
                * torch.tensor([], dtype=self.dtype).element_size())

    def _blocks_that_fit(self) -> int:
        if self.device.type != "cuda":
            return max(int(self.cfg.cpu_kv_cache_gib * (1 << 30)) // self.block_bytes, 2)
        m, c = self.model_cfg, self.cfg
        free, total = torch.cuda.mem_get_info(self.device)
        # Our own footprint, not the device's: workers may share a GPU (each with its fraction of
        # gpu_memory_utilization), and another process's memory must not count against ours.
        # memory_reserved misses the CUDA context and library workspaces: ~0.5 GiB on Hopper.
        used = torch.cuda.memory_reserved(self.device) + (1 << 29)
        item = torch.tensor([], dtype=self.dtype).element_size()
        # Peak activations of the largest prefill step, sampler temporaries, graphs, workspace.
        act = c.max_num_batched_tokens * (4 * m.intermediate_size + 6 * m.hidden_size
                                          + 2 * (m.q_size + 2 * m.kv_size)) * item
        sampler = c.max_num_seqs * m.vocab_size * 4 * 6
        reserve = act + sampler + (1 << 30)
        # ...and never more than is actually free now (what others hold stays theirs)
        budget = min(total * c.gpu_memory_utilization - used, free - (1 << 29)) - reserve
        n = int(budget // self.block_bytes)
        if n < 2:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (weights and reserves use {used / 2**30:.1f} "
                f"GiB of {total / 2**30:.1f}); raise gpu_memory_utilization or lower max_num_seqs")
        return n

    # ---- inputs ---------------------------------------------------------------------------------
    def _prepare(self, sched: SchedulerOutput):
        """Flattens the batch: token ids, positions and KV slots of every new token, per-sequence
        query/KV lengths and block tables, and the rows whose logits are sampled."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qo_lens, kv_lens, tables, sample_rows = [], [], [], []
        row = 0
        for s in sched.scheduled:
            seq = s.seq
            start = seq.num_computed_tokens
            end = start + s.num_new
            if s.num_new == 1:
                ids.append(seq.token_slice(start, end)[0])
                positions.append(start)
                slots.append(seq.block_ids[start // bs] * 2 * bs + start % bs)
            else:
                ids.extend(seq.token_slice(start, end))
                p = np.arange(start, end)
                blocks = np.asarray(seq.block_ids, dtype=np.int64)[p // bs]
                positions.extend(p.tolist())
                slots.extend((blocks * 2 * bs + p % bs).tolist())
            qo_lens.append(s.num_new)
            kv_lens.append(end)
            tables.append(seq.block_ids)
            row += s.num_new
            if s.sample:
                sample_rows.append(row - 1)
        return ids, positions, slots, qo_lens, kv_lens, tables, sample_rows

    def _to_dev(self, arr, dtype=torch.int64) -> torch.Tensor:
        t = torch.as_tensor(arr, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    # ---- execution ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> SampleOutput | None:
        ids, positions, slots, qo_lens, kv_lens, tables, sample_rows = self._prepare(sched)
        n = len(ids)
        decode_only = sched.decode_only
        graph_b = self._graph_batch(n) if decode_only else None
        if graph_b is not None:
            logits = self._replay(graph_b, ids, positions, slots, qo_lens, kv_lens, tables)
        else:
            meta = StepMetadata(qo_lens, kv_lens, tables, self._to_dev(slots), decode_only)
            self.attn.plan(meta)
            hidden = self.model(self._to_dev(ids), self._to_dev(positions), self.kv_cache, self.attn)
            if not sample_rows:
                return None
            if len(sample_rows) != n:
                hidden = hidden[self._to_dev(sample_rows)]
            logits = self.model.logits(hidden)
        if not sample_rows:
            return None
        sampled = [s for s in sched.scheduled if s.sample]
        params = [s.seq.params for s in sampled]
        keys = [s.seq.key for s in sampled]
        masked = [s.seq.min_tokens_mask for s in sampled] if any(
            s.seq.min_tokens_mask for s in sampled) else None
        return self.sampler(logits, params, keys, masked)

    # ---- CUDA graphs ----------------------------------------------------------------------------
    def _graph_batch(self, n: int) -> int | None:
        if not self.graphs:
            return None
        for b in GRAPH_BATCHES:
            if b >= n and b in self.graphs:
                return b
        return None

    def _capture_graphs(self) -> None:
        max_b = min(self.cfg.max_num_seqs, GRAPH_BATCHES[-1])
        batches = [b for b in GRAPH_BATCHES if b <= max_b]
        if max_b not in batches:
            batches.append(next(b for b in GRAPH_BATCHES if b >= max_b))
        top = batches[-1]
        dev = self.device
        self._g_ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self._g_pos = torch.zeros(top, dtype=torch.int64, device=dev)
        self._g_slot = torch.zeros(top, dtype=torch.int64, device=dev)
        max_pages = top * (-(-self.max_positions // self.block_size)) + top
        max_pages = min(max_pages, self.num_blocks + top)
        pool = torch.cuda.graph_pool_handle()
        t0 = time.monotonic()
        for b in reversed(batches):
            self.attn.graph_wrapper(b, max_pages)
            meta = StepMetadata([1] * b, [1] * b, [[0]] * b, self._g_slot[:b], True)
            self.attn.plan(meta, graph_batch=b)
            for _ in range(2):   # warm up outside the graph (kernel selection, allocator)
                self.model.logits(self.model(self._g_ids[:b], self._g_pos[:b], self.kv_cache, self.attn))
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self.model.logits(self.model(self._g_ids[:b], self._g_pos[:b], self.kv_cache,
                                                   self.attn))
            self.graphs[b] = (g, out, meta)
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs in %.1fs", len(batches), time.monotonic() - t0)

    @property
    def max_positions(self) -> int:
        return self.model.cos.shape[0]

    def _replay(self, b, ids, positions, slots, qo_lens, kv_lens, tables) -> torch.Tensor:
        n = len(ids)
        g, out, meta = self.graphs[b]
        host = torch.zeros(3, b, dtype=torch.int64)
        host[0, :n] = torch.as_tensor(ids)
        host[1, :n] = torch.as_tensor(positions)
        host[2, :n] = torch.as_tensor(slots)
        dev = host.pin_memory().to(self.device, non_blocking=True)
        self._g_ids[:b].copy_(dev[0])
        self._g_pos[:b].copy_(dev[1])
        self._g_slot[:b].copy_(dev[2])
        self.attn.plan(StepMetadata(qo_lens, kv_lens, tables, meta.slot_k, True), graph_batch=b)
        g.replay()
        return out[:n]
