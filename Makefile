# The README's two commands: `make quickstart` (set up, then run the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this project is tested with; override for another CUDA/CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup data quickstart test test-slow gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist where apt is usable (else dsctl falls back to a download).
data:
	@if [ -x "$$(command -v apt-get)" ] && [ "$$(id -u)" = 0 ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null || echo "note: apt-get install dataset-fashion-mnist failed"; fi

quickstart: setup data
	$(VENV)/bin/dsctl quickstart

# one pytest worker per core (each with one torch thread, tests/conftest.py); the slow suite runs serially
# because its kill and torchrun tests time processes against each other
test: setup data
	$(PY) -m pytest -q -n auto

test-slow: setup data
	$(PY) -m pytest -q -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# on a CUDA machine only: the CUDA tests, a short mixed-precision run, GPU latency and benchmarks (benchmarks/gpu_check.sh)
gpu-check: setup
	PY=$(PY) benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache
