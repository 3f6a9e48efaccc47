# `make demo` and `make test` work on a fresh machine with only Python 3.10+:
# they create .venv, install the CPU build of torch first (pinned), then this package.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: install demo reproduce readme test bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nonsingular reproduce --quick --out runs/reproduce-quick

# the full experiment, 8 seeds, one process per core (models are dealt to the processes)
CORES = $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)))")
reproduce: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(CORES) \
		-m nonsingular reproduce --seeds 8 --out runs/reproduce

# the README's results blocks, generated again from the shipped results.json files
readme: $(STAMP)
	$(PY) -m nonsingular.experiment.report.readme README.md

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/attack_speed.py
	$(PY) benchmarks/certify_speed.py
	$(PY) benchmarks/train_speed.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
