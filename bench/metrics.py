"""Turns per-request timings into ``vllm bench serve``'s summary metrics.

Data flow: the runner hands :func:`calculate_metrics` the list of
:class:`~tandem.bench.client.RequestOutput` and the wall time of the run; it returns
:class:`BenchmarkMetrics` (counts, throughputs, goodput, mean/median/std/percentiles of TTFT, TPOT,
ITL and E2EL in milliseconds) plus the output length it settled on for each request.

Definitions (as vLLM's, so numbers compare across tools):
- TTFT: first text chunk - request start; E2EL: last text chunk - request start.
- TPOT: (E2EL - TTFT) / (output_tokens - 1), per request with more than one output token.
- ITL: every gap between consecutive text chunks, pooled over all requests.
- Output tokens: the server's ``usage.completion_tokens`` when it sent one, otherwise the
  tokenizer's count of the generated text, otherwise the number of text chunks.
- Goodput: completed requests per second meeting every SLO given (ttft/tpot/e2el in ms); a
  request with a single output token has TPOT 0 for this check.
Failed requests count only in ``failed``; every statistic is over completed requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tandem.bench.client import RequestOutput

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class MetricStats:
    """One latency metric in milliseconds; ``percentiles`` maps p (e.g. 99.0) to its value."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    duration: float
    request_throughput: float
    request_goodput: float | None  # None when no SLO was given
    output_throughput: float
    total_token_throughput: float
    stats: dict[str, MetricStats] = field(default_factory=dict)  # keyed by METRICS
    max_output_tokens_per_s: float = 0.0
    max_concurrent_requests: int = 0


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"bad --goodput {pair!r}: use NAME:MS with NAME in "
                             f"{', '.join(GOODPUT_METRICS)}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"bad --goodput {pair!r}: {value!r} is not a number") from None
        if slos[name] < 0:
            raise ValueError(f"bad --goodput {pair!r}: must be >= 0")
    return slos


def _stats(values_s: list[float], percentiles: list[float]) -> MetricStats:
    # An empty list (all failed, or no request with 2+ chunks) reports zeros, as vLLM does,
    # rather than NaN, which JSON cannot carry.
    v = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    return MetricStats(float(v.mean()), float(np.median(v)), float(v.std()),
                       {p: float(np.percentile(v, p)) for p in percentiles})


def output_len(o: RequestOutput, count_tokens=None) -> int:
    if o.output_tokens is not None:
        return int(o.output_tokens)
    if count_tokens is not None:
        return count_tokens(o.generated_text)
    return o.chunks


def _peaks(outputs: list[RequestOutput]) -> tuple[float, int]:
    """Peak output tokens in any 1 s bucket (one token per chunk) and peak concurrency."""
    ok = [o for o in outputs if o.success]
    if not ok:
        return 0.0, 0
    t0 = min(o.start_time for o in ok)
    buckets: dict[int, int] = {}
    events = []
    for o in ok:
        t = o.start_time + o.ttft
        for gap in [0.0, *o.itl]:
            t += gap
            buckets[int(t - t0)] = buckets.get(int(t - t0), 0) + 1
        events += [(o.start_time, 1), (o.start_time + o.latency, -1)]
    cur = peak = 0
    for _, d in sorted(events):  # ends sort before starts at equal times: half-open intervals
        cur += d
        peak = max(peak, cur)
    return float(max(buckets.values())), peak


def calculate_metrics(outputs: list[RequestOutput], duration: float, percentiles: list[float],
                      goodput: dict[str, float] | None = None,
                      count_tokens=None) -> tuple[BenchmarkMetrics, list[int]]:
    """Summary over ``outputs`` of a run that took ``duration`` seconds.

    ``count_tokens(text) -> int`` counts output tokens where the server sent no usage.
    Returns the metrics and each request's output length (0 for failed ones).
    """
    out_lens: list[int] = []
    ttfts, tpots, tpots_all, itls, e2els = [], [], [], [], []
    total_in = completed = 0
    for o in outputs:
        if not o.success:
            out_lens.append(0)
            continue
        n = output_len(o, count_tokens)
        out_lens.append(n)
        completed += 1
        total_in += o.prompt_len
        tpot = (o.latency - o.ttft) / (n - 1) if n > 1 else 0.0
        if n > 1:
            tpots.append(tpot)
        tpots_all.append(tpot)
        ttfts.append(o.ttft)
        e2els.append(o.latency)
        itls.extend(o.itl)

    good = None
    if goodput:
        per_metric = {"ttft": ttfts, "tpot": tpots_all, "e2el": e2els}
        n_good = sum(
            all(per_metric[name][i] * 1000.0 <= slo for name, slo in goodput.items())
            for i in range(completed))
        good = n_good / duration if duration > 0 else 0.0

    total_out = sum(out_lens)
    dur = duration if duration > 0 else float("inf")  # never divide by zero
    peak_tok, peak_conc = _peaks(outputs)
    return BenchmarkMetrics(
        completed=completed,
        failed=len(outputs) - completed,
        total_input=total_in,
        total_output=total_out,
        duration=duration,
        request_throughput=completed / dur,
        request_goodput=good,
        output_throughput=total_out / dur,
        total_token_throughput=(total_in + total_out) / dur,
        stats={"ttft": _stats(ttfts, percentiles), "tpot": _stats(tpots, percentiles),
               "itl": _stats(itls, percentiles), "e2el": _stats(e2els, percentiles)},
        max_output_tokens_per_s=peak_tok,
        max_concurrent_requests=peak_conc,
    ), out_lens
