"""CPU serving benchmark through the router: for each --policies entry, a fresh router + 2 prefill
+ 1 decode workers (tcp KV transfer, decode always prefills remotely) on a generated tiny model,
then `tandem bench serve` with a shared-prefix workload. Prints each results table and the
prefill workers' prefix-cache hit ratio (what cache-aware routing should raise).

    .venv/bin/python scripts/router_bench_cpu.py --policies round-robin,least-load
    .venv/bin/python scripts/router_bench_cpu.py --policies round-robin,cache-aware  # after placement lands
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tandem.engine.make_model import make_test_model  # noqa: E402
from tests.pd.harness import metric_value  # noqa: E402
from tests.router.conftest import start_cluster, stop_cluster  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="round-robin,least-load")
    p.add_argument("--bench-args", default="--dataset-name generated-shared-prefix --gsp-num-groups 8 "
                   "--gsp-prompts-per-group 8 --gsp-system-prompt-len 512 --gsp-question-len 32 "
                   "--gsp-output-len 32 --max-concurrency 8 --ignore-eos --seed 0",
                   help="flags for `tandem bench serve` (besides --url/--tokenizer)")
    p.add_argument("--worker-args", default="--num-kv-blocks 2048",
                   help="extra worker flags (the test harness's 256 KV blocks cannot hold the "
                        "concurrent prompts of a shared-prefix run)")
    p.add_argument("--repeat", type=int, default=1, help="runs per policy, interleaved (CPU noise)")
    p.add_argument("--result-dir", default=None, help="also save each result JSON here")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="router-bench-")
    model = str(make_test_model(os.path.join(work, "model"), arch="llama"))
    for policy in args.policies.split(",") * args.repeat:
        c = start_cluster(model, work, policy=policy, worker_args=args.worker_args.split())
        try:
            cmd = [sys.executable, "-m", "tandem", "bench", "serve", "--url", c.url, "--tokenizer", model,
                   "--disable-tqdm", "--label", f"router-{policy}", *args.bench_args.split()]
            if args.result_dir:
                cmd += ["--save-result", "--result-dir", args.result_dir]
            print(f"\n===== policy {policy}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
            hit = sum(metric_value(w.metrics(), "tandem_engine_prefix_cache_hit_tokens_total") for w in c.prefills)
            query = sum(metric_value(w.metrics(), "tandem_engine_prefix_cache_query_tokens_total") for w in c.prefills)
            print(f"prefill prefix-cache hits: {hit:.0f} / {query:.0f} tokens "
                  f"({100 * hit / max(query, 1):.1f}%)", flush=True)
        finally:
            stop_cluster(c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
