#!/usr/bin/env bash
# The headline comparisons of bench/RESULTS.md on a 2-GPU machine, from the repo root:
#   scripts/gpu-headline.sh pd        disaggregated vs colocated goodput (+ isolated KV transfer)
#   scripts/gpu-headline.sh routing   placement policies on shared-prefix prompts
# Needs .gpu/site.tgz (bash ../shared/gpu/bundle.sh) and the grpc health/reflection wheels in
# .whl/. Results (JSON) and logs land in $OUT; make plots with `python -m tandem.bench.plots`.
# Extra flags for the driver: PD_ARGS / ROUTING_ARGS.
source "$(dirname "$0")/gpu-env.sh"
python3 -m tandem make-test-model /tmp/llama8b --preset llama-3.1-8b --no-weights >/dev/null
LOGS=/tmp/tandem-bench-logs
for what in "$@"; do
  case "$what" in
    pd) python3 -m tandem bench headline pd --model /tmp/llama8b --out "$OUT/pd.json" --log-dir $LOGS \
          --kv-bench ${PD_ARGS:-} 2>&1 | grep -v "NIXL INFO\|^Traffic\|^Burstiness\|^Maximum" | tee -a "$OUT/run.log" ;;
    routing) python3 -m tandem bench headline routing --model /tmp/llama8b --out "$OUT/routing.json" \
          --log-dir $LOGS ${ROUTING_ARGS:-} 2>&1 | grep -v "NIXL INFO\|^Traffic\|^Burstiness\|^Maximum" | tee -a "$OUT/run.log" ;;
    *) echo "unknown comparison $what (pd | routing)"; exit 2 ;;
  esac
done
tar czf "$OUT/logs.tgz" -C $LOGS . 2>/dev/null
