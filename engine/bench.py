"""`tandem bench engine`: offline engine benchmarks on one device.

  decode   step time at several batch sizes with a fixed context, against the HBM roofline
           (weights + KV bytes read per step / memory bandwidth)
  prefill  tokens/s of one long prompt and model FLOP utilisation against a peak rate
  offline  nano-vllm's throughput setting: N sequences, input and output lengths uniform in
           [lo, hi], random token ids, ignore_eos; output tokens/s

Every figure is measured through `LLMEngine.step()`, i.e. with scheduling, input preparation and
sampling included, after warm-up. Results print as a table and optionally as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import datetime, timezone

import torch

from tandem.engine.args import add_engine_arguments, engine_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--which", default="decode,prefill,offline",
                   help="comma-separated subset of decode, prefill, offline")
    p.add_argument("--decode-batches", default="1,16,64,256")
    p.add_argument("--decode-context", type=int, default=1024)
    p.add_argument("--decode-steps", type=int, default=50)
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--offline-seqs", type=int, default=256)
    p.add_argument("--offline-min-len", type=int, default=100)
    p.add_argument("--offline-max-len", type=int, default=1024)
    p.add_argument("--hbm-tbps", type=float, default=3.35, help="memory bandwidth for the roofline (H100 SXM: 3.35)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    p.add_argument("--json", default=None, help="also write results to this JSON file")
    p.add_argument("--profile-dir", default=None,
                   help="write a torch.profiler table of a few decode steps per batch size here")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _graph_only_ms(engine, b) -> float | None:
    """GPU time of the decode graph alone (no scheduling, planning or sampling): the difference
    to the step time is host overhead."""
    runner = engine.runner
    gb = runner._graph_batch(b)
    if gb is None:
        return None
    g = runner.graphs[gb][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(20):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 20


def _profile(engine, path: str, steps: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
        _sync(engine.runner.device)
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available()
                                      else "self_cpu_time_total", row_limit=25)
    with open(path, "w") as f:
        f.write(table)


def bench_decode(engine, batches, ctx, steps, hbm_tbps, profile_dir=None):
    from tandem.engine.sampling import SamplingParams

    mc, dev = engine.model_config, engine.runner.device
    rng = random.Random(0)
    weight_bytes = mc.num_params() * engine.runner.kv_cache.element_size()
    kv_per_token = engine.runner.block_bytes // engine.config.block_size
    rows = []
    for b in batches:
        sp = SamplingParams(max_tokens=steps + 20, temperature=0.0, ignore_eos=True)
        for i in range(b):
            engine.add_request(f"dec-{b}-{i}", [rng.randrange(mc.vocab_size) for _ in range(ctx)], sp,
                               detokenize=False)
        # Run prefill (and a few decode steps for warm-up) until every sequence decodes.
        while any(s.in_prefill or len(s.output_token_ids) < 3 for s in engine.seqs.values()):
            engine.step()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(dev)
        dt = (time.perf_counter() - t0) / steps
        avg_ctx = ctx + 3 + steps / 2
        roof = (weight_bytes + b * avg_ctx * kv_per_token) / (hbm_tbps * 1e12)
        rows.append({"batch": b, "context": ctx, "step_ms": dt * 1e3, "roofline_ms": roof * 1e3,
                     "roofline_ratio": roof / dt, "tokens_per_s": b / dt,
                     "graph_replay_ms": _graph_only_ms(engine, b)})
        if profile_dir:
            _profile(engine, f"{profile_dir}/decode-b{b}.txt")
        for rid in list(engine.seqs):
            engine.abort_request(rid)
    return rows


def bench_prefill(engine, length, peak_tflops, trials=5):
    from tandem.engine.sampling import SamplingParams

    mc, dev = engine.model_config, engine.runner.device
    rng = random.Random(1)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for t in range(trials + 1):
        ids = [rng.randrange(mc.vocab_size) for _ in range(length)]   # fresh: no prefix hits
        engine.add_request(f"pre-{t}", ids, sp, detokenize=False)
        _sync(dev)
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        _sync(dev)
        if t:                                                        # first one is warm-up
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    dense = mc.num_params() - mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
    flops = 2 * dense * length + 2 * mc.num_layers * mc.num_heads * mc.head_dim * length * length
    flops += 2 * mc.vocab_size * mc.hidden_size          # logits of the last token
    return {"prompt_len": length, "time_ms": dt * 1e3, "tokens_per_s": length / dt,
            "tflops": flops / dt / 1e12, "mfu": flops / dt / (peak_tflops * 1e12)}


def bench_offline(engine, n, lo, hi, hbm_tbps, peak_tflops):
    from tandem.engine.engine import LLM
    from tandem.engine.sampling import SamplingParams

    rng = random.Random(2)
    vocab = engine.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(lo, hi), temperature=0.6, ignore_eos=True)
              for _ in range(n)]
    llm = LLM.from_engine(engine)   # reuse the engine built once for all benchmarks
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))          # warm-up
    _sync(engine.runner.device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, progress=True)
    _sync(engine.runner.device)
    dt = time.perf_counter() - t0
    out_tokens = sum(len(o.token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    bound = _offline_bound(engine, [len(p) for p in prompts], [sp.max_tokens for sp in params],
                           hbm_tbps, peak_tflops)
    return {"seqs": n, "input_tokens": in_tokens, "output_tokens": out_tokens, "time_s": dt,
            "output_tokens_per_s": out_tokens / dt, "total_tokens_per_s": (in_tokens + out_tokens) / dt,
            "roofline_time_s": bound, "roofline_output_tokens_per_s": out_tokens / bound}


def _offline_bound(engine, in_lens, out_lens, hbm_tbps, peak_tflops) -> float:
    """A lower bound on the offline run's time on this device: every prompt prefilled at peak
    FLOP/s, then every sequence decoding from the first step, each decode step reading all
    weights once plus the KV of every running sequence at full memory bandwidth."""
    mc = engine.model_config
    item = engine.runner.kv_cache.element_size()
    w_bytes = mc.num_params() * item
    kvb = engine.runner.block_bytes // engine.config.block_size
    dense = mc.num_params() - mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
    t = 2 * dense * sum(in_lens) / (peak_tflops * 1e12)
    for step in range(1, max(out_lens) + 1):
        ctx = sum(l + step for l, o in zip(in_lens, out_lens) if o >= step)
        t += (w_bytes + ctx * kvb) / (hbm_tbps * 1e12)
    return t


def run(args: argparse.Namespace) -> int:
    from tandem.engine.engine import LLMEngine

    which = set(args.which.split(","))
    batches = [int(x) for x in args.decode_batches.split(",")]
    cfg = engine_config_from_args(args)
    cfg.max_num_seqs = max(cfg.max_num_seqs, max(batches), args.offline_seqs)
    cfg.max_num_batched_tokens = max(cfg.max_num_batched_tokens, args.prefill_len)
    engine = LLMEngine(cfg)
    dev = engine.runner.device
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "model": args.model, "dtype": str(engine.model_config.dtype),
           "attention": engine.runner.attn.name, "cuda_graphs": bool(engine.runner.graphs),
           "kv_blocks": engine.pool.usable_blocks, "params_b": engine.model_config.num_params() / 1e9,
           "command": "tandem bench engine " + " ".join(sys.argv[3:])}
    res = {"env": env}
    print(json.dumps(env))
    if "decode" in which:
        res["decode"] = bench_decode(engine, batches, args.decode_context, args.decode_steps,
                                     args.hbm_tbps, args.profile_dir)
        print("\nbatch  ctx   step_ms  graph_ms  roofline_ms  ratio  tok/s")
        for r in res["decode"]:
            g = r["graph_replay_ms"]
            print(f"{r['batch']:5d} {r['context']:5d} {r['step_ms']:8.2f} "
                  f"{g if g is not None else float('nan'):9.2f} {r['roofline_ms']:11.2f} "
                  f"{r['roofline_ratio']:6.2f} {r['tokens_per_s']:8.0f}")
    if "prefill" in which:
        r = res["prefill"] = bench_prefill(engine, args.prefill_len, args.peak_tflops)
        print(f"\nprefill {r['prompt_len']} tokens: {r['time_ms']:.1f} ms, {r['tokens_per_s']:.0f} tok/s, "
              f"{r['tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%}")
    if "offline" in which:
        r = res["offline"] = bench_offline(engine, args.offline_seqs, args.offline_min_len,
                                                   args.offline_max_len, args.hbm_tbps, args.peak_tflops)
        print(f"\noffline {r['seqs']} seqs: {r['output_tokens']} output tokens in {r['time_s']:.1f} s = "
              f"{r['output_tokens_per_s']:.0f} output tok/s ({r['total_tokens_per_s']:.0f} total tok/s); "
              f"roofline bound {r['roofline_time_s']:.1f} s = {r['roofline_output_tokens_per_s']:.0f} output tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
