"""The CLI end to end against the fake server: table, JSON file keys, chat backend, --help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tandem.bench.cli import build_parser, config_from_args, main

VLLM_KEYS = [
    "date", "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "input_lens", "output_lens", "ttfts", "itls", "errors", "max_concurrency", "num_prompts",
    "request_rate", "burstiness", "model_id", "tokenizer_id", "backend",
] + [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
     for s in ("mean", "median", "std", "p99", "p50")]


def test_cli_prints_table_and_saves_vllm_json(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server(first_delay=0.02, gap=0.002) as srv:
        rc = main(["serve", "--url", srv.url, "--tokenizer", tokenizer_dir,
                   "--dataset-name", "random", "--random-input-len", "40",
                   "--random-output-len", "6", "--num-prompts", "10", "--max-concurrency", "4",
                   "--request-rate", "200", "--goodput", "ttft:10000", "tpot:10000",
                   "--metric-percentiles", "50,99", "--ignore-eos", "--disable-tqdm",
                   "--save-result", "--result-dir", str(tmp_path), "--seed", "7"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in out
    for label in ("Successful requests:", "Request goodput (req/s):", "Mean TTFT (ms):",
                  "P99 ITL (ms):", "P50 E2EL (ms):", "Maximum request concurrency:"):
        assert label in out
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("openai-200.0qps-concurrency4-fake-model-")
    with open(tmp_path / files[0]) as f:
        res = json.load(f)
    missing = [k for k in VLLM_KEYS if k not in res]
    assert not missing
    assert res["completed"] == 10 and res["failed"] == 0 and res["num_prompts"] == 10
    assert res["model_id"] == "fake-model"  # from GET /v1/models: no --model given
    assert res["request_goodput"] == pytest.approx(res["request_throughput"])  # SLOs all met
    assert len(res["ttfts"]) == len(res["itls"]) == len(res["input_lens"]) == 10
    assert res["output_lens"] == [6] * 10 and res["total_output_tokens"] == 60
    assert all(38 <= n <= 42 for n in res["input_lens"])
    assert res["total_input_tokens"] == sum(res["input_lens"])
    assert res["errors"] == [""] * 10 and "generated_texts" not in res
    assert res["goodput_config"] == {"ttft": 10000.0, "tpot": 10000.0}
    assert res["request_rate"] == 200.0 and res["burstiness"] == 1.0 and res["seed"] == 7
    # The ready check sent one extra request; every body asked for ignore_eos and usage.
    assert len(srv.bodies) == 11
    assert all(b["ignore_eos"] is True and b["max_tokens"] == 6 for b in srv.bodies)


def test_cli_chat_backend_and_detailed_json(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server(first_delay=0.08, model="served-name") as srv:
        rc = main(["serve", "--url", srv.url + "/v1", "--tokenizer", tokenizer_dir,
                   "--endpoint", "/v1/chat/completions", "--num-prompts", "3",
                   "--random-input-len", "20", "--random-output-len", "4",
                   "--percentile-metrics", "ttft,e2el", "--disable-tqdm", "--save-result",
                   "--save-detailed", "--result-filename", "r.json", "--result-dir",
                   str(tmp_path), "--extra-body", '{"top_k": 5}', "--header", "X-Test=1"])
    assert rc == 0
    res = json.load(open(tmp_path / "r.json"))
    assert srv.paths == ["/v1/chat/completions"] * 4
    body = srv.bodies[-1]
    assert body["model"] == "served-name" and body["top_k"] == 5
    assert body["messages"][0]["role"] == "user" and body["max_completion_tokens"] == 4
    assert res["backend"] == "openai-chat" and res["request_rate"] == "inf"
    # The role-only first delta must not count as the first token.
    assert min(res["ttfts"]) >= 0.075
    assert res["generated_texts"] == [" word0 word1 word2 word3"] * 3
    assert "mean_ttft_ms" in res and "mean_e2el_ms" in res and "mean_itl_ms" not in res
    assert "Mean ITL" not in capsys.readouterr().out


def test_cli_exit_codes(fake_server, tokenizer_dir, capsys):
    with fake_server(fail=lambda i, b: 500) as srv:
        rc = main(["serve", "--url", srv.url, "--model", "m", "--tokenizer", tokenizer_dir,
                   "--num-prompts", "4", "--random-input-len", "8", "--disable-tqdm",
                   "--ready-check-timeout-sec", "0"])
    assert rc == 1  # ran, but nothing completed
    out = capsys.readouterr().out
    assert "Failed requests: 4 of 4" in out and "HTTP 500" in out
    assert main(["serve", "--url", "http://127.0.0.1:1", "--model", "m"]) == 2  # no tokenizer
    assert "--tokenizer is needed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--request-rate", "0"])


def test_help_explains_every_flag():
    parser = build_parser()
    undocumented = [a.option_strings for a in parser._actions
                    if a.option_strings and not (a.help or "").strip()]
    assert not undocumented
    args = parser.parse_args(["--backend", "openai-chat", "--burstiness", "inf",
                              "--gsp-num-groups", "3", "--header", "A=b", "c=d=e"])
    cfg = config_from_args(args)
    assert cfg.resolved_endpoint() == ("openai-chat", "/v1/chat/completions")
    assert cfg.burstiness == float("inf") and cfg.dataset.gsp_num_groups == 3
    assert cfg.headers == {"A": "b", "c": "d=e"}
    bad = config_from_args(parser.parse_args(["--backend", "openai-chat",
                                              "--endpoint", "/v1/completions"]))
    with pytest.raises(ValueError):
        bad.resolved_endpoint()


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "tandem.bench", "serve", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--request-rate" in r.stdout and "--gsp-output-len" in r.stdout


def test_model_dir_doubles_as_tokenizer(fake_server, tokenizer_dir, capsys):
    with fake_server() as srv:
        rc = main(["serve", "--url", srv.url, "--model", tokenizer_dir, "--num-prompts", "2",
                   "--random-input-len", "16", "--random-output-len", "2", "--disable-tqdm"])
    assert rc == 0 and srv.bodies[0]["model"] == tokenizer_dir
    n = int(re.search(r"Total input tokens:\s+(\d+)", capsys.readouterr().out).group(1))
    assert 30 <= n <= 34  # 2 prompts x 16 tokens, counted with the model dir's tokenizer


def test_progress_falls_back_without_tqdm(monkeypatch, capsys):
    from tandem.bench.progress import make_progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    bar = make_progress(3, desc="reqs")
    assert type(bar).__module__ == "tandem.bench.progress"
    for _ in range(3):
        bar.update()
    bar.close()
    assert "reqs: 3/3" in capsys.readouterr().err
    monkeypatch.undo()
    real = make_progress(3)
    assert type(real).__name__ == "tqdm"
    real.close()
