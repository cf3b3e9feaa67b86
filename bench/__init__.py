"""Serving benchmark client: ``tandem bench serve`` (see ``cli``).

Modules, in the order data flows through them:
``datasets`` (prompts of exact token lengths) -> ``runner`` (arrival schedule, concurrency,
``run_benchmark``) -> ``client`` (one streamed request, SSE timing) -> ``metrics`` (vLLM's
summary statistics) -> ``report`` (results table, JSON file). ``cli`` wires flags to a
``BenchmarkConfig``. Other code calls ``await run_benchmark(BenchmarkConfig(...))`` directly.
"""

from tandem.bench.datasets import DatasetConfig, SampleRequest
from tandem.bench.runner import BenchmarkConfig, BenchmarkResult, run_benchmark

__all__ = ["BenchmarkConfig", "BenchmarkResult", "DatasetConfig", "SampleRequest", "run_benchmark"]
