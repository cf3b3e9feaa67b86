"""`tandem bench headline pd|routing`: the end-to-end comparisons of bench/RESULTS.md.

Each comparison starts real deployments with `tandem serve` on this machine's GPUs (router,
workers, KV transfer: the production path), loads them through the router with the
`tandem bench serve` client, and reads the workers' Prometheus counters before and after every
run. Everything lands in one JSON file, rewritten after every run, so a run cut short by a time
limit keeps what finished; `python -m tandem.bench.plots` turns it into PNGs and tables.

  pd       disaggregated (1 prefill + 1 decode) vs colocated (2 workers that prefill and decode
           their own requests; same engine, same router), optionally disaggregated+overflow (the
           router sends the prefill pool's overflow to the decode worker), on a prompt-heavy random workload, swept
           over request rates; goodput = requests/s meeting every SLO (--slo); per run also the
           KV bytes the prefill workers sent and their transfer times. With --kv-bench, the
           isolated NIXL transfer and a torch peer copy of one mean-sized prompt's KV first.
  routing  2 prefill + 1 decode under SGLang's generated-shared-prefix workload, one router per
           placement policy over the same workers (a fresh seed per policy, so no policy inherits
           another's cached prefixes); per policy the prefix tokens the prefill workers reused.
           --scenario NAME:FLAGS repeats it with extra worker flags (e.g. a smaller KV pool).

    python -m tandem.bench.headline pd --model DIR --rates 2,4,6,8 --out pd.json
    python -m tandem.bench.headline routing --model DIR --rates 16 --out routing.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np

from tandem.bench.datasets import DatasetConfig
from tandem.bench.deploy import Deployment, scrape, since
from tandem.bench.metrics import parse_goodput
from tandem.bench.runner import BenchmarkConfig, run_benchmark

POLICIES = ("cache-aware", "round-robin", "least-load")
KV = ("tandem_kv_transfer_bytes_total", "tandem_kv_transfer_duration_seconds_sum",
      "tandem_kv_transfer_duration_seconds_count")
ENGINE = ("tandem_engine_prefix_cache_hit_tokens_total", "tandem_engine_prefix_cache_query_tokens_total",
          "tandem_engine_computed_prompt_tokens_total", "tandem_engine_prompt_tokens_total",
          "tandem_engine_preemptions_total")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split("\n")
        names = [n.strip() for n in out if n.strip()]
        return f"{len(names)}x {names[0]}" if names else "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


def load(url: str, model: str, dataset: DatasetConfig, rate: float, seed: int, slo: dict[str, float],
         timeout: float) -> dict:
    """One `tandem bench serve` run; the vLLM-keyed result without per-token arrays, plus the
    SLO attainment (fraction of sent requests that completed within every SLO)."""
    cfg = BenchmarkConfig(url=url, tokenizer=model, dataset=dataset, seed=seed, request_rate=rate,
                          ignore_eos=True, goodput=slo, metric_percentiles=[50.0, 90.0, 99.0],
                          request_timeout=timeout, disable_tqdm=True, ready_check_timeout=0,
                          label=f"{dataset.name}-{rate}")
    res = asyncio.run(run_benchmark(cfg))
    d = res.to_json()
    # per-request token-gap tails instead of every gap (an ITL SLO is per request too)
    # (a request whose text came in one chunk had no gap: 0)
    d["itl_p99s"] = [float(np.percentile(o.itl, 99)) if o.itl else 0.0 if o.success else None
                     for o in res.outputs]
    d["itl_maxs"] = [max(o.itl) if o.itl else 0.0 if o.success else None for o in res.outputs]
    for k in ("itls", "errors"):
        d.pop(k, None)
    d["error_kinds"] = sorted({(o.error or "").split("\n")[0][:120] for o in res.outputs if o.error})
    d["slo_attainment"] = (d["request_goodput"] * d["duration"] / max(d["num_prompts"], 1)
                           if slo else None)
    # per-request TPOT, for plots (vLLM's definition: time after the first token / further tokens)
    d["tpots"] = [(o.latency - o.ttft) / (n - 1) if o.success and n > 1 else None
                  for o, n in zip(res.outputs, res.output_lens)]
    return d


def warmup(url: str, model: str, dataset: DatasetConfig) -> None:
    """A few requests first: compile/plan caches and connections are not part of any run."""
    ds = DatasetConfig(**{**vars(dataset), "num_prompts": 6})
    if ds.name == "generated-shared-prefix":
        ds.gsp_num_groups, ds.gsp_prompts_per_group, ds.gsp_output_len = 2, 3, 8
    else:
        ds.random_output_len, ds.random_output_range_ratio = 8, 0.0
    load(url, model, ds, float("inf"), seed=999, slo={}, timeout=600)


class Recorder:
    """The comparison's JSON file, rewritten after every change."""

    def __init__(self, path: str, kind: str, args: argparse.Namespace):
        self.path = path
        self.data = {"comparison": kind, "device": device_name(),
                     "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
                     "command": "tandem bench headline " + " ".join(args.argv),
                     "args": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
                     "runs": [], "skipped": [], "notes": []}

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)


