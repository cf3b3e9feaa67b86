"""Typed configuration: what a model directory says (`ModelConfig`) and how the engine runs it
(`EngineConfig`).

`ModelConfig.from_dir` reads a Hugging Face ``config.json`` (+ ``generation_config.json``) and
normalises the variants found in the wild: rope settings as ``rope_theta``/``rope_scaling``
(transformers 4) or ``rope_parameters`` (transformers 5), dtype as ``torch_dtype`` or ``dtype``,
``eos_token_id`` as an int or a list.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.engine.errors import ModelLoadError, UnsupportedArchitectureError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    if name is None or name == "auto":
        return default
    if isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "").lower()
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    sliding_window: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return per_layer * self.num_layers + emb + h

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, dtype: str | torch.dtype | None = None) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path}: invalid JSON: {e}") from e
        gen_path = Path(model_dir) / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_dict(raw, gen, dtype)

    @classmethod
    def from_dict(cls, raw: dict, gen: dict | None = None, dtype=None) -> "ModelConfig":
        gen = gen or {}
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            head_dim = int(raw.get("head_dim") or hidden // heads)
            cfg_dtype = raw.get("dtype") or raw.get("torch_dtype")
            eos = _as_tuple(gen.get("eos_token_id")) + _as_tuple(raw.get("eos_token_id"))
            sliding = raw.get("sliding_window")
            if arch.startswith("Qwen") and not raw.get("use_sliding_window", False):
                sliding = None
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope=_parse_rope(raw),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
                qk_norm=arch == "Qwen3ForCausalLM",
                dtype=parse_dtype(dtype if dtype not in (None, "auto") else cfg_dtype),
                eos_token_ids=tuple(dict.fromkeys(eos)),
                bos_token_id=gen.get("bos_token_id", raw.get("bos_token_id")),
                sliding_window=int(sliding) if sliding else None,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from e


def _as_tuple(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


def _parse_rope(raw: dict) -> RopeConfig:
    # transformers 5 folds theta and scaling into one dict; transformers 4 keeps them apart.
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rtype = merged.get("rope_type") or merged.get("type") or "default"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope type {rtype!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    orig = merged.get("original_max_position_embeddings")
    return RopeConfig(
        theta=theta, type=rtype, factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig) if orig else None)


@dataclass
class EngineConfig:
    """How to run a model. Defaults suit a GPU; the CPU path shrinks what it must."""

    model: str
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    attention_backend: str = "auto"       # auto | flashinfer | torch
    load_format: str = "auto"             # auto (safetensors) | random (weights drawn on the device)
    block_size: int = 16
    num_kv_blocks: int | None = None      # overrides the memory-based sizing
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 1.0
    max_model_len: int | None = None
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False           # disables CUDA graphs
    seed: int = 0
    role: str = "colocated"               # label for metrics: colocated | prefill | decode
    extra: dict = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name
