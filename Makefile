# `make test` and `make demo` set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first and pinned to a release in range, so pip takes the local CPU wheel
# instead of resolving a multi-GB CUDA build for the unpinned dependency.
TORCH  ?= torch==2.13.0

.PHONY: install lint test demo bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[harness,test]'
	touch $(STAMP)

install: $(STAMP)

# The quick loop: lint, format and type checks (seconds).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts examples
	$(VENV)/bin/ruff format --check src tests scripts examples
	$(VENV)/bin/mypy

test: lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -n 2 --dist loadfile \
		--cov=samlm --cov-report=term:skip-covered

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/samlm demo

bench: $(STAMP)
	$(VENV)/bin/samlm bench --steps 20 --json runs/bench.json

# on one CUDA GPU, ~8 min: bench at GPT-2-small shape, bf16+compile, fp16, torchrun (scripts/gpu_check.sh).
# PYTHON=python3: the cluster's Python with its own CUDA PyTorch runs it from this checkout, with no
# venv and no pip (a pre-flight names anything missing first).
PYTHON ?=
gpu-check: $(if $(PYTHON),,$(STAMP))
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHON="$(or $(PYTHON),$(PY))" bash scripts/gpu_check.sh

# An offline install for an air-gapped node (docs/scale.md). `make wheels` (on a machine with an
# index) writes WHEELS: samlm's wheel and its EXTRAS' dependencies for the node's Python and
# platform, without torch or its CUDA wheels (the node has its own PyTorch, TORCH_VERSION).
# `make install-wheels WHEELS=DIR PYTHON=python3` (on the node) makes VENV over the node's torch
# (--system-site-packages) and installs from DIR with no index.
WHEELS         ?= dist/wheelhouse
EXTRAS         ?= harness
WHEEL_PYTHON   ?= 3.11
WHEEL_PLATFORM ?= manylinux2014_x86_64
TORCH_VERSION  ?= $(patsubst torch==%,%,$(TORCH))
.PHONY: wheels install-wheels
wheels:
	$(or $(PYTHON),python3) scripts/wheelhouse.py "$(WHEELS)" --extras "$(EXTRAS)" --python-version $(WHEEL_PYTHON) \
		$(foreach p,$(WHEEL_PLATFORM),--platform $(p)) --torch $(TORCH_VERSION)

install-wheels:
	test -x $(PY) || $(or $(PYTHON),python3) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --no-index --find-links "$(WHEELS)" 'samlm[$(EXTRAS)]'

clean:
	rm -rf $(VENV) runs
