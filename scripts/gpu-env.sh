# Sourced by the scripts/gpu-*.sh runners on the device machine (repo root): unpack the carried
# flashinfer/nixl bundle (.gpu/site.tgz) and any carried wheels (.whl/), install the project
# in place, record the GPUs in $OUT/gpu.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/site && tar xzf .gpu/site.tgz -C /tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m | head -4 >> "$OUT/gpu.txt"
