# Two entry points, both self-contained on a fresh CPU machine (see README "Quick start").
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first, pinned to the local CPU wheel, so nothing resolves a CUDA build.
setup: $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[cpu,dev]"

# demo starts from scratch each time: train refuses to overwrite a checkpoint (use --resume for that).
demo: setup
	rm -rf runs/default
	$(BIN)/python -m train
	$(BIN)/dit-export --checkpoint runs/default/checkpoint --out packages/default --force
	$(BIN)/dit-sample packages/default -c 0 -c 1 -c 2 -c 3 -c 4 -c 5 -c 6 -c 7 -c 8 -c 9 --num-per-class 8 --scheduler dpm++2m --steps 20 --out runs/default/runtime_grid.png

test: setup
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc
