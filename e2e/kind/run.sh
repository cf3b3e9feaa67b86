#!/usr/bin/env bash
# End-to-end on a local kind cluster: build the image, install the chart, serve the CPU demo and
# send one OpenAI completion through the router. Needs docker, kind, kubectl, helm and curl.
# See README.md beside this file. Cleans up with KEEP=1 unset (deletes the cluster).
set -euo pipefail

CLUSTER=${CLUSTER:-tandem-e2e}
IMAGE=${IMAGE:-tandem:e2e}
NS=${NS:-tandem-system}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PORT=${PORT:-18000}

for tool in docker kind kubectl helm curl; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

cleanup() {
  [ -n "${PF_PID:-}" ] && kill "$PF_PID" 2>/dev/null || true
  if [ -z "${KEEP:-}" ]; then kind delete cluster --name "$CLUSTER"; fi
}
trap cleanup EXIT

echo "== kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s

echo "== image $IMAGE"
docker build -t "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "== helm install"
helm upgrade --install tandem "$ROOT/charts/tandem" --namespace "$NS" --create-namespace \
  --set operator.image.repository="${IMAGE%:*}" --set operator.image.tag="${IMAGE##*:}" \
  --set operator.image.pullPolicy=Never \
  --set inference.image.repository="${IMAGE%:*}" --set inference.image.tag="${IMAGE##*:}" \
  --wait --timeout 180s

echo "== demo InferenceService"
# The demo pods must not try to pull the locally loaded image.
sed 's/^spec:$/spec:\n  imagePullPolicy: Never/' "$ROOT/charts/tandem/examples/demo-cpu.yaml" | kubectl apply -f -
kubectl wait --for=condition=Ready inferenceservice/demo --timeout=600s || {
  kubectl get tisvc,deploy,pods -o wide; kubectl describe tisvc demo
  kubectl logs -n "$NS" deploy/tandem-operator --tail=100; exit 1; }
kubectl get tisvc demo

echo "== one OpenAI request through the router"
kubectl port-forward svc/demo "$PORT:8000" >/dev/null 2>&1 &
PF_PID=$!
for _ in $(seq 30); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 1; done
curl -sf "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "demo", "prompt": "Hello, my name is", "max_tokens": 8}' | tee /dev/stderr | grep -q '"choices"'
echo
echo "== e2e OK"
