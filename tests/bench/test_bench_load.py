"""Load shape and robustness: arrival schedule, concurrency cap, failures, ready check."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from tandem.bench import BenchmarkConfig, SampleRequest, run_benchmark
from tandem.bench.report import error_summary
from tandem.bench.runner import arrival_times


def _cfg(url: str, n: int, out_len: int = 4, **kw) -> BenchmarkConfig:
    kw.setdefault("ready_check_timeout", 0)
    reqs = [SampleRequest(f"p{i}", 3, out_len) for i in range(n)]
    return BenchmarkConfig(url=url, model="fake-model", requests=reqs, disable_tqdm=True,
                           verbose=False, **kw)


def test_arrival_times_distribution():
    rng = np.random.default_rng(0)
    assert not arrival_times(5, float("inf"), 1.0, rng).any()
    t = arrival_times(20000, 10.0, 1.0, rng)
    gaps = np.diff(t)
    assert t[-1] == pytest.approx(2000.0)  # rescaled: last arrival at n / rate
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # Poisson: CV 1
    gaps4 = np.diff(arrival_times(20000, 10.0, 4.0, rng))
    assert gaps4.std() / gaps4.mean() == pytest.approx(0.5, rel=0.05)  # gamma(k): CV 1/sqrt(k)
    fixed = arrival_times(10, 4.0, float("inf"), rng)
    assert np.allclose(fixed, np.arange(1, 11) / 4.0)
    with pytest.raises(ValueError):
        arrival_times(3, 0.0, 1.0, rng)


def test_concurrency_limit_is_honored(fake_server):
    with fake_server(first_delay=0.05, gap=0.005) as srv:
        res = asyncio.run(run_benchmark(_cfg(srv.url, 12, max_concurrency=3)))
    assert res.metrics.completed == 12
    assert srv.max_in_flight == 3
    assert res.metrics.max_concurrent_requests <= 3
    # Control: the same load without a cap really does overlap more, so the check above bites.
    with fake_server(first_delay=0.05, gap=0.005) as srv:
        asyncio.run(run_benchmark(_cfg(srv.url, 12)))
    assert srv.max_in_flight > 3


def test_fixed_request_rate_is_honored(fake_server):
    # 20 req/s with burstiness 1e4 (gaps ~ fixed 50 ms): arrivals at 0.05, 0.10, ... 1.00 s.
    with fake_server() as srv:
        res = asyncio.run(run_benchmark(_cfg(srv.url, 20, request_rate=20.0, burstiness=1e4)))
    assert res.metrics.completed == 20
    gaps = np.diff(srv.arrivals)
    span = srv.arrivals[-1] - srv.arrivals[0]
    assert span == pytest.approx(0.95, abs=0.12)
    assert np.median(gaps) == pytest.approx(0.05, abs=0.015)
    assert res.metrics.duration >= 0.95
    # Infinite rate: everything leaves at once.
    with fake_server() as srv:
        asyncio.run(run_benchmark(_cfg(srv.url, 20)))
    assert srv.arrivals[-1] - srv.arrivals[0] < 0.3


def test_failed_requests_are_counted_not_fatal(fake_server):
    def fail(i, body):
        return {0: 500, 1: 400}.get(i % 4)  # a quarter 500s, a quarter 400s

    with fake_server(fail=fail, truncate=lambda i: i == 2) as srv:
        res = asyncio.run(run_benchmark(_cfg(srv.url, 16, out_len=6)))
    m = res.metrics
    assert len(srv.bodies) == 16
    assert m.failed == 9 and m.completed == 7  # 4 x 500, 4 x 400, 1 truncated stream
    errors = [o.error for o in res.outputs]
    assert sum(e.startswith("HTTP 500") for e in errors) == 4
    assert sum(e.startswith("HTTP 400") for e in errors) == 4
    assert sum("before data: [DONE]" in e for e in errors) == 1
    assert all(o.error == "" for o in res.outputs if o.success)
    assert [n for o, n in zip(res.outputs, res.output_lens) if not o.success] == [0] * 9
    assert m.total_output == 7 * 6
    summary = error_summary(res, limit=3)
    assert "9 of 16" in summary and summary.count("Error ") == 3


def test_unreachable_server_fails_every_request():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = asyncio.run(run_benchmark(_cfg(f"http://127.0.0.1:{port}", 3)))
    assert res.metrics.completed == 0 and res.metrics.failed == 3
    assert all("Connect" in o.error for o in res.outputs)


def test_ready_check_gives_up_on_client_error(fake_server):
    with fake_server(fail=lambda i, b: 404 if b["model"] != "right" else None) as srv:
        with pytest.raises(RuntimeError, match="HTTP 404"):
            asyncio.run(run_benchmark(_cfg(srv.url, 3, ready_check_timeout=30)))
        assert len(srv.bodies) == 1  # no retries on 4xx, no benchmark run
    # A 503 while "starting" is retried until the server comes up.
    with fake_server(fail=lambda i, b: 503 if i < 2 else None) as srv:
        res = asyncio.run(run_benchmark(_cfg(srv.url, 3, ready_check_timeout=30)))
    assert res.metrics.completed == 3 and len(srv.bodies) == 3 + 3
