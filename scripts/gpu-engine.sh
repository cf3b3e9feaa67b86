#!/usr/bin/env bash
# GPU checks for the engine, run on the device machine from the repo root:
#   GPU tests (bf16 parity with transformers, flashinfer vs torch attention), then
#   `tandem bench engine` on a Llama-3.1-8B-shaped random bf16 model. Results land in $OUT.
source "$(dirname "$0")/gpu-env.sh"
python3 -c 'import torch, flashinfer, transformers; print("torch", torch.__version__, "flashinfer", flashinfer.__version__, "transformers", transformers.__version__)'
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -s -p no:cacheprovider tests/gpu ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m tandem make-test-model /tmp/llama8b --preset llama-3.1-8b --no-weights
  python3 -m tandem bench engine --model /tmp/llama8b --load-format random --dtype bfloat16 \
    --json "$OUT/bench-engine.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench-engine.log" | grep -v '^\[tandem\]' | tail -30
fi
