"""Metric math: exact on synthetic timings, approximate against a server with scripted delays."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tandem.bench import BenchmarkConfig, SampleRequest, run_benchmark
from tandem.bench.client import RequestOutput, SSEDecoder
from tandem.bench.metrics import calculate_metrics, parse_goodput


def _ok(ttft: float, latency: float, tokens: int | None, itl=(), start=0.0, prompt_len=5):
    return RequestOutput(success=True, prompt_len=prompt_len, output_tokens=tokens, ttft=ttft,
                         latency=latency, itl=list(itl), start_time=start, chunks=len(itl) + 1)


def test_metrics_exact_on_known_timings():
    outs = [_ok(0.1 * (i + 1), 0.1 * (i + 1) + 0.9, 10, itl=[0.1] * 9) for i in range(4)]
    outs.append(RequestOutput(success=False, prompt_len=99, error="HTTP 500"))
    m, lens = calculate_metrics(outs, duration=2.0, percentiles=[50.0, 99.0])
    assert (m.completed, m.failed) == (4, 1)
    assert lens == [10, 10, 10, 10, 0]
    assert m.total_input == 20 and m.total_output == 40  # failed request's prompt not counted
    assert m.request_throughput == pytest.approx(2.0)
    assert m.output_throughput == pytest.approx(20.0)
    assert m.total_token_throughput == pytest.approx(30.0)
    ttfts_ms = np.array([100.0, 200.0, 300.0, 400.0])
    assert m.stats["ttft"].mean == pytest.approx(250.0)
    assert m.stats["ttft"].median == pytest.approx(250.0)
    assert m.stats["ttft"].std == pytest.approx(float(ttfts_ms.std()))
    assert m.stats["ttft"].percentiles[99.0] == pytest.approx(float(np.percentile(ttfts_ms, 99)))
    assert m.stats["tpot"].mean == pytest.approx(100.0)  # 0.9 s / (10 - 1) tokens
    assert m.stats["itl"].median == pytest.approx(100.0)
    assert m.stats["e2el"].mean == pytest.approx(1150.0)
    assert m.request_goodput is None


def test_tpot_uses_token_count_not_chunks():
    # 4 chunks carrying 13 tokens (usage): TPOT divides by 12, ITL stays per chunk.
    m, _ = calculate_metrics([_ok(0.2, 0.8, 13, itl=[0.2, 0.2, 0.2])], 1.0, [99.0])
    assert m.stats["tpot"].mean == pytest.approx(600.0 / 12)
    assert m.stats["itl"].mean == pytest.approx(200.0)
    # No usage and no tokenizer: fall back to counting chunks.
    m, lens = calculate_metrics([_ok(0.2, 0.8, None, itl=[0.2, 0.2, 0.2])], 1.0, [99.0])
    assert lens == [4]
    # No usage, a token counter: it decides.
    _, lens = calculate_metrics([_ok(0.2, 0.8, None, itl=[0.2])], 1.0, [99.0],
                                count_tokens=lambda text: 42)
    assert lens == [42]


def test_goodput_counts_requests_meeting_every_slo():
    outs = [_ok(0.1 * (i + 1), 0.1 * (i + 1) + 0.9, 10) for i in range(4)]  # tpot 100 ms each
    outs.append(_ok(0.05, 0.05, 1))  # single token: tpot 0 for goodput
    dur = 2.0

    def good(spec):
        m, _ = calculate_metrics(outs, dur, [99.0], parse_goodput(spec))
        return round(m.request_goodput * dur)

    assert good(["ttft:250"]) == 3  # 0.1, 0.2, 0.05
    assert good(["ttft:250", "tpot:50"]) == 1  # only the single-token request
    assert good(["tpot:100.5"]) == 5
    assert good(["tpot:99.5"]) == 1
    assert good(["e2el:1150"]) == 3  # 1.0, 1.1, 0.05
    assert good(["ttft:1000", "e2el:1000"]) == 2


def test_parse_goodput_rejects_bad_specs():
    assert parse_goodput(["ttft:500", "e2el:3000.5"]) == {"ttft": 500.0, "e2el": 3000.5}
    for bad in (["itl:5"], ["ttft"], ["ttft:x"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_all_failed_reports_zeros_not_nan():
    m, _ = calculate_metrics([RequestOutput(error="boom")], 1.0, [99.0], {"ttft": 1.0})
    assert m.completed == 0 and m.failed == 1 and m.request_goodput == 0.0
    assert all(np.isfinite(s.mean) and s.mean == 0.0 for s in m.stats.values())


def test_sse_decoder_handles_split_and_joined_events():
    stream = (b'data: {"a": 1}\r\n\r\n: keepalive comment\n\ndata: {"b": 2}\n\n'
              b'event: x\ndata: [DONE]\n\n')
    for cut in range(1, len(stream)):  # every split point of one event boundary mess
        dec = SSEDecoder()
        got = dec.feed(stream[:cut]) + dec.feed(stream[cut:]) + dec.flush()
        assert got == ['{"a": 1}', '{"b": 2}', "[DONE]"], cut
    dec = SSEDecoder()
    assert dec.feed(b'data: {"tail": 1}') == [] and dec.flush() == ['{"tail": 1}']


def _reqs(n: int, out_len: int = 10) -> list[SampleRequest]:
    return [SampleRequest(prompt=f"prompt {i}", prompt_len=5, expected_output_len=out_len)
            for i in range(n)]


def _cfg(url: str, n: int = 8, out_len: int = 10, **kw) -> BenchmarkConfig:
    kw.setdefault("ready_check_timeout", 0)
    return BenchmarkConfig(url=url, model="fake-model", requests=_reqs(n, out_len),
                           disable_tqdm=True, verbose=False, **kw)


def test_timings_match_server_delays(fake_server):
    # 100 ms to the first chunk, then 9 chunks 10 ms apart.
    with fake_server(first_delay=0.1, gap=0.01) as srv:
        res = asyncio.run(run_benchmark(_cfg(srv.url, n=8, out_len=10)))
    m = res.metrics
    assert m.completed == 8 and m.failed == 0
    assert res.output_lens == [10] * 8 and m.total_output == 80 and m.total_input == 40
    assert 95 <= m.stats["ttft"].mean <= 160
    assert 9 <= m.stats["itl"].median <= 16
    assert 9 <= m.stats["tpot"].mean <= 16
    assert 185 <= m.stats["e2el"].mean <= 300
    assert all(len(o.itl) == 9 for o in res.outputs)
    for o in res.outputs:  # E2EL = TTFT + sum of gaps, per request
        assert o.latency == pytest.approx(o.ttft + sum(o.itl), abs=1e-6)
    assert m.request_throughput == pytest.approx(8 / m.duration)
    assert srv.bodies[0]["stream"] is True
    assert srv.bodies[0]["stream_options"] == {"include_usage": True}
    assert srv.bodies[0]["max_tokens"] == 10


def test_output_tokens_from_usage_then_tokenizer(fake_server, tokenizer_dir):
    # usage says 3 tokens per chunk: TPOT shrinks accordingly while ITL does not.
    with fake_server(first_delay=0.05, gap=0.02, chunks=5, tokens_per_chunk=3) as srv:
        res = asyncio.run(run_benchmark(_cfg(srv.url, n=3)))
    assert res.output_lens == [15] * 3
    tpot = res.metrics.stats["tpot"].mean
    assert 80 / 14 * 0.8 <= tpot <= 80 / 14 * 1.6  # 4 gaps x 20 ms over 14 tokens
    assert res.metrics.stats["itl"].median >= 18

    # No usage event: the tokenizer counts the generated text.
    from tandem.bench.datasets import count_tokens, load_tokenizer
    with fake_server(chunks=4, send_usage=False) as srv:
        res = asyncio.run(run_benchmark(_cfg(srv.url, n=2, tokenizer=tokenizer_dir)))
    tok = load_tokenizer(tokenizer_dir)
    expected = count_tokens(tok, " word0 word1 word2 word3")
    assert res.outputs[0].generated_text == " word0 word1 word2 word3"
    assert res.output_lens == [expected] * 2 and expected != 4
