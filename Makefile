# Set-up and the two everyday commands. TORCH pins the CPU build; on a GPU machine use
# `make demo TORCH=torch` (or install your CUDA build first) to keep CUDA.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
# A local folder of wheels, where the machine keeps one, is searched for that build first.
WHEELS ?= $(wildcard /opt/wheels)
# Test processes (pytest-xdist). Most tests wait on the worker processes they start, so on 2
# cores a third keeps them busy (the suite in about 10 minutes instead of 12; 4 are no faster).
TEST_PROCESSES ?= 3
BIN = $(VENV)/bin

.PHONY: demo test install

$(BIN)/tuner: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(WHEELS),--find-links $(WHEELS)) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/tuner

demo: $(BIN)/tuner
	$(BIN)/tuner run studies/demo.yaml --workers 2 --storage sqlite:///demo.db

test: $(BIN)/tuner
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_PROCESSES) --dist loadgroup $(PYTEST_ARGS)
