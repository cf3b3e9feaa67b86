# The one Tandem image: router, prefill and decode workers, the model downloader and the operator
# all run from it (entrypoint `tandem`; the operator chart runs `python -m tandem.operator`).
#
#   docker build -t tandem:dev .                      # CPU torch: demos, kind, CI
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t tandem:cuda .
#
# CUDA variant: the build arg above installs a CUDA build of torch on the same slim base; the
# NVIDIA container toolkit injects the driver at run time. For NIXL over RDMA (UCX with
# verbs) start from nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 instead, install python3.12 and
# libibverbs1/ibverbs-providers/rdma-core, and keep the rest of this file as is.
FROM python:3.12-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /src
# The whole repository (.dockerignore drops venvs, caches and model files): every top-level
# component folder is mapped into the tandem package by pyproject.toml.
COPY . .
RUN set -eux; \
    pip install --index-url "$TORCH_INDEX" torch; \
    pip install ".[nixl,k8s]" "huggingface_hub[cli]"; \
    useradd --uid 10001 --create-home tandem; \
    # A tiny generated model for the CPU demo (examples/demo-cpu.yaml: file:///models/demo).
    mkdir -p /models && tandem make-test-model /models/demo --preset tiny && chown -R tandem /models

USER 10001
WORKDIR /home/tandem
EXPOSE 8000 8081 50051 50061
ENTRYPOINT ["tandem"]
CMD ["--help"]
