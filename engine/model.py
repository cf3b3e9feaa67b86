"""The Llama-family transformer (Llama 2/3/3.1, Mistral, Qwen2, Qwen3) over a paged KV cache.

Input is one flat batch of tokens from many sequences (`positions` says where each sits in its
sequence); attention reads and writes the paged cache through an `AttentionBackend` that was
planned for this step. Numerics follow transformers' implementation step for step (RMSNorm in
float32 then cast, rotary tables in float32, residual adds in the model dtype) so outputs can be
compared with it token for token. Q/K/V and gate/up projections are fused into one matrix each at
load time: fewer, larger GEMMs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine.config import ModelConfig, RopeConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        inv = inv / rope.factor
    elif rope.type == "llama3":
        old = rope.original_max_position_embeddings or 8192
        low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim] (halves repeated)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def add_rms_norm(x, residual, weight, eps):
    """(norm(residual + x), residual + x); with no residual, (norm(x), x)."""
    if residual is not None:
        x = residual + x
    return rms_norm(x, weight, eps), x


def qkv_rope(qkv, cos, sin, q_norm, k_norm, eps: float, heads: int, kv_heads: int, head_dim: int):
    """Splits the fused projection, applies per-head RMSNorm (Qwen3) and rotary embeddings."""
    n = qkv.shape[0]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(n, heads, head_dim)
    k = k.reshape(n, kv_heads, head_dim)
    v = v.reshape(n, kv_heads, head_dim)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
        k = rms_norm(k, k_norm, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def silu_mul(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Ops:
    """The elementwise steps between GEMMs. Eager PyTorch by default (exactly transformers'
    arithmetic); on CUDA each is compiled into one fused kernel, which matters because a decode
    step otherwise launches a dozen tiny kernels per layer and is bound by launch gaps."""

    def __init__(self, fuse: bool):
        self.fused = fuse
        if fuse:
            # Round intermediates to the model dtype exactly where eager PyTorch does, so the
            # fused kernels keep transformers' bf16 numerics (not more precise, just the same).
            import torch._inductor.config as inductor_config
            if hasattr(inductor_config, "emulate_precision_casts"):
                inductor_config.emulate_precision_casts = True
        wrap = (lambda f: torch.compile(f, dynamic=True, fullgraph=True)) if fuse else (lambda f: f)
        self.add_rms_norm = wrap(add_rms_norm)
        self.qkv_rope = wrap(qkv_rope)
        self.silu_mul = wrap(silu_mul)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, device, dtype):
        super().__init__()
        self.idx = layer_idx
        self.cfg = cfg
        h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
        e = dict(device=device, dtype=dtype)
        self.input_norm = nn.Parameter(torch.empty(h, **e), requires_grad=False)
        self.qkv = nn.Parameter(torch.empty(q + 2 * kv, h, **e), requires_grad=False)
        self.qkv_bias = (nn.Parameter(torch.empty(q + 2 * kv, **e), requires_grad=False)
                         if cfg.qkv_bias else None)
        self.q_norm = nn.Parameter(torch.empty(cfg.head_dim, **e), requires_grad=False) if cfg.qk_norm else None
        self.k_norm = nn.Parameter(torch.empty(cfg.head_dim, **e), requires_grad=False) if cfg.qk_norm else None
        self.o_proj = nn.Parameter(torch.empty(h, q, **e), requires_grad=False)
        self.post_norm = nn.Parameter(torch.empty(h, **e), requires_grad=False)
        self.gate_up = nn.Parameter(torch.empty(2 * i, h, **e), requires_grad=False)
        self.down = nn.Parameter(torch.empty(h, i, **e), requires_grad=False)

    def forward(self, x, residual, cos, sin, kv_cache, attn, ops: Ops):
        """Returns (this layer's MLP output, the residual stream before adding it); the next
        layer (or the final norm) adds the two, fused with its RMSNorm."""
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        h, residual = ops.add_rms_norm(x, residual, self.input_norm, eps)
        qkv = F.linear(h, self.qkv, self.qkv_bias)
        q, k, v = ops.qkv_rope(qkv, cos, sin, self.q_norm, self.k_norm, eps,
                               cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        o = attn.forward(self.idx, q, k, v, kv_cache)
        x = F.linear(o.reshape(-1, cfg.q_size), self.o_proj)
        h, residual = ops.add_rms_norm(x, residual, self.post_norm, eps)
        return F.linear(ops.silu_mul(F.linear(h, self.gate_up)), self.down), residual


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, device, dtype, max_positions: int, fuse: bool = False):
        super().__init__()
        self.cfg = cfg
        self.ops = Ops(fuse)
        e = dict(device=device, dtype=dtype)
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, **e), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device, dtype) for i in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size, **e), requires_grad=False)
        self.lm_head = (self.embed if cfg.tie_word_embeddings else
                        nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, **e), requires_grad=False))
        inv = rope_inv_freq(cfg.head_dim, cfg.rope)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        # Stored already cast, as transformers casts cos/sin to the activations' dtype.
        self.register_buffer("cos", emb.cos().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(device=device, dtype=dtype), persistent=False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                attn) -> torch.Tensor:
        """Hidden states (after the final norm) of every input token."""
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.cos[positions], self.sin[positions]
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, kv_caches[layer.idx], attn, self.ops)
            attn.after_layer(layer.idx)
        return self.ops.add_rms_norm(x, residual, self.norm, self.cfg.rms_norm_eps)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)
