"""Plots and tables from `tandem bench headline` results (matplotlib, PNG).

    python -m tandem.bench.plots --pd pd.json --routing routing.json --out bench/plots

Reads the JSON files the headline driver writes and produces
  goodput_vs_rate.png   goodput and SLO attainment vs offered request rate, per configuration
  latency_vs_rate.png   TTFT and TPOT percentiles vs rate, per configuration
  ttft_cdf_routing.png  TTFT CDF per placement policy (one panel per scenario)
and prints the Markdown tables of bench/RESULTS.md (``--markdown FILE`` also writes them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

COLORS = {"disaggregated": "tab:blue", "disaggregated+overflow": "tab:cyan", "colocated": "tab:orange", "cache-aware": "tab:green",
          "round-robin": "tab:red", "least-load": "tab:purple"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def by_config(pd: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in pd["runs"]:
        out.setdefault(r["config"], []).append(r)
    for runs in out.values():
        runs.sort(key=lambda r: r["request_rate"])
    return out


def headline_pd(pd: dict, threshold: float = 0.9) -> list[dict]:
    """The issue's comparison point, for each disaggregated configuration against colocated: the
    highest rate both ran where either meets the SLO for >= threshold of requests, and the
    goodput ratio there."""
    cfg = by_config(pd)
    c = {r["request_rate"]: r for r in cfg.get("colocated", [])}
    out = []
    for name in cfg:
        if name == "colocated":
            continue
        d = {r["request_rate"]: r for r in cfg[name]}
        rates = sorted(set(d) & set(c))
        ok = [x for x in rates if max(d[x]["slo_attainment"], c[x]["slo_attainment"]) >= threshold]
        if not ok:
            out.append({"config": name, "rate": None})
            continue
        x = max(ok)
        gd, gc = d[x]["request_goodput"], c[x]["request_goodput"]
        out.append({"config": name, "rate": x, "goodput": gd, "colocated": gc,
                    "ratio": gd / gc if gc else float("inf")})
    return out


def itl_attainment(r: dict, itl_ms: float) -> float | None:
    """Share of sent requests within the run's TTFT SLO whose own p99 gap between tokens is at
    most ``itl_ms`` (a streaming-smoothness SLO; vLLM's goodput has none). None for results
    without per-request ITL tails."""
    tails = r.get("itl_p99s")
    if tails is None:
        return None
    ttft_ms = (r.get("goodput_config") or {}).get("ttft", float("inf"))
    ok = sum(1 for t, i, e in zip(r["ttfts"], tails, r["latencies"])
             if e > 0 and t * 1e3 <= ttft_ms and i is not None and i * 1e3 <= itl_ms)
    return ok / max(r["num_prompts"], 1)


def kv_gbps(r: dict) -> tuple[float, float, float]:
    """(GB moved, mean ms per request transfer, GB/s per request) from a run's sender counters."""
    kv = r.get("kv") or {}
    b, s, n = (kv.get(k, 0.0) for k in ("tandem_kv_transfer_bytes_total",
                                        "tandem_kv_transfer_duration_seconds_sum",
                                        "tandem_kv_transfer_duration_seconds_count"))
    return b / 1e9, (s / n * 1e3 if n else float("nan")), (b / s / 1e9 if s else float("nan"))


def plot_pd(pd: dict, out: str, suffix: str = "") -> list[str]:
    plt = _plt()
    cfg = by_config(pd)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    top = 0.0
    for name, runs in cfg.items():
        x = [r["request_rate"] for r in runs]
        top = max(top, *x)
        ax[0].plot(x, [r["request_goodput"] for r in runs], "o-", color=COLORS.get(name), label=name)
        ax[1].plot(x, [100 * r["slo_attainment"] for r in runs], "o-", color=COLORS.get(name), label=name)
    ax[0].plot([0, top], [0, top], ":", color="gray", label="offered rate")
    slo = pd["args"].get("slo", [])
    ax[0].set(xlabel="offered request rate (req/s)", ylabel="goodput (req/s meeting SLO)",
              title="Goodput, SLO " + " ".join(slo))
    ax[1].axhline(90, ls="--", color="gray")
    ax[1].set(xlabel="offered request rate (req/s)", ylabel="requests meeting SLO (%)", ylim=(0, 105),
              title="SLO attainment")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"{pd['device']}, {pd['date_utc']} UTC: " + " vs ".join(
        "2 colocated" if n == "colocated" else f"1 prefill + 1 decode ({n})" for n in cfg))
    fig.tight_layout()
    p1 = os.path.join(out, f"goodput_vs_rate{suffix}.png")
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, runs in cfg.items():
        x = [r["request_rate"] for r in runs]
        for key, a in (("ttft", ax[0]), ("tpot", ax[1])):
            a.plot(x, [r[f"median_{key}_ms"] for r in runs], "o-", color=COLORS.get(name), label=f"{name} p50")
            a.plot(x, [r[f"p99_{key}_ms"] for r in runs], "s--", color=COLORS.get(name), alpha=0.6,
                   label=f"{name} p99")
    ax[0].set(xlabel="offered request rate (req/s)", ylabel="TTFT (ms)", yscale="log", title="Time to first token")
    ax[1].set(xlabel="offered request rate (req/s)", ylabel="TPOT (ms)", title="Time per output token")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    p2 = os.path.join(out, f"latency_vs_rate{suffix}.png")
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def plot_routing(rt: dict, out: str) -> list[str]:
    plt = _plt()
    scen: dict[str, list[dict]] = {}
    for r in rt["runs"]:
        scen.setdefault(f"{r['scenario']} @ {r['request_rate']:g} req/s", []).append(r)
    fig, axes = plt.subplots(1, len(scen), figsize=(5.5 * len(scen), 4.2), squeeze=False)
    for a, (name, runs) in zip(axes[0], scen.items()):
        for r in runs:
            t = np.sort([x * 1e3 for x, e in zip(r["ttfts"], r["latencies"]) if e > 0])
            a.plot(t, np.arange(1, len(t) + 1) / len(t), color=COLORS.get(r["policy"]), label=r["policy"])
        a.set(xscale="log", xlabel="TTFT (ms)", ylabel="fraction of requests", ylim=(0, 1.01),
              title=name + (f"\n{' '.join(runs[0]['scenario_flags'])}" if runs[0]["scenario_flags"] else ""))
        a.grid(alpha=0.3, which="both")
        a.legend()
    fig.suptitle(f"{rt['device']}, {rt['date_utc']} UTC: 2 prefill + 1 decode, shared-prefix prompts")
    fig.tight_layout()
    p = os.path.join(out, "ttft_cdf_routing.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return [p]


def md_pd(pd: dict, itl_ms: float = 100.0) -> str:
    lines = [f"Device: {pd['device']}; date {pd['date_utc']} UTC; command: `{pd['command']}`", "",
             "| config | rate (req/s) | requests | SLO met | goodput (req/s) | throughput (req/s) | "
             "output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | failed | prompt tokens computed on decode |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in by_config(pd).items():
        for r in runs:
            # prompt tokens the decode workers computed themselves, from their own counters
            dec = r["engine"].get("decode", {}).get("tandem_engine_computed_prompt_tokens_total", 0)
            local = f"{dec / max(sum(r['input_lens']), 1):.0%}"
            lines.append(
                f"| {name} | {r['request_rate']:g} | {r['num_prompts']} | {100 * r['slo_attainment']:.0f}% | "
                f"{r['request_goodput']:.2f} | {r['request_throughput']:.2f} | {r['output_throughput']:.0f} | "
                f"{r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} / "
                f"{r['p99_tpot_ms']:.1f} | {r['failed']} | {local} |")
    lines.append("")
    for h in headline_pd(pd):
        lines.append(f"Headline, {h['config']} vs colocated: " + (
            "no rate where either met the SLO for 90% of requests" if h["rate"] is None else
            f"at {h['rate']:g} req/s (the highest rate where either met the SLO for >= 90% of "
            f"requests) goodput is {h['goodput']:.2f} vs {h['colocated']:.2f} req/s = {h['ratio']:.2f}x"))
    if any("itl_p99s" in r for r in pd["runs"]):
        lines += ["", f"Streaming SLO (TTFT as above and each request's p99 token gap <= {itl_ms:g} ms):", "",
                  "| config | rate (req/s) | requests meeting it |", "|---|---|---|"]
        for name, runs in by_config(pd).items():
            for r in runs:
                a = itl_attainment(r, itl_ms)
                lines.append(f"| {name} | {r['request_rate']:g} | {'-' if a is None else f'{a:.0%}'} |")
    kvr = [r for r in pd["runs"] if r.get("kv")]
    if kvr:
        lines += ["", "| rate (req/s) | KV GB sent | transfers | mean transfer (ms) | GB/s per transfer | "
                      "GB/s over the run |", "|---|---|---|---|---|---|"]
        for r in kvr:
            gb, ms, gbps = kv_gbps(r)
            n = r["kv"].get("tandem_kv_transfer_duration_seconds_count", 0)
            lines.append(f"| {r['request_rate']:g} | {gb:.1f} | {n:.0f} | {ms:.1f} | {gbps:.1f} | "
                         f"{gb / r['duration']:.2f} |")
    kb = pd.get("kv_bench")
    if kb:
        lines += ["", f"Isolated, same call (`python -m {kb['command']}`):", "",
                  "| transfer | MiB | best GB/s | median GB/s |", "|---|---|---|---|"]
        for row in kb["rows"]:
            med = row.get("gbps_median")
            lines.append(f"| {row['what']} | {row['mib']:.0f} | {row['gbps_best']:.1f} | "
                         f"{'-' if med is None else f'{med:.1f}'} |")
    if pd.get("skipped"):
        lines += ["", "Not run (time budget): " + ", ".join(f"{s['config']} at {s['rate']:g} req/s"
                                                            for s in pd["skipped"])]
    return "\n".join(lines)


def md_routing(rt: dict) -> str:
    lines = [f"Device: {rt['device']}; date {rt['date_utc']} UTC; command: `{rt['command']}`", "",
             "| scenario | rate (req/s) | policy | prefix tokens reused (prefill) | prompt tokens computed | "
             "TTFT p50 / p90 / p99 (ms) | req/s | output tok/s | per-worker prompt tokens | failed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rt["runs"]:
        e = r["engine"]["prefill"]
        per = " / ".join(f"{v.get('tandem_engine_prompt_tokens_total', 0):.0f}" for v in r.get("per_worker", {}).values())
        lines.append(
            f"| {r['scenario']} | {r['request_rate']:g} | {r['policy']} | {e.get('tandem_engine_prefix_cache_hit_tokens_total', 0):.0f} | "
            f"{e.get('tandem_engine_computed_prompt_tokens_total', 0):.0f} | {r['median_ttft_ms']:.0f} / "
            f"{r['p90_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | {r['request_throughput']:.2f} | "
            f"{r['output_throughput']:.0f} | {per} | {r['failed']} |")
    for key in dict.fromkeys((r["scenario"], r["request_rate"]) for r in rt["runs"]):
        runs = {r["policy"]: r for r in rt["runs"] if (r["scenario"], r["request_rate"]) == key}
        if "cache-aware" in runs and "round-robin" in runs:
            ca, rr = runs["cache-aware"]["median_ttft_ms"], runs["round-robin"]["median_ttft_ms"]
            lines.append(f"\nScenario {key[0]} at {key[1]:g} req/s: TTFT p50 round-robin / cache-aware "
                         f"= {rr / ca:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pd", help="result JSON of `headline pd`")
    ap.add_argument("--routing", help="result JSON of `headline routing`")
    ap.add_argument("--out", default="bench/plots", help="directory for the PNGs")
    ap.add_argument("--markdown", help="also write the tables to this file")
    ap.add_argument("--suffix", default="", help="appended to the pd plots' file names")
    ap.add_argument("--itl-slo-ms", type=float, default=100.0,
                    help="p99 token-gap bound of the streaming SLO table (results with per-request ITL tails)")
    args = ap.parse_args(argv)
    if not (args.pd or args.routing):
        ap.error("give --pd and/or --routing")
    os.makedirs(args.out, exist_ok=True)
    text, made = [], []
    if args.pd:
        with open(args.pd) as f:
            pd = json.load(f)
        made += plot_pd(pd, args.out, args.suffix)
        text.append(md_pd(pd, args.itl_slo_ms))
    if args.routing:
        with open(args.routing) as f:
            rt = json.load(f)
        made += plot_routing(rt, args.out)
        text.append(md_routing(rt))
    md = "\n\n".join(text)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    print("wrote " + ", ".join(made), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
