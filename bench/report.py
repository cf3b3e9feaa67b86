"""Human and file output of a :class:`~tandem.bench.runner.BenchmarkResult`.

:func:`format_table` renders the block ``vllm bench serve`` prints (same labels and 40/10 column
layout, so people and scripts that read one read the other); :func:`error_summary` lists the first
few failures; :func:`save_result` writes ``to_json()`` under vLLM's default file name
``{label|backend}-{rate}qps[-concurrency{N}]-{model}-{date}.json``.
"""

from __future__ import annotations

import json
import os

from tandem.bench.metrics import METRIC_TITLES
from tandem.bench.runner import BenchmarkResult, percentile_word

MAX_ERRORS_SHOWN = 10


def _row(label: str, value, fmt: str = "") -> str:
    return f"{label:<40} {value:<10{fmt}}"


def format_table(result: BenchmarkResult) -> str:
    c, m = result.config, result.metrics
    lines = ["{:=^50}".format(" Serving Benchmark Result "),
             _row("Successful requests:", m.completed),
             _row("Failed requests:", m.failed)]
    if c.max_concurrency is not None:
        lines.append(_row("Maximum request concurrency:", c.max_concurrency))
    if c.request_rate != float("inf"):
        lines.append(_row("Request rate configured (RPS):", c.request_rate, ".2f"))
    lines += [
        _row("Benchmark duration (s):", m.duration, ".2f"),
        _row("Total input tokens:", m.total_input),
        _row("Total generated tokens:", m.total_output),
        _row("Request throughput (req/s):", m.request_throughput, ".2f"),
    ]
    if m.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", m.request_goodput, ".2f"))
    lines += [
        _row("Output token throughput (tok/s):", m.output_throughput, ".2f"),
        _row("Peak output token throughput (tok/s):", m.max_output_tokens_per_s, ".2f"),
        _row("Peak concurrent requests:", m.max_concurrent_requests, ".2f"),
        _row("Total token throughput (tok/s):", m.total_token_throughput, ".2f"),
    ]
    for name in c.percentile_metrics:
        short, title = METRIC_TITLES[name]
        s = m.stats[name]
        lines += ["{:-^50}".format(title),
                  _row(f"Mean {short} (ms):", s.mean, ".2f"),
                  _row(f"Median {short} (ms):", s.median, ".2f")]
        lines += [_row(f"P{percentile_word(p)} {short} (ms):", v, ".2f")
                  for p, v in s.percentiles.items()]
    lines.append("=" * 50)
    return "\n".join(lines)


def error_summary(result: BenchmarkResult, limit: int = MAX_ERRORS_SHOWN) -> str:
    errors = [o.error for o in result.outputs if not o.success]
    if not errors:
        return ""
    head = f"Failed requests: {len(errors)} of {len(result.outputs)} (first {min(limit, len(errors))}):"
    return "\n".join([head] + [f"  Error {i}: {e}" for i, e in enumerate(errors[:limit])])


def result_filename(result: BenchmarkResult, result_dir: str | None = None,
                    filename: str | None = None) -> str:
    c = result.config
    if not filename:
        conc = f"-concurrency{c.max_concurrency}" if c.max_concurrency is not None else ""
        model = result.model.rstrip("/").split("/")[-1]
        filename = f"{c.label or result.backend}-{c.request_rate}qps{conc}-{model}-{result.date}.json"
    return os.path.join(result_dir, filename) if result_dir else filename


def save_result(result: BenchmarkResult, result_dir: str | None = None,
                filename: str | None = None, detailed: bool = False) -> str:
    path = result_filename(result, result_dir, filename)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result.to_json(detailed=detailed), f, indent=2, allow_nan=False)
    return path
