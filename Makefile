# Every target does its own set-up from a fresh clone: a .venv with the project installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install sysdeps demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# tests/test_cluster_files.py runs the launcher's rsync, as `ray up` does.
sysdeps:
	@command -v rsync >/dev/null || { echo "installing rsync"; apt-get install -y -qq rsync >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq rsync >/dev/null; } || \
	  { echo "rsync is missing: install it (apt-get install rsync)"; exit 1; }; }

# The main job on its embedded default: synthetic OL data, local Ray, local MLflow store (./mlflow.db).
demo: $(STAMP)
	@test -f data/OL/train.txt || $(PY) -m anodfd synth OL --out data/OL --pairs 60 --size 512x384 --seed 1
	$(PY) -m anodfd data check data/OL
	$(PY) tune/search.py --dataset OL --preset smoke

test: $(STAMP) sysdeps
	$(PY) -m ruff check anodfd tests benchmarks tune cluster
	$(PY) -m pytest -q --durations=20  # the slowest tests, so a slower suite says where

bench: $(STAMP)
	$(PY) benchmarks/bench_loading.py
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
