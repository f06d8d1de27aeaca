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

# on one CUDA GPU, ~8 min: bench at GPT-2-small shape, bf16+compile, fp16, torchrun (scripts/gpu_check.sh)
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
