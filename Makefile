# Quick start (see README):
#   make demo   set up a virtualenv and run the main job
#   make test   set up the same virtualenv and run the linter, the docs build and the test suite
#   make docs   build the documentation site into site/ (strict: a warning is an error)
#
# TORCH picks the torch wheel installed *before* fedcomp, so fedcomp's
# `torch>=2.4` requirement is already met and pip never pulls a multi-GB
# CUDA build by itself. The default is the CPU build of 2.13.0; on a machine
# whose pip index does not hold it, use for example
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedcomp-installed

.PHONY: setup demo flower-demo ops-demo experiment-mnist docs test bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test,train,docs]"
	$(PY) -m fedcomp.build
	touch $@

setup: $(STAMP)

# The main job: FedAvg, FedLESAM and FedSynSAM, dense vs top-1% uploads with error
# feedback, on the embedded digits dataset (about 2 minutes on 2 cores). Finished
# runs in runs/demo are skipped, so a second `make demo` only prints the table.
DEMO_FLAGS ?= --algorithms fedavg,fedlesam,fedsynsam --compressors none,topk --seeds 0 --rounds 60

demo: setup
	$(PY) -m fedsynsam compare $(DEMO_FLAGS) --out runs/demo

# The same job on Flower's deployment runtime: a SuperLink and 4 SuperNodes on 127.0.0.1
# (started and torn down here), a short FedSynSAM + top-1% run; prints the same table.
FLOWER_DEMO_FLAGS ?= --algorithms fedsynsam --compressors topk --seeds 0 --rounds 12 --clients 4 --per-round 3 \
	--syn-min-models 4 --syn-period 4

flower-demo: setup
	$(PY) -m fedsynsam flower demo $(FLOWER_DEMO_FLAGS) --out runs/flower-demo

ops-demo: setup
	$(PY) -m fedcomp.demo

# Experiment 2 (docs/experiment-mnist.md): every run behind the document (hours on 2 cores;
# restartable: finished runs are skipped), then its tables and plots in docs/experiment-mnist/.
experiment-mnist: setup
	$(PY) docs/experiment_mnist.py run --jobs 2
	$(PY) docs/experiment_mnist.py report

# The site, strictly: a broken link, anchor or docstring fails the build (and so CI).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

test: setup docs
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest tests benchmarks --benchmark-disable --durations=15

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks runs site
