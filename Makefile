# Every target does its own set-up from a fresh clone: a .venv with exactly the versions of requirements.lock
# and the project installed over them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LOCK := requirements.lock
PIP_QUIET := --quiet

.PHONY: install sysdeps demo test test-fast test-latest lock bench docs clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) -r $(LOCK)
	@# ...and nothing else: a venv made from an older lock loses what the new one dropped.
	$(PY) -m piptools sync $(PIP_QUIET) $(LOCK)
	$(PY) -m pip install $(PIP_QUIET) --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The newest releases pyproject.toml's ranges allow, every runtime, dev and openvino dependency, pinned into $(LOCK).
# Run it when a dependency should move (a fix, a release the project needs), then `make test` and commit both.
lock: $(STAMP)
	$(PY) -m piptools compile $(PIP_QUIET) --upgrade --extra dev --extra openvino --strip-extras --no-emit-index-url \
	  --no-emit-find-links --no-emit-trusted-host --output-file $(LOCK) pyproject.toml

# tests/test_cluster_files.py runs the launcher's rsync, as `ray up` does.
sysdeps:
	@command -v rsync >/dev/null || { echo "installing rsync"; apt-get install -y -qq rsync >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq rsync >/dev/null; } || \
	  { echo "rsync is missing: install it (apt-get install rsync)"; exit 1; }; }

# The main job on its embedded default: synthetic OL data, local Ray, local MLflow store (./mlflow.db).
demo: $(STAMP)
	@test -f data/OL/train.txt || $(PY) -m anodfd synth OL --out data/OL --pairs 76 --test-pairs 16 --size 512x384 --seed 1
	$(PY) -m anodfd data check data/OL
	$(PY) tune/search.py --dataset OL --preset smoke

# Two pytest workers, a test module to each at a time: much of a test's time is processes starting (Ray, MLflow,
# imports), which leaves a core idle. One module stays on one worker, so its fixtures (a cluster) start once.
XDIST := -n 2 --dist loadfile

# Everything: what the README and .ci/run call.
test: $(STAMP) sysdeps
	$(PY) -m ruff check anodfd tests benchmarks tune cluster docs
	$(PY) -m pytest -q $(XDIST) --durations=20  # the slowest tests, so a slower suite says where

# The loop while working: everything but the tests marked slow (Ray, MLflow servers, searches, clusters).
test-fast: $(STAMP) sysdeps
	$(PY) -m ruff check anodfd tests benchmarks tune cluster docs
	$(PY) -m pytest -q $(XDIST) -m "not slow" --durations=10

# Drift before users meet it: the fast tier against the newest releases pyproject.toml's ranges allow, in a venv of
# its own (.venv-latest), off the lock. A failure here is a release the lock must not take yet, or a fix to make.
test-latest: sysdeps
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager -e '.[dev,openvino]'
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt
	ANODFD_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/bench_loading.py
	$(PY) benchmarks/bench_model.py

# docs/reference/*.md: the --help of anodfd, tune/search.py and cluster/submit.py; tests/test_readme.py fails when stale.
docs: $(STAMP)
	$(PY) docs/reference/generate.py

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache .ruff_cache
