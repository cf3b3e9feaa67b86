"""``tandem bench serve``: command-line front end of :func:`tandem.bench.runner.run_benchmark`.

Data flow: argv -> :func:`build_parser` (flags named as ``vllm bench serve`` names them) ->
:func:`config_from_args` -> :class:`BenchmarkConfig` -> ``run_benchmark`` -> the results table on
stdout (plus the first errors) -> with ``--save-result``, the JSON file.

``tandem/cli.py`` dispatches ``tandem bench serve ...`` to :func:`main` (a leading ``serve`` in
argv is accepted and dropped) or embeds the flags in its own parser with :func:`add_cli_args`
and calls :func:`run_from_args`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from tandem.bench.client import BACKENDS
from tandem.bench.datasets import DATASETS, DatasetConfig
from tandem.bench.metrics import METRICS, parse_goodput
from tandem.bench.report import error_summary, format_table, save_result
from tandem.bench.runner import BenchmarkConfig, run_benchmark

DESCRIPTION = """\
Load-test an OpenAI-compatible server (Tandem's router, vLLM, SGLang, ...) and report TTFT,
TPOT, ITL, E2EL, throughput and goodput with the definitions and JSON keys of `vllm bench serve`.
Requests stream (SSE); prompts are built to exact token lengths with the model's tokenizer."""

EPILOG = """\
examples:
  tandem bench serve --url http://127.0.0.1:8000 --tokenizer ./models/demo \\
      --dataset-name random --random-input-len 1024 --random-output-len 128 \\
      --num-prompts 200 --request-rate 8 --goodput ttft:500 tpot:50 --save-result
  tandem bench serve --url http://router:8000 --tokenizer ./models/llama \\
      --dataset-name generated-shared-prefix --max-concurrency 64 --ignore-eos"""


def _rate(s: str) -> float:
    v = float(s)  # float("inf") parses "inf"
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0 (or inf)")
    return v


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _header(s: str) -> tuple[str, str]:
    k, sep, v = s.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"header {s!r} is not KEY=VALUE")
    return k, v


