"""`tandem bench headline` end to end on CPU: real `tandem serve` deployments (disaggregated with
KV transfer, colocated, a second router), the load client, the metric scrapes, then the plots and
tables made from the JSON. Tiny sizes: this checks the pipeline that made bench/RESULTS.md, not
performance."""

from __future__ import annotations

import json

import pytest

from tandem.bench import headline, plots

pytestmark = pytest.mark.timeout(300)


def _prompt_tokens(run: dict, counted: float) -> bool:
    """The workers counted every prompt token the client sent (plus at most a BOS each)."""
    return sum(run["input_lens"]) <= counted <= sum(run["input_lens"]) + len(run["input_lens"])


def test_pd_and_plots(tiny_model, tmp_path):
    out = tmp_path / "pd.json"
    rc = headline.main(["pd", "--model", tiny_model, "--dtype", "float32", "--out", str(out),
                        "--log-dir", str(tmp_path / "logs"), "--rates", "4", "--window-s", "1",
                        "--min-prompts", "6", "--input-len", "96", "--output-len", "8",
                        "--max-model-len", "512", "--drain-s", "5", "--budget-s", "240"])
    assert rc == 0
    pd = json.loads(out.read_text())
    runs = {r["config"]: r for r in pd["runs"]}
    assert set(runs) == {"disaggregated", "colocated"}
    for r in runs.values():
        assert r["completed"] == 6 and r["failed"] == 0
        assert 0.0 <= r["slo_attainment"] <= 1.0
        assert all(64 <= n <= 128 for n in r["input_lens"])          # 96 +- 1/3
    dis, col = runs["disaggregated"], runs["colocated"]
    # disaggregated: the prefill worker computed every prompt and shipped its KV; colocated: the
    # decode workers did, and nothing moved
    assert _prompt_tokens(dis, dis["engine"]["prefill"]["tandem_engine_computed_prompt_tokens_total"])
    assert dis["engine"]["decode"]["tandem_engine_computed_prompt_tokens_total"] == 0   # router saw prefill
    assert dis["kv"]["tandem_kv_transfer_duration_seconds_count"] == 6
    assert dis["kv"]["tandem_kv_transfer_bytes_total"] > 0
    assert _prompt_tokens(col, col["engine"]["decode"]["tandem_engine_computed_prompt_tokens_total"])
    assert "kv" not in col

    pngs = plots.plot_pd(pd, str(tmp_path))
    assert all((tmp_path / p).stat().st_size > 10_000 for p in pngs)
    md = plots.md_pd(pd)
    assert "| disaggregated | 4 | 6 |" in md and "Headline, disaggregated vs colocated: at 4 req/s" in md
    assert all(len(r["itl_p99s"]) == 6 for r in runs.values())
    # every token gap of a tiny CPU model is far below an hour: all requests meet the ITL SLO
    # exactly when they meet the TTFT SLO
    for r in runs.values():
        assert plots.itl_attainment(r, 3.6e6) == sum(t <= 1.0 for t in r["ttfts"]) / 6
    assert "Streaming SLO" in md


def test_routing_records_reuse_per_policy(tiny_model, tmp_path):
    out = tmp_path / "routing.json"
    rc = headline.main(["routing", "--model", tiny_model, "--dtype", "float32", "--out", str(out),
                        "--log-dir", str(tmp_path / "logs"), "--policies", "cache-aware,round-robin",
                        "--groups", "2", "--prompts-per-group", "3", "--system-prompt-len", "128",
                        "--question-len", "80", "--output-len", "4", "--rates", "2",
                        "--max-model-len", "512", "--drain-s", "5", "--budget-s", "240"])
    assert rc == 0
    rt = json.loads(out.read_text())
    assert [r["policy"] for r in rt["runs"]] == ["cache-aware", "round-robin"]
    for r in rt["runs"]:
        assert r["completed"] == 6
        pre = r["engine"]["prefill"]
        # every prompt went through the prefill pool, and some system prompt came from a cache
        assert _prompt_tokens(r, pre["tandem_engine_prompt_tokens_total"])
        assert pre["tandem_engine_prefix_cache_hit_tokens_total"] > 0
        assert sum(w["tandem_engine_prompt_tokens_total"] for w in r["per_worker"].values()) \
            == pre["tandem_engine_prompt_tokens_total"]
    assert plots.plot_routing(rt, str(tmp_path))
    assert "round-robin / cache-aware" in plots.md_routing(rt)
