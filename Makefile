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
	$(BIN)/pip install --quiet --no-deps panoptica==2.1.7 brats-evaluation==0.0.10  # see pyproject's dev extra
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The demo: 16 synthetic full-size BraTS 2020 patients -> shards (64 x 64) -> v1 on the CPU for a
# few minutes -> evaluation on the native grid -> one prediction -> the report.
DEMO_EPOCHS ?= 8
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/etl synth --out $(DEMO)/BraTS2020 --patients 16 --seed 0
	$(BIN)/etl build-shards --src $(DEMO)/BraTS2020 --out $(DEMO)/shards --size 64 --workers 2
	$(BIN)/etl verify $(DEMO)/shards
	$(BIN)/train run --shards $(DEMO)/shards --variant v1 --out $(DEMO)/runs/v1 --epochs $(DEMO_EPOCHS) \
		--base 16 --batch-size 16 --workers 1 --device cpu
	$(BIN)/train evaluate --checkpoint $(DEMO)/runs/v1/checkpoints/best.pt --shards $(DEMO)/shards \
		--src $(DEMO)/BraTS2020 --json $(DEMO)/evaluation.json --device cpu
	patient=$$($(BIN)/python -c "import json; print(json.load(open('$(DEMO)/shards/manifest.json'))['content']['splits']['val']['patients'][0])"); \
	$(BIN)/train predict --checkpoint $(DEMO)/runs/v1/checkpoints/best.pt --device cpu \
		--input $(DEMO)/BraTS2020/MICCAI_BraTS2020_TrainingData/$$patient --out $(DEMO)/predictions/$${patient}_seg.nii.gz
	@echo
	@echo "demo done:"
	@echo "  source data      $(DEMO)/BraTS2020"
	@echo "  shards           $(DEMO)/shards (etl inspect $(DEMO)/shards)"
	@echo "  run              $(DEMO)/runs/v1 (config.json, metrics.csv, checkpoints/)"
	@echo "  report           $(DEMO)/runs/v1/report/report.md"
	@echo "  evaluation       $(DEMO)/evaluation.json"
	@echo "  prediction       $(DEMO)/predictions/"

bench: $(STAMP)
	$(BIN)/python bench/etl.py
	$(BIN)/python bench/reader.py
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) $(DEMO)
