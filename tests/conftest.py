"""Shared fixtures: tiny synthetic datasets made once per session, and a private decode cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Two cores: one intra-op thread per process keeps parallel work (Ray workers, loaders) from thrashing.
torch.set_num_threads(1)


def same_state(a: dict, b: dict) -> bool:
    """Bit-identical tensors (nested dicts and lists of them, as in an optimizer's state_dict)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is no package), for tests of its functions."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/anodfd."""
    old = os.environ.get("ANODFD_CACHE_DIR")
    os.environ["ANODFD_CACHE_DIR"] = str(tmp_path_factory.mktemp("decode-cache"))
    yield
    if old is None:
        os.environ.pop("ANODFD_CACHE_DIR", None)
    else:
        os.environ["ANODFD_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def synth_ol(tmp_path_factory):
    """A few dozen OL stand-in pairs at 128x128, in the paper's layout."""
    from anodfd.synth import synthesize

    return synthesize("OL", tmp_path_factory.mktemp("data") / "OL", pairs=48, seed=1, size=(128, 128),
                      workers=2, progress=False)


@pytest.fixture(scope="session")
def tiny_checkpoints(synth_ol, tmp_path_factory) -> list[Path]:
    """Two tiny trained checkpoints of one model (seeds 0 and 1: different weights), trained once per session for
    the tests that need a trained model but not a good one: registry, promotion, batch scoring, the cluster's job.
    Read-only: a test that changes weights writes its own copy."""
    from anodfd.config import PRESETS, Config
    from anodfd.train.loop import fit

    out = []
    for seed in (0, 1):
        config = Config().with_flat({**PRESETS["smoke"], "data.data": str(synth_ol), "train.epochs": 1,
                                     "train.max_steps_per_epoch": 3, "train.seed": seed})
        out.append(fit(config, tmp_path_factory.mktemp(f"tiny{seed}") / "run", log=lambda s: None)["best"])
    return out


def card(f1: float, fingerprint: str = "data", floor: float = 0.1, **metrics: float):
    """A hand-made `Scorecard` (pixel AUC 0.9 unless given): registry tests choose a version's scores."""
    from anodfd.scoring import Protocol, Scorecard

    scores = {"f1": f1, "auc": 0.9, **metrics}
    return Scorecard(Protocol(fingerprint), scores, dict(scores), 0.5, floor, 0.2, 6, {"train": 30, "val": 12, "test": 6})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root, port: int | None = None):
    """A real `mlflow server` on 127.0.0.1 (SQLite and artifacts under ``root``): (process, uri). Stop it with
    `stop_mlflow_server`; starting again with the same root and port brings the same registry back."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = port or free_port()
    log = open(root / "server.log", "a")  # noqa: SIM115 - open for the server's whole life
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # The project runs no MLflow server jobs (GenAI evaluation); with them on, each server start spawns 7
        # huey consumer processes that import MLflow: ~20 s of CPU on 2 cores, for nothing.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    log.close()
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # minutes on a busy 2-core machine
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start; see {root / 'server.log'}") from None
            time.sleep(0.5)
    return proc, uri


def stop_mlflow_server(proc) -> None:
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its gunicorn/uvicorn workers
    except ProcessLookupError:
        return  # stopped already
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (free port, SQLite, temp dirs), stopped by PID at the end."""
    proc, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop_mlflow_server(proc)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance (2 CPUs) for one test module, shut down after it.

    Started as `anodfd train` starts its own (`start_local_ray`), so it and the Ray instances of drivers that
    tests run as subprocesses tell each other apart.
    """
    import ray

    from anodfd.ray_connect import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2)
        # Ray's processes have it; subprocesses of the tests must not inherit this instance's dashboard address.
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    yield ray
    ray.shutdown()


# Tests that need one of these are slow whatever their module: `make test-fast` (-m "not slow") leaves them out.
SLOW_FIXTURES = {"ray_local", "mlflow_server", "cluster", "gpu_nodes"}


# `make test` runs the modules on 2 pytest-xdist workers, a module to a worker (--dist loadfile), handed out in
# collection order as workers free up. The longest modules go first, so that no long one starts last and runs
# alone: the order of `pytest --durations=0`, longest first (about 6, 6, 4 and 2 minutes for the first four).
LONGEST_FIRST = ("test_cluster", "test_search", "test_distributed", "test_promotion", "test_tables", "test_train",
                 "test_batch", "test_registry", "test_export")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

    def rank(item) -> int:
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a module
