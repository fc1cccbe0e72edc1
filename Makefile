# The README's two commands: `make demo` and `make test`. Both set up .venv first.
# TORCH pins the CPU build that lies on this project's machines; override it on yours
# (e.g. `make test TORCH=torch`) to take whatever build suits your hardware.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

demo: $(STAMP)
	OMP_NUM_THREADS=2 bash bench/demo.sh $(DEMO) $(BIN)

bench: $(STAMP)
	$(BIN)/python bench/etl.py
	$(BIN)/python bench/reader.py
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) $(DEMO)
