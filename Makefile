# hpcgraft: the two commands a user needs are `make demo` and `make test`; both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
NP ?= 2

.PHONY: setup demo test test-fast lint bench clean

setup: $(VENV)/.hpcgraft-complete

$(VENV)/.hpcgraft-complete: pyproject.toml tools/setup.sh tools/build_horovod.sh
	bash tools/setup.sh

demo: setup
	$(VENV)/bin/mpirun -np $(NP) $(PY) -m hpcgraft.train --config configs/digits.yaml --out runs/demo --restart

test: setup
	$(PY) -m pytest -q

test-fast: setup  # the in-process unit tests only: under a minute
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
