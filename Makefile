# hpcgraft: the two commands a user needs are `make demo` and `make test`; both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
NP ?= 2

.PHONY: setup demo test test-fast test-all lint bench clean

setup: $(VENV)/.hpcgraft-complete

$(VENV)/.hpcgraft-complete: pyproject.toml tools/setup.sh tools/build_horovod.sh
	bash tools/setup.sh

demo: setup
	$(VENV)/bin/mpirun -np $(NP) $(PY) -m hpcgraft.train --config configs/digits.yaml --out runs/demo --restart

# The test tiers (docs/design.md, "Developing"); each prints its ten slowest tests (pyproject.toml addopts).
test: setup  # everything but the slow tier: before every commit
	$(PY) -m pytest -q -m "not slow"

test-fast: setup  # tests/unit in this process alone: no other process, no MPI
	$(PY) -m pytest -q tests/unit -m "not process and not slow"

test-all: setup  # make test and the slow tier: what CI runs
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
