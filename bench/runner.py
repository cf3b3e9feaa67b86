"""The benchmark loop: ``async def run_benchmark(config) -> BenchmarkResult``.

Data flow:
1. resolve the endpoint (``--backend``/``--endpoint``) and the model (GET /v1/models if unset);
2. build prompts with :mod:`tandem.bench.datasets` (or take ``config.requests`` as given);
3. optionally send the first prompt until it succeeds (the ready check), so a server still
   loading or a wrong model name fails fast instead of as N failed requests;
4. release requests on an arrival schedule (:func:`arrival_times`), each behind a semaphore of
   ``max_concurrency``, and stream them with :func:`tandem.bench.client.send_request`;
5. summarise with :func:`tandem.bench.metrics.calculate_metrics` into a :class:`BenchmarkResult`,
   whose :meth:`~BenchmarkResult.to_json` holds vLLM's keys.
Printing the result table and saving the JSON file are the caller's choice (see ``report``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import numpy as np

from tandem.bench.client import BACKENDS, RequestInput, RequestOutput, send_request
from tandem.bench.datasets import (DatasetConfig, SampleRequest, count_tokens, load_tokenizer,
                                   sample_requests)
from tandem.bench.metrics import METRICS, BenchmarkMetrics, calculate_metrics
from tandem.bench.progress import make_progress

DEFAULT_ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


@dataclass
class BenchmarkConfig:
    """Everything one run needs; the CLI flags map onto these fields one to one."""

    url: str = "http://127.0.0.1:8000"
    backend: str | None = None  # openai | openai-chat; inferred from endpoint when None
    endpoint: str | None = None  # defaults by backend
    model: str | None = None  # None: the first model GET /v1/models lists
    tokenizer: str | None = None  # HF dir or tokenizer.json; None: --model if that is a local dir
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    requests: list[SampleRequest] | None = None  # programmatic use: prompts built elsewhere
    seed: int = 0
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    goodput: dict[str, float] = field(default_factory=dict)  # metric -> SLO in ms
    percentile_metrics: list[str] = field(default_factory=lambda: list(METRICS))
    metric_percentiles: list[float] = field(default_factory=lambda: [99.0])
    headers: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)
    ready_check_timeout: float = 60.0  # seconds; 0 skips the ready check
    request_timeout: float = 6 * 3600.0
    disable_tqdm: bool = False
    verbose: bool = True
    label: str | None = None

    def resolved_endpoint(self) -> tuple[str, str]:
        """(backend, endpoint) after filling whichever of the two was left out."""
        backend, endpoint = self.backend, self.endpoint
        if backend is None:
            backend = "openai-chat" if (endpoint or "").rstrip("/").endswith("chat/completions") \
                else "openai"
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
        endpoint = endpoint or DEFAULT_ENDPOINTS[backend]
        if (backend == "openai-chat") != endpoint.rstrip("/").endswith("chat/completions"):
            raise ValueError(f"--backend {backend} does not speak {endpoint}")
        return backend, endpoint

    def api_url(self, endpoint: str) -> str:
        base = self.url.rstrip("/")
        # Accept both http://host:port and http://host:port/v1 as the server URL.
        if base.endswith("/v1") and endpoint.startswith("/v1/"):
            base = base[:-3]
        return base + endpoint


@dataclass
class BenchmarkResult:
    config: BenchmarkConfig
    model: str
    backend: str
    endpoint: str
    date: str  # %Y%m%d-%H%M%S, the run's start
    metrics: BenchmarkMetrics
    outputs: list[RequestOutput]
    output_lens: list[int]
    num_prompts: int
    tokenizer: str | None = None  # the path actually loaded

    def to_json(self, detailed: bool = False) -> dict[str, Any]:
        """vLLM's result keys (plus the run config); ``detailed`` adds the generated texts."""
        c, m = self.config, self.metrics

        def num(x: float) -> float | str:
            return x if np.isfinite(x) else "inf"  # JSON has no Infinity

        res: dict[str, Any] = {
            "date": self.date,
            "backend": self.backend,
            "endpoint_type": self.backend,
            "endpoint": self.endpoint,
            "label": c.label,
            "base_url": c.url,
            "model_id": self.model,
            "tokenizer_id": self.tokenizer,
            "dataset_name": c.dataset.name if c.requests is None else "custom",
            "dataset_config": asdict(c.dataset) if c.requests is None else None,
            "num_prompts": self.num_prompts,
            "seed": c.seed,
            "request_rate": num(c.request_rate),
            "burstiness": num(c.burstiness),
            "max_concurrency": c.max_concurrency,
            "ignore_eos": c.ignore_eos,
            "temperature": c.temperature,
            "goodput_config": dict(c.goodput) or None,
            "duration": m.duration,
            "completed": m.completed,
            "failed": m.failed,
            "total_input_tokens": m.total_input,
            "total_output_tokens": m.total_output,
            "request_throughput": m.request_throughput,
            "request_goodput": m.request_goodput,
            "output_throughput": m.output_throughput,
            "total_token_throughput": m.total_token_throughput,
            "max_output_tokens_per_s": m.max_output_tokens_per_s,
            "max_concurrent_requests": m.max_concurrent_requests,
        }
        for name in c.percentile_metrics:
            s = m.stats[name]
            res[f"mean_{name}_ms"] = s.mean
            res[f"median_{name}_ms"] = s.median
            res[f"std_{name}_ms"] = s.std
            for p, v in s.percentiles.items():
                res[f"p{percentile_word(p)}_{name}_ms"] = v
        res.update({
            "input_lens": [o.prompt_len for o in self.outputs],
            "output_lens": self.output_lens,
            "ttfts": [o.ttft for o in self.outputs],
            "itls": [o.itl for o in self.outputs],
            "latencies": [o.latency for o in self.outputs],
            "start_times": [o.start_time for o in self.outputs],
            "errors": [o.error for o in self.outputs],
        })
        if detailed:
            res["generated_texts"] = [o.generated_text for o in self.outputs]
        return res


