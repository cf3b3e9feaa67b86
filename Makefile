# Two commands set everything up on a fresh machine:
#   make serve   - a local router + prefill + decode on a generated demo model (CPU or GPU)
#   make test    - the CI suite (CPU only)
# Both create .venv on first use. Where a CUDA torch is already installed for python3, the venv
# sees it (--system-site-packages); otherwise it gets torch==2.13.0, the CPU build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.tandem-installed
# Kubernetes tests: test-only packages in .venv, and a Python 3.12 environment for the Helm engine
# (helm-sdkpy), which tests/charts runs as a subprocess.
K8S_STAMP := $(VENV)/.tandem-k8s-installed
HELM_PYTHON ?= PYENV_VERSION=3.12.1 python3
HELM_VENV ?= .venv-helm
HELM_STAMP := $(HELM_VENV)/.tandem-installed

.PHONY: serve test venv proto clean lint k8s-deps

venv: $(STAMP)

# The nixl extra (KV transfer over UCX) is installed on CPU-only machines too: the kvtransfer
# tests move DRAM between processes with it. The ray extra (plain `ray`, no dashboard or
# serve extras: one wheel) lets e2e/ run `tandem serve --launcher ray` in CI.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then \
	    echo "[make] CUDA torch found for $(PYTHON): creating $(VENV) with system site-packages"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    echo "[make] creating $(VENV) (CPU torch==2.13.0)"; \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	$(PIP) install -q --upgrade pip
	@$(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,nixl,ray]'
	@touch $(STAMP)

$(K8S_STAMP): $(STAMP) tests/operator/requirements.txt
	$(PIP) install -q -r tests/operator/requirements.txt
	@touch $@

$(HELM_STAMP): tests/charts/requirements-helm.txt
	@[ -x $(HELM_VENV)/bin/python ] || $(HELM_PYTHON) -m venv $(HELM_VENV)
	$(HELM_VENV)/bin/python -m pip install -q -r tests/charts/requirements-helm.txt
	@touch $@

k8s-deps: $(K8S_STAMP) $(HELM_STAMP)

proto: $(STAMP)
	$(PY) -m tandem.proto_gen

serve: $(STAMP)
	$(VENV)/bin/tandem serve $(ARGS)

test: $(STAMP) $(K8S_STAMP) $(HELM_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(HELM_VENV) build *.egg-info
