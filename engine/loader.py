"""Loads Hugging Face safetensors checkpoints into `CausalLM`, or draws random weights.

Checkpoints may be one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Each tensor is read lazily and copied straight into its (possibly fused) parameter on the target
device, so peak host memory is one tensor. Every parameter slice must be filled exactly once:
a missing, misshaped or unreadable tensor is a `ModelLoadError` naming it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from tandem.engine.errors import ModelLoadError
from tandem.engine.model import CausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from e
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{d}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{d}: no *.safetensors weights (a directory without weights can only be run with "
            f"load_format='random')")
    return files


def _targets(model: CausalLM, name: str):
    """(parameter, row slice or None) that checkpoint tensor ``name`` fills, or None to skip."""
    cfg = model.cfg
    if name == "model.embed_tokens.weight":
        return model.embed, None
    if name == "model.norm.weight":
        return model.norm, None
    if name == "lm_head.weight":
        return (None if cfg.tie_word_embeddings else model.lm_head), None
    m = _LAYER.match(name)
    if not m:
        return None
    layer = model.layers[int(m.group(1))] if int(m.group(1)) < cfg.num_layers else None
    if layer is None:
        return None
    q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    rest = m.group(2)
    table = {
        "input_layernorm.weight": (layer.input_norm, None),
        "post_attention_layernorm.weight": (layer.post_norm, None),
        "self_attn.q_proj.weight": (layer.qkv, slice(0, q)),
        "self_attn.k_proj.weight": (layer.qkv, slice(q, q + kv)),
        "self_attn.v_proj.weight": (layer.qkv, slice(q + kv, q + 2 * kv)),
        "self_attn.o_proj.weight": (layer.o_proj, None),
        "mlp.gate_proj.weight": (layer.gate_up, slice(0, i)),
        "mlp.up_proj.weight": (layer.gate_up, slice(i, 2 * i)),
        "mlp.down_proj.weight": (layer.down, None),
    }
    if layer.qkv_bias is not None:
        table.update({
            "self_attn.q_proj.bias": (layer.qkv_bias, slice(0, q)),
            "self_attn.k_proj.bias": (layer.qkv_bias, slice(q, q + kv)),
            "self_attn.v_proj.bias": (layer.qkv_bias, slice(q + kv, q + 2 * kv)),
        })
    if layer.q_norm is not None:
        table.update({"self_attn.q_norm.weight": (layer.q_norm, None),
                      "self_attn.k_norm.weight": (layer.k_norm, None)})
    return table.get(rest)


def expected_tensors(model: CausalLM) -> set[str]:
    cfg = model.cfg
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    per = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
           "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
           "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    if cfg.qkv_bias:
        per += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if cfg.qk_norm:
        per += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for i in range(cfg.num_layers):
        names.update(f"model.layers.{i}.{p}" for p in per)
    return names


@torch.no_grad()
def load_safetensors(model: CausalLM, model_dir: str | Path) -> None:
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from e
        with f:
            for name in f.keys():
                target = _targets(model, name)
                if target is None or target[0] is None:
                    continue
                param, rows = target
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise ModelLoadError(f"{path}: tensor {name} is unreadable ({e})") from e
                dst = param if rows is None else param[rows]
                if tuple(t.shape) != tuple(dst.shape):
                    raise ModelLoadError(
                        f"{path}: tensor {name} has shape {tuple(t.shape)}, the config implies "
                        f"{tuple(dst.shape)}")
                dst.copy_(t.to(dtype=dst.dtype))
                loaded.add(name)
    missing = sorted(expected_tensors(model) - loaded)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{model_dir}: checkpoint lacks tensors {', '.join(missing[:5])}{more}")


@torch.no_grad()
def init_random(model: CausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Random weights drawn on the model's device: benchmarks of real shapes without a
    checkpoint on disk (throughput does not depend on weight values)."""
    g = torch.Generator(device=model.embed.device)
    g.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "bias" not in name:
            p.fill_(1.0)           # norm weights
        elif "bias" in name:
            p.zero_()
        else:
            p.normal_(0.0, std, generator=g)
