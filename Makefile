# The README's two commands: `make demo` and `make test`. Both set up .venv first.
# TORCH pins the CPU build that lies on this project's machines; override it on yours
# (e.g. `make test TORCH=torch`) to take whatever build suits your hardware.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo

.PHONY: setup test demo demo-clean bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps panoptica==2.1.7 brats-evaluation==0.0.10  # see pyproject's dev extra
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The demo: 16 synthetic full-size BraTS 2020 patients -> shards (128 x 128) -> v2 with its CPU
# defaults for at most DEMO_BUDGET of training -> evaluation on the native grid and one prediction,
# both as a BraTS submission would make them (mirroring TTA, small ET relabelled: DEMO_INFERENCE)
# -> the report; the last line is the headline score. About 14 minutes in all from a fresh clone,
# the install included (docs/measurements.md). A second `make demo` finds the data and the shards up
# to date and trains a new run beside the earlier ones: nothing of a previous demo is deleted
# (`make demo-clean` removes the demo folder).
DEMO_BUDGET ?= 10m
DEMO_INFERENCE ?= --tta --min-et-voxels 200
demo: $(STAMP)
	$(BIN)/etl synth --out $(DEMO)/BraTS2020 --patients 16 --seed 0
	$(BIN)/etl build-shards --src $(DEMO)/BraTS2020 --out $(DEMO)/shards --workers 2
	$(BIN)/etl verify $(DEMO)/shards
	@set -e; run=$(DEMO)/runs/v2-$$(date +%Y%m%d-%H%M%S); \
	echo "train run -> $$run"; \
	$(BIN)/train run --shards $(DEMO)/shards --variant v2 --out $$run --time-budget $(DEMO_BUDGET) --device cpu; \
	$(BIN)/train evaluate --checkpoint $$run/checkpoints/best.pt --shards $(DEMO)/shards \
		--src $(DEMO)/BraTS2020 --json $$run/evaluation.json --device cpu $(DEMO_INFERENCE); \
	patient=$$($(BIN)/python -c "import json; print(json.load(open('$(DEMO)/shards/manifest.json'))['content']['splits']['val']['patients'][0])"); \
	$(BIN)/train predict --checkpoint $$run/checkpoints/best.pt --device cpu $(DEMO_INFERENCE) \
		--input $(DEMO)/BraTS2020/MICCAI_BraTS2020_TrainingData/$$patient --out $$run/predictions/$${patient}_seg.nii.gz; \
	echo; echo "demo done:"; \
	echo "  source data      $(DEMO)/BraTS2020"; \
	echo "  shards           $(DEMO)/shards (etl inspect $(DEMO)/shards)"; \
	echo "  run              $$run (config.json, metrics.csv, checkpoints/)"; \
	echo "  report           $$run/report/report.html"; \
	echo "  evaluation       $$run/evaluation.json"; \
	echo "  prediction       $$run/predictions/"; \
	$(BIN)/python -c "import json, sys; print(json.load(open(sys.argv[1]))['headline'])" $$run/evaluation.json

demo-clean:
	rm -rf $(DEMO)

bench: $(STAMP)
	$(BIN)/python bench/etl.py
	$(BIN)/python bench/reader.py
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) $(DEMO)