def add_cli_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--url", default="http://127.0.0.1:8000",
                   help="Base URL of the server (a trailing /v1 is accepted). Default: %(default)s")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="API flavour: 'openai' (/v1/completions, prompt text) or 'openai-chat' "
                        "(/v1/chat/completions, one user message). Default: inferred from "
                        "--endpoint, else openai.")
    g.add_argument("--endpoint", default=None,
                   help="Path to POST to. Default: /v1/completions for openai, "
                        "/v1/chat/completions for openai-chat.")
    g.add_argument("--model", default=None,
                   help="Model name to put in requests. Default: the first id GET /v1/models lists.")
    g.add_argument("--tokenizer", default=None,
                   help="Hugging Face model dir with tokenizer.json (or the file). Builds prompts "
                        "of exact token lengths and counts output tokens when the server sends "
                        "no usage. Required unless --model is a local dir holding tokenizer.json.")
    g.add_argument("--header", type=_header, nargs="*", default=[], metavar="KEY=VALUE",
                   help="Extra HTTP headers for every request, e.g. Authorization=Bearer\\ x.")
    g.add_argument("--extra-body", default=None, metavar="JSON",
                   help="JSON object merged into every request body, e.g. '{\"top_p\": 0.9}'.")
    g.add_argument("--ready-check-timeout-sec", type=float, default=60.0,
                   help="Before the run, send the first prompt until it succeeds, retrying for up "
                        "to this many seconds while the server is unreachable or answers 5xx "
                        "(a 4xx fails at once). 0 skips the check. Default: %(default)s")
    g.add_argument("--request-timeout", type=float, default=6 * 3600.0,
                   help="Seconds before one request is abandoned and counted as failed. "
                        "Default: %(default)s")

    g = p.add_argument_group("load")
    g.add_argument("--num-prompts", type=int, default=1000,
                   help="Number of requests to send (generated-shared-prefix ignores it and sends "
                        "groups x prompts-per-group). Default: %(default)s")
    g.add_argument("--request-rate", type=_rate, default=float("inf"),
                   help="Mean arrival rate in requests/s; 'inf' sends everything at once. "
                        "Default: inf")
    g.add_argument("--burstiness", type=_rate, default=1.0,
                   help="Shape of the gamma distribution of arrival gaps (mean 1/rate): 1 is a "
                        "Poisson process, <1 burstier, >1 more regular, 'inf' a fixed interval. "
                        "Only used with a finite --request-rate. Default: %(default)s")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="At most this many requests in flight; arrivals beyond it wait on the "
                        "client, so the achieved rate may fall below --request-rate. "
                        "Default: unlimited")
    g.add_argument("--seed", type=int, default=0,
                   help="Seed for prompt sampling and arrival times. Default: %(default)s")
    g.add_argument("--ignore-eos", action="store_true",
                   help="Send ignore_eos=true so every request generates its full output length.")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="Sampling temperature sent with every request. Default: %(default)s (greedy)")

    g = p.add_argument_group("metrics")
    g.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="Service-level objectives in ms, e.g. 'ttft:500 tpot:50 e2el:10000'; "
                        "goodput is completed requests/s that meet all of them.")
    g.add_argument("--percentile-metrics", type=_csv, default=list(METRICS), metavar="LIST",
                   help="Comma-separated metrics to report mean/median/std/percentiles for, from "
                        f"{','.join(METRICS)}. Default: all")
    g.add_argument("--metric-percentiles", type=_csv, default=["99"], metavar="LIST",
                   help="Comma-separated percentiles to report, e.g. '50,90,99'. Default: 99")

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", choices=DATASETS, default="random",
                   help="Prompt source. Default: %(default)s")
    g.add_argument("--dataset-path", default=None,
                   help="ShareGPT-format JSON file (for --dataset-name sharegpt): the first human "
                        "turn is the prompt, the gpt reply's token count the output length; "
                        "prompts <4 or >1024 tokens, replies <4, pairs >2048 are skipped.")
    g.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="Ask for this many output tokens instead of the gpt reply's length.")
    d = DatasetConfig()
    g.add_argument("--random-input-len", type=int, default=d.random_input_len,
                   help="random: prompt tokens after the prefix. Default: %(default)s")
    g.add_argument("--random-output-len", type=int, default=d.random_output_len,
                   help="random: max output tokens. Default: %(default)s")
    g.add_argument("--random-range-ratio", type=float, default=d.random_range_ratio,
                   help="random: draw input and output lengths uniformly from "
                        "[len*(1-r), len*(1+r)], 0 <= r < 1. Default: %(default)s")
    g.add_argument("--random-output-range-ratio", type=float, default=None,
                   help="random: a separate ratio for output lengths, e.g. input 2048-4096 with "
                        "output 128-512. Default: --random-range-ratio")
    g.add_argument("--random-prefix-len", type=int, default=d.random_prefix_len,
                   help="random: tokens of one prefix shared by all prompts. Default: %(default)s")
    g.add_argument("--prefix-repetition-prefix-len", type=int,
                   default=d.prefix_repetition_prefix_len,
                   help="prefix-repetition: tokens per shared prefix. Default: %(default)s")
    g.add_argument("--prefix-repetition-suffix-len", type=int,
                   default=d.prefix_repetition_suffix_len,
                   help="prefix-repetition: unique tokens after the prefix. Default: %(default)s")
    g.add_argument("--prefix-repetition-num-prefixes", type=int,
                   default=d.prefix_repetition_num_prefixes,
                   help="prefix-repetition: distinct prefixes; each gets num-prompts/num-prefixes "
                        "prompts. Default: %(default)s")
    g.add_argument("--prefix-repetition-output-len", type=int,
                   default=d.prefix_repetition_output_len,
                   help="prefix-repetition: max output tokens. Default: %(default)s")
    g.add_argument("--gsp-num-groups", type=int, default=d.gsp_num_groups,
                   help="generated-shared-prefix: groups (system prompts). Default: %(default)s")
    g.add_argument("--gsp-prompts-per-group", type=int, default=d.gsp_prompts_per_group,
                   help="generated-shared-prefix: questions per group. Default: %(default)s")
    g.add_argument("--gsp-system-prompt-len", type=int, default=d.gsp_system_prompt_len,
                   help="generated-shared-prefix: tokens per system prompt. Default: %(default)s")
    g.add_argument("--gsp-question-len", type=int, default=d.gsp_question_len,
                   help="generated-shared-prefix: tokens per question. Default: %(default)s")
    g.add_argument("--gsp-output-len", type=int, default=d.gsp_output_len,
                   help="generated-shared-prefix: max output tokens. Default: %(default)s")

    g = p.add_argument_group("output")
    g.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    g.add_argument("--label", default=None,
                   help="Name for this run, used as the result file prefix. Default: the backend")
    g.add_argument("--save-result", action="store_true",
                   help="Write the result JSON (vLLM's keys, per-request arrays, run config).")
    g.add_argument("--result-dir", default=None,
                   help="Directory for the result JSON. Default: the current directory")
    g.add_argument("--result-filename", default=None,
                   help="File name for the result JSON. Default: "
                        "{label}-{rate}qps[-concurrency{N}]-{model}-{date}.json")
    g.add_argument("--save-detailed", action="store_true",
                   help="Also store every generated text in the result JSON.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench serve", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p)
    return p


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    dataset = DatasetConfig(
        name=args.dataset_name, num_prompts=args.num_prompts, dataset_path=args.dataset_path,
        sharegpt_output_len=args.sharegpt_output_len,
        **{k: getattr(args, k) for k in vars(DatasetConfig())
           if k.startswith(("random_", "prefix_repetition_", "gsp_"))})
    return BenchmarkConfig(
        url=args.url, backend=args.backend, endpoint=args.endpoint, model=args.model,
        tokenizer=args.tokenizer, dataset=dataset, seed=args.seed,
        request_rate=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, ignore_eos=args.ignore_eos,
        temperature=args.temperature, goodput=parse_goodput(args.goodput),
        percentile_metrics=args.percentile_metrics,
        metric_percentiles=[float(p) for p in args.metric_percentiles],
        headers=dict(args.header or []), extra_body=extra,
        ready_check_timeout=args.ready_check_timeout_sec, request_timeout=args.request_timeout,
        disable_tqdm=args.disable_tqdm, label=args.label)


def run_from_args(args: argparse.Namespace) -> int:
    """Run, print, save. Exit status: 0 if any request completed, 1 if none did, 2 on bad
    arguments or a failed ready check."""
    try:
        config = config_from_args(args)
        result = asyncio.run(run_benchmark(config))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"tandem bench serve: error: {e}", file=sys.stderr)
        return 2
    errors = error_summary(result)
    if errors:
        print(errors)
    print(format_table(result))
    if args.save_result:
        path = save_result(result, args.result_dir, args.result_filename, args.save_detailed)
        print(f"Saved result to {path}")
    return 0 if result.metrics.completed else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    return run_from_args(build_parser().parse_args(argv))
