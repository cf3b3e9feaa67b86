"""Command-line flags shared by every command that builds an engine (generate, bench, workers)."""

from __future__ import annotations

import argparse

from tandem.engine.config import EngineConfig


def add_engine_arguments(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", required=model_required, help="Hugging Face model directory")
    g.add_argument("--served-model-name", default=None, help="name clients use (default: dir name)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (from config.json) | bfloat16 | float16 | float32")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "flashinfer", "torch"])
    g.add_argument("--load-format", default="auto", choices=["auto", "random"],
                   help="random: draw weights on the device (benchmarks without a checkpoint)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="fix the KV pool size (blocks)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory the engine may use (weights + KV + activations)")
    g.add_argument("--cpu-kv-cache-gib", type=float, default=1.0, help="KV pool size on CPU")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: model's)")
    g.add_argument("--max-batch-tokens", "--max-num-batched-tokens", dest="max_batch_tokens",
                   type=int, default=8192, help="token budget of one engine step (chunked prefill)")
    g.add_argument("--max-running-requests", "--max-num-seqs", dest="max_running_requests",
                   type=int, default=256, help="most sequences in one batch")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    g.add_argument("--no-chunked-prefill", action="store_true", help="prefill whole prompts only")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--seed", type=int, default=0)


def engine_config_from_args(args: argparse.Namespace, role: str = "colocated") -> EngineConfig:
    return EngineConfig(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype,
        device=args.device, attention_backend=args.attention_backend, load_format=args.load_format,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_gib=args.cpu_kv_cache_gib,
        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_running_requests, enable_prefix_caching=not args.no_prefix_caching,
        enable_chunked_prefill=not args.no_chunked_prefill, enforce_eager=args.enforce_eager,
        seed=args.seed, role=role)
