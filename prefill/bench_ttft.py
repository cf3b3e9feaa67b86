"""Time to first token of long prompts, disaggregated vs colocated, through real workers.

Starts a prefill worker on one device and a decode worker on another (separate processes, the
same commands pods run), then for fresh random prompts (no prefix-cache hits) measures, at the
client, the time from sending Generate to the first streamed token:
  colocated      Generate on the decode worker without a prefill endpoint (it prefills itself)
  disaggregated  Generate with prefill_endpoint: the prefill worker computes and writes the KV
                 into the decode worker's blocks (`--kv-transfer`), decode streams from there
Prints a table and writes JSON (`--json`). Also reports the KV bytes and transfer time that the
decode worker's metrics recorded.

    python -m tandem.prefill.bench_ttft --model DIR --load-format random --prompt-len 4096
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import grpc

from tandem.bench.deploy import scrape as metrics_page
from tandem.engine.sampling import SamplingParams
from tandem.proto import worker_pb2 as pb
from tandem.proto import worker_pb2_grpc as pb_grpc
from tandem.proto.convert import VERSION, params_to_proto
from tandem.serve.procs import http_ok


def start(role, args, device, grpc_port, http_port, extra=()):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
        device = "cuda"
    cmd = [sys.executable, "-m", "tandem", role, "--model", args.model, "--load-format", args.load_format,
           "--dtype", args.dtype, "--device", device, "--host", "127.0.0.1", "--advertise-host", "127.0.0.1",
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--kv-transfer", args.kv_transfer,
           "--max-batch-tokens", str(max(8192, args.prompt_len)), "--gpu-memory-utilization", "0.85",
           "--max-model-len", str(args.prompt_len + 1024), *extra]
    log = open(os.path.join(args.log_dir, f"{role}.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(port, proc, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        if http_ok(f"http://127.0.0.1:{port}/ready"):
            return
        time.sleep(0.5)
    raise TimeoutError("worker not ready")


def ttft(stub, ids, prefill_endpoint, max_tokens):
    req = pb.GenerateRequest(version=VERSION, request_id=f"b-{time.monotonic_ns()}", token_ids=ids,
                             params=params_to_proto(SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                   ignore_eos=True)),
                             prefill_endpoint=prefill_endpoint)
    t0 = time.perf_counter()
    first, mode = None, ""
    for resp in stub.Generate(req, timeout=300):
        if first is None:
            first, mode = time.perf_counter() - t0, resp.prefill_mode
    return first, mode


def scrape(port, name):
    return metrics_page(f"http://127.0.0.1:{port}/metrics", {"direction": "recv"}).get(name, 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prefill-device", default="cuda:0")
    p.add_argument("--decode-device", default="cuda:1")
    p.add_argument("--kv-transfer", default="nixl")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--log-dir", default="/tmp")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    ports = dict(pg=50161, ph=8181, dg=50162, dh=8182)
    pre = start("prefill", args, args.prefill_device, ports["pg"], ports["ph"])
    dec = start("decode", args, args.decode_device, ports["dg"], ports["dh"], ("--remote-prefill-threshold", "1"))
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "prompt_len": args.prompt_len,
           "kv_transfer": args.kv_transfer, "prefill_device": args.prefill_device,
           "decode_device": args.decode_device}
    try:
        wait_ready(ports["ph"], pre)
        wait_ready(ports["dh"], dec)
        rng = random.Random(0)
        ch = grpc.insecure_channel(f"127.0.0.1:{ports['dg']}")
        stub = pb_grpc.DecodeWorkerStub(ch)
        prefill_ep = f"127.0.0.1:{ports['pg']}"
        vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
        prompt = lambda: [rng.randrange(vocab) for _ in range(args.prompt_len)]  # noqa: E731
        for ep in ("", prefill_ep, "", prefill_ep):       # warm-up (handshake, kernels, allocator)
            ttft(stub, prompt(), ep, args.max_tokens)
        colo, disagg, modes = [], [], set()
        b0 = scrape(ports["dh"], "tandem_kv_transfer_bytes_total")
        s0 = scrape(ports["dh"], "tandem_kv_transfer_duration_seconds_sum")
        for _ in range(args.trials):                      # interleaved, fresh prompts
            t, m = ttft(stub, prompt(), "", args.max_tokens)
            colo.append(t)
            modes.add(("colocated", m))
            t, m = ttft(stub, prompt(), prefill_ep, args.max_tokens)
            disagg.append(t)
            modes.add(("disaggregated", m))
        nbytes = scrape(ports["dh"], "tandem_kv_transfer_bytes_total") - b0
        secs = scrape(ports["dh"], "tandem_kv_transfer_duration_seconds_sum") - s0
        c, d = statistics.median(colo), statistics.median(disagg)
        res.update(colocated_ttft_ms=[x * 1e3 for x in colo], disaggregated_ttft_ms=[x * 1e3 for x in disagg],
                   colocated_median_ms=c * 1e3, disaggregated_median_ms=d * 1e3, overhead=d / c - 1,
                   kv_bytes_per_request=nbytes / args.trials, kv_transfer_s_per_request=secs / args.trials,
                   modes=sorted(modes))
        print(f"prompt {args.prompt_len} tokens, {args.trials} trials each, kv-transfer {args.kv_transfer}")
        print(f"  colocated     TTFT median {c * 1e3:7.1f} ms  (min {min(colo) * 1e3:.1f})")
        print(f"  disaggregated TTFT median {d * 1e3:7.1f} ms  (min {min(disagg) * 1e3:.1f})  "
              f"overhead {100 * (d / c - 1):+.1f}%")
        print(f"  KV per request {nbytes / args.trials / 2**20:.1f} MiB, receiver-side transfer time "
              f"{secs / args.trials * 1e3:.2f} ms ({nbytes / max(secs, 1e-9) / 1e9:.1f} GB/s)  modes {sorted(modes)}")
    finally:
        for proc in (pre, dec):
            if proc.poll() is None:
                proc.terminate()
        for proc in (pre, dec):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
