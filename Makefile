# Two commands do everything on a fresh machine (each sets up .venv first, once):
#   make run    the main job on the embedded default data
#   make test   the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# the venv's commands first (Flower's processes start each other by name)
export PATH := $(CURDIR)/$(BIN):$(PATH)
export FLWR_TELEMETRY_ENABLED = 0
export RAY_USAGE_STATS_ENABLED = 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_DISABLE_UPDATE_CHECK = 1

.PHONY: run test setup lint
setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

run: $(STAMP)
	$(BIN)/fedmoe compare

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
