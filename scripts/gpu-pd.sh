#!/usr/bin/env bash
# Two-GPU checks for disaggregation, run on the device machine from the repo root:
# KV transfer GB/s vs a torch peer copy (same run), kvtransfer GPU tests, then TTFT of a 4k-token
# prompt disaggregated (prefill GPU 0 -> decode GPU 1) vs colocated. Results land in $OUT.
source "$(dirname "$0")/gpu-env.sh"
if [ "${SKIP_XFER:-0}" != 1 ]; then
  python3 -m tandem.kvtransfer.bench --backend nixl --device cuda --src-gpu 0 --dst-gpu 1 ${XFER_ARGS:-} 2>&1 | tee "$OUT/kv-bench.log" | grep -v "NIXL INFO" | tail -15
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/kvtransfer 2>&1 | tail -3
fi
if [ "${SKIP_TTFT:-0}" != 1 ]; then
  python3 -m tandem make-test-model /tmp/llama8b --preset llama-3.1-8b --no-weights >/dev/null
  python3 -m tandem.prefill.bench_ttft --model /tmp/llama8b --load-format random --prompt-len 4096 \
    --log-dir "$OUT" --json "$OUT/ttft.json" ${TTFT_ARGS:-} 2>&1 | tail -8
fi