def percentile_word(p: float) -> str:
    """99.0 -> "99", 99.9 -> "99.9": the spelling of vLLM's p99_ttft_ms / p99.9_ttft_ms keys."""
    return str(int(p)) if int(p) == p else str(p)


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send time of each request, seconds after the start.

    Gaps are gamma-distributed with shape ``burstiness`` and mean ``1/rate`` (shape 1 is a
    Poisson process; larger is more regular, ``inf`` a fixed interval). As vLLM does, the
    cumulative times are rescaled so the last one lands at exactly ``n/rate``: the run's offered
    load then does not drift with the seed.
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    if not np.isfinite(rate):
        return np.zeros(n)
    if np.isfinite(burstiness):
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    else:
        gaps = np.full(n, 1.0 / rate)
    t = np.cumsum(gaps)
    if n and t[-1] > 0:
        t *= (n / rate) / t[-1]
    return t


async def fetch_model(session: aiohttp.ClientSession, url: str) -> str:
    base = url.rstrip("/")
    models_url = base + ("/models" if base.endswith("/v1") else "/v1/models")
    async with session.get(models_url) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET {models_url}: HTTP {resp.status}; pass --model")
        data = (await resp.json()).get("data") or []
    if not data:
        raise RuntimeError(f"GET {models_url} lists no models; pass --model")
    return data[0]["id"]


async def ready_check(inp: RequestInput, session: aiohttp.ClientSession, timeout: float) -> None:
    """Send ``inp`` until it succeeds; retry while the server is unreachable or answers 5xx
    (still starting), give up at once on 4xx (wrong model, bad flags: retrying cannot help)."""
    deadline = time.monotonic() + timeout
    while True:
        out = await send_request(inp, session)
        if out.success:
            return
        permanent = out.error.startswith("HTTP 4")
        if permanent or time.monotonic() >= deadline:
            raise RuntimeError(f"ready check failed: {out.error}")
        await asyncio.sleep(1.0)


async def run_benchmark(config: BenchmarkConfig) -> BenchmarkResult:
    backend, endpoint = config.resolved_endpoint()
    api_url = config.api_url(endpoint)
    tok_path = config.tokenizer
    if tok_path is None and config.model and os.path.isfile(
            os.path.join(config.model, "tokenizer.json")):
        tok_path = config.model  # --model given as a local HF dir, as vLLM allows
    tok = load_tokenizer(tok_path) if tok_path else None
    if config.requests is not None:
        requests = list(config.requests)
    elif tok is None:
        raise ValueError("--tokenizer is needed to build prompts of known token lengths")
    else:
        requests = sample_requests(config.dataset, tok, seed=config.seed)
    if not requests:
        raise ValueError("no requests to send")
    for m in config.percentile_metrics:
        if m not in METRICS:
            raise ValueError(f"unknown percentile metric {m!r}; one of {', '.join(METRICS)}")
    log = print if config.verbose else (lambda *a, **k: None)

    # limit=0: aiohttp's own pool cap (100) would otherwise throttle a run silently.
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=config.request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers=config.headers or None) as session:
        model = config.model or await fetch_model(session, config.url)

        def make_input(r: SampleRequest) -> RequestInput:
            return RequestInput(prompt=r.prompt, prompt_len=r.prompt_len,
                                output_len=r.expected_output_len, model=model, api_url=api_url,
                                backend=backend, ignore_eos=config.ignore_eos,
                                temperature=config.temperature,
                                extra_body=config.extra_body or None)

        if config.ready_check_timeout > 0:
            log(f"Ready check: one request to {api_url} (model {model})...")
            await ready_check(make_input(requests[0]), session, config.ready_check_timeout)

        rng = np.random.default_rng(config.seed + 1)  # not the dataset's stream
        send_at = arrival_times(len(requests), config.request_rate, config.burstiness, rng)
        dist = "Poisson process" if config.burstiness == 1.0 else "Gamma distribution"
        log(f"Traffic request rate: {config.request_rate}")
        log(f"Burstiness factor: {config.burstiness} ({dist})")
        log(f"Maximum request concurrency: {config.max_concurrency}")

        sem = (asyncio.Semaphore(config.max_concurrency) if config.max_concurrency
               else contextlib.nullcontext())
        pbar = make_progress(len(requests), disable=config.disable_tqdm)

        async def one(inp: RequestInput) -> RequestOutput:
            async with sem:
                out = await send_request(inp, session)
            pbar.update(1)
            return out

        date = datetime.now().strftime("%Y%m%d-%H%M%S")
        start = time.perf_counter()
        tasks = []
        for r, t in zip(requests, send_at.tolist()):
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(make_input(r))))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        pbar.close()

    counter = (lambda text: count_tokens(tok, text)) if tok is not None else None
    metrics, out_lens = calculate_metrics(outputs, duration, config.metric_percentiles,
                                          config.goodput, counter)
    return BenchmarkResult(config=config, model=model, backend=backend, endpoint=endpoint,
                           date=date, metrics=metrics, outputs=list(outputs),
                           output_lens=out_lens, num_prompts=len(requests), tokenizer=tok_path)