# ---- pd ------------------------------------------------------------------------------------------

def worker_flags(args) -> list[str]:
    """`tandem serve` flags every deployment of a comparison shares."""
    return ["--prefill-arg=--load-format=random", "--decode-arg=--load-format=random",
            f"--prefill-arg=--max-model-len={args.max_model_len}",
            f"--decode-arg=--max-model-len={args.max_model_len}", "--dtype", args.dtype, *args.serve_arg]


def pd_dataset(args, n: int) -> DatasetConfig:
    return DatasetConfig(name="random", num_prompts=n, random_input_len=args.input_len,
                         random_range_ratio=args.input_ratio, random_output_len=args.output_len,
                         random_output_range_ratio=args.output_ratio)


def kv_bench(args, rec: Recorder) -> None:
    blocks = max(args.input_len // 16, 1)
    path = os.path.join(args.log_dir, "kv-bench.json")
    cmd = [sys.executable, "-m", "tandem.kvtransfer.bench", "--backend", "nixl", "--device", "cuda",
           "--blocks", str(blocks), "--pattern", "contiguous", "--all-layers", "--iters", "10",
           "--json", path]
    log("kv bench: " + " ".join(cmd[2:]))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    print("\n".join(l for l in p.stdout.splitlines() if "NIXL INFO" not in l), flush=True)
    if p.returncode != 0:
        rec.data["notes"].append(f"kv bench failed: {p.stderr[-500:]}")
        return
    with open(path) as f:
        rec.data["kv_bench"] = {"command": " ".join(cmd[2:]), "rows": json.load(f)}


def cmd_pd(args) -> int:
    rec, clock = Recorder(args.out, "pd", args), Clock(args.budget_s)
    slo = parse_goodput(args.slo)
    rates = [float(r) for r in args.rates.split(",")]
    if args.kv_bench:
        kv_bench(args, rec)
        rec.save()
    worker = worker_flags(args)
    layouts = {"disaggregated": (1, 1, []), "colocated": (0, 2, []),
               # conditional disaggregation: the decode worker takes the prefill pool's overflow
               "disaggregated+overflow": (1, 1, [f"--router-arg=--max-prefill-queue-tokens={args.overflow_tokens}",
                                                 f"--router-arg=--max-local-prefill-tokens={args.local_prefill_tokens}"])}
    for i, name in enumerate(args.configs.split(",")):
        if name not in layouts:
            raise SystemExit(f"--configs: unknown {name!r}; choose from {', '.join(layouts)}")
        npre, ndec, router_args = layouts[name]
        # leave the later configurations an equal share of what is left
        share = clock.left() / (len(args.configs.split(",")) - i)
        t_cfg = time.monotonic()
        with Deployment(name, args.model, npre, ndec, serve_args=worker + router_args,
                        log_dir=args.log_dir) as dep:
            dep.start(out=log)
            warmup(dep.url, args.model, pd_dataset(args, 6))
            for rate in rates:
                n = max(args.min_prompts, int(round(rate * args.window_s)))
                est = n / rate + args.drain_s
                spent = time.monotonic() - t_cfg
                if spent + est > share:
                    rec.data["skipped"].append({"config": name, "rate": rate,
                                                "why": f"time budget ({share:.0f}s for this config)"})
                    log(f"{name} rate {rate}: skipped (time budget)")
                    continue
                before, ovf0 = dep.snapshot(), _overflowed(dep)
                log(f"{name} rate {rate}: {n} requests")
                d = load(dep.url, args.model, pd_dataset(args, n), rate, args.seed, slo, args.request_timeout)
                d["config"], d["workers"] = name, {"prefill": npre, "decode": ndec}
                after = dep.snapshot()
                d["engine"] = dep.by_role(since(before, after, ENGINE))
                d["overflowed"] = _overflowed(dep) - ovf0    # requests the decode worker prefilled
                if npre:    # prefill workers only send KV, so their counters are the send side
                    d["kv"] = dep.by_role(since(before, after, KV))["prefill"]
                rec.data["runs"].append(d)
                rec.save()
                log(f"{name} rate {rate}: goodput {d['request_goodput']:.2f} req/s, SLO met "
                    f"{100 * d['slo_attainment']:.0f}%, TTFT p50 {d['median_ttft_ms']:.0f} ms, "
                    f"TPOT p50 {d['median_tpot_ms']:.1f} ms, failed {d['failed']}")
    rec.save()
    return 0


def _overflowed(dep: Deployment) -> float:
    return scrape(dep.url + "/metrics", {"pool": "prefill", "reason": "prefill-queue-full"}).get(
        "tandem_router_routing_decisions_total", 0.0)


# ---- routing -------------------------------------------------------------------------------------

def cmd_routing(args) -> int:
    rec, clock = Recorder(args.out, "routing", args), Clock(args.budget_s)
    policies = args.policies.split(",")
    base = worker_flags(args)
    scenarios = [("default", [])] + [_scenario(s) for s in args.scenario]
    ds = DatasetConfig(name="generated-shared-prefix", gsp_num_groups=args.groups,
                       gsp_prompts_per_group=args.prompts_per_group,
                       gsp_system_prompt_len=args.system_prompt_len,
                       gsp_question_len=args.question_len, gsp_output_len=args.output_len)
    n = args.groups * args.prompts_per_group
    rates = [float(r) for r in args.rates.split(",")]
    for si, (sname, extra) in enumerate(scenarios):
        need = sum(n / r + args.drain_s for r in rates) * len(policies) + 60
        if clock.left() < need:
            rec.data["skipped"].append({"scenario": sname, "why": f"time budget ({need:.0f}s needed)"})
            log(f"routing {sname}: skipped (time budget)")
            continue
        with Deployment(f"routing-{sname}", args.model, args.prefill, 1, policy=policies[0],
                        serve_args=base + extra, log_dir=args.log_dir) as dep:
            dep.start(out=log)
            urls = {policies[0]: dep.url}
            for p in policies[1:]:
                urls[p] = dep.add_router(p)
            warmup(dep.url, args.model, ds)
            for ri, rate in enumerate(rates):
                for pi, policy in enumerate(policies):
                    # a fresh seed per run: new system prompts, so no run reuses another's cache
                    seed = args.seed + 100 * si + 10 * ri + pi
                    before = dep.snapshot()
                    log(f"routing {sname}: {policy}, {n} requests at {rate:g} req/s (seed {seed})")
                    d = load(urls[policy], args.model, ds, rate, seed, {}, args.request_timeout)
                    d["policy"], d["scenario"], d["scenario_flags"] = policy, sname, extra
                    per = since(before, dep.snapshot(), ENGINE)
                    d["engine"] = dep.by_role(per)
                    d["per_worker"] = {w.name: per[w.name] for w in dep.workers if w.role == "prefill"}
                    rec.data["runs"].append(d)
                    rec.save()
                    e = d["engine"]["prefill"]
                    log(f"routing {sname} {policy} {rate:g} req/s: TTFT p50 {d['median_ttft_ms']:.0f} ms "
                        f"p99 {d['p99_ttft_ms']:.0f} ms, prefix tokens reused "
                        f"{e.get('tandem_engine_prefix_cache_hit_tokens_total', 0):.0f}, "
                        f"{d['request_throughput']:.2f} req/s, failed {d['failed']}")
    rec.save()
    return 0


def _scenario(spec: str) -> tuple[str, list[str]]:
    name, _, flags = spec.partition(":")
    if not name or not flags:
        raise SystemExit(f"--scenario {spec!r}: expected NAME:FLAGS, e.g. "
                         "small-kv:--prefill-arg=--num-kv-blocks=1536")
    return name, flags.split()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench headline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (("pd", cmd_pd, "disaggregated vs colocated goodput over request rates"),
                            ("routing", cmd_routing, "placement policies on shared-prefix prompts")):
        s = sub.add_parser(name, help=help_)
        s.set_defaults(func=fn)
        s.add_argument("--model", required=True, help="HF model directory (weights may be absent: "
                       "workers run with --load-format random)")
        s.add_argument("--dtype", default="bfloat16")
        s.add_argument("--max-model-len", type=int, default=8192)
        s.add_argument("--out", required=True, help="result JSON (rewritten after every run)")
        s.add_argument("--log-dir", default="/tmp/tandem-bench-logs", help="serve and worker logs")
        s.add_argument("--budget-s", type=float, default=540, help="wall-clock budget; runs that "
                       "would not fit are skipped and listed as such")
        s.add_argument("--drain-s", type=float, default=20, help="estimated seconds a run takes "
                       "after its last arrival (for the budget)")
        s.add_argument("--request-timeout", type=float, default=120)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--serve-arg", action="append", default=[], help="extra `tandem serve` flag")
    pd = sub.choices["pd"]
    pd.add_argument("--configs", default="disaggregated,colocated",
                    help="comma list of disaggregated, colocated, disaggregated+overflow")
    pd.add_argument("--overflow-tokens", type=int, default=16384, help="disaggregated+overflow: the "
                    "router's --max-prefill-queue-tokens")
    pd.add_argument("--local-prefill-tokens", type=int, default=8192, help="disaggregated+overflow: "
                    "the router's --max-local-prefill-tokens")
    pd.add_argument("--rates", default="2,4,6,8", help="request rates (req/s), ascending")
    pd.add_argument("--window-s", type=float, default=20, help="seconds of arrivals per rate")
    pd.add_argument("--min-prompts", type=int, default=40)
    pd.add_argument("--input-len", type=int, default=3072)
    pd.add_argument("--input-ratio", type=float, default=1 / 3, help="3072 +- 1/3: 2048-4096")
    pd.add_argument("--output-len", type=int, default=320)
    pd.add_argument("--output-ratio", type=float, default=0.6, help="320 +- 60%%: 128-512")
    pd.add_argument("--slo", nargs="+", default=["ttft:1000", "tpot:50"])
    pd.add_argument("--kv-bench", action="store_true", help="first: isolated NIXL transfer and "
                    "torch peer copy of one mean-sized prompt's KV (CUDA, 2 GPUs)")
    r = sub.choices["routing"]
    r.add_argument("--prefill", type=int, default=2, help="prefill workers (+1 decode)")
    r.add_argument("--policies", default=",".join(POLICIES))
    r.add_argument("--groups", type=int, default=16)
    r.add_argument("--prompts-per-group", type=int, default=16)
    r.add_argument("--system-prompt-len", type=int, default=2048)
    r.add_argument("--question-len", type=int, default=128)
    r.add_argument("--output-len", type=int, default=128)
    r.add_argument("--rates", default="16", help="request rates (req/s), comma-separated")
    r.add_argument("--scenario", action="append", default=[], metavar="NAME:FLAGS",
                   help="also run with these extra `tandem serve` flags (space-separated)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    os.makedirs(args.log_dir, exist_ok=True)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
