"""The champion gate when real users share one registry: several searches promoting at the same moment, an
MLflow server that goes away in the middle of the gate, a holder that crashed with the lease, and dataset names
that differ only in case. Every test runs against a real `mlflow server` and real processes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
from conftest import card, start_mlflow_server, stop_mlflow_server

from anodfd import gate, registry, tracking
from anodfd.config import Config

PROCESSES = 6
ROUNDS = 3

# One contender: registers a version in each round's registered model, waits at a barrier with the others,
# then runs the gate in every round at the same moment as the others.
CONTENDER = """
import json, sys, time
from pathlib import Path
from anodfd import gate, registry
from anodfd.scoring import Protocol, Scorecard
uri, checkpoint, run_id, barrier, processes, index, f1, *datasets = sys.argv[1:]
scores = {"f1": float(f1), "auc": 0.9}
card = Scorecard(Protocol("same-data"), scores, scores, 0.5, 0.1, 0.2, 6)
versions = [registry.register_version(uri, checkpoint, d, card, run_id) for d in datasets]
for r, (name, version) in enumerate(versions):
    (Path(barrier) / f"{r}-{index}").touch()
    while len(list(Path(barrier).glob(f"{r}-*"))) < int(processes):
        time.sleep(0.01)
    reg = gate.gate(uri, name, version)
    print(json.dumps({"round": r, "version": reg.version, "champion": reg.champion, "reason": reg.reason}), flush=True)
"""

pytestmark = pytest.mark.slow  # gates in several processes against MLflow servers


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints):
    return tiny_checkpoints[0]


@pytest.fixture(scope="module")
def search_run(mlflow_server, tmp_path_factory):
    run_id, _ = tracking.start_run(mlflow_server, Config(), str(tmp_path_factory.mktemp("search")), "promotion")
    return run_id


def champion_moves(uri: str, dataset: str) -> list[dict]:
    return [m for m in registry.history(uri, dataset) if m["alias"] == registry.CHAMPION]


def test_concurrent_promotions_leave_champion_on_the_best(mlflow_server, checkpoint, search_run, tmp_path):
    tag = uuid.uuid4().hex[:6]
    datasets = [f"race{tag}r{r}" for r in range(ROUNDS)]
    # Distinct F1s, in an order that has nothing to do with who starts first.
    f1s = [0.41, 0.77, 0.52, 0.93, 0.68, 0.35]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    logs = [(tmp_path / f"out{i}", tmp_path / f"err{i}") for i in range(PROCESSES)]
    # Files, not pipes: MLflow's progress output would fill a pipe nobody reads yet and block its writer.
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, mlflow_server, str(checkpoint), search_run,
                               str(barrier), str(PROCESSES), str(i), str(f1s[i]), *datasets],
                              stdout=out.open("w"), stderr=err.open("w"))
             for i, (out, err) in enumerate(logs)]
    deadline = time.time() + 600
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.time() < deadline:
        time.sleep(0.5)
    for p in procs:  # one that failed would leave the others waiting at the barrier
        if p.poll() is None:
            p.kill()
            p.wait()
    failed = [i for i, p in enumerate(procs) if p.returncode]
    assert not failed, "\n".join(logs[i][1].read_text()[-3000:] for i in failed)
    reports = [{**json.loads(line), "f1": f1s[i]} for i, (out, _) in enumerate(logs)
               for line in out.read_text().splitlines() if line.startswith("{")]
    assert len(reports) == PROCESSES * ROUNDS

    c = tracking.client(mlflow_server)
    for r, dataset in enumerate(datasets):
        name = registry.model_name(dataset)
        versions = {int(mv.version): float(mv.tags["test_f1"]) for mv in c.search_model_versions(f"name = '{name}'")}
        assert len(versions) == PROCESSES, "every version exists"
        best = max(versions, key=versions.get)
        assert int(c.get_registered_model(name).aliases["champion"]) == best
        # The truth of each process's report, read from the audit trail: champion moved exactly to the versions
        # whose process said so, each move to a strictly better F1 than the version it replaced.
        moves = champion_moves(mlflow_server, dataset)
        mine = [rep for rep in reports if rep["round"] == r]
        assert {m["version"] for m in moves} == {rep["version"] for rep in mine if rep["champion"]}
        assert moves[0]["previous"] is None and moves[-1]["version"] == best
        for before, after in itertools.pairwise(moves):
            assert after["previous"] == before["version"] and versions[after["version"]] > versions[before["version"]]
        for rep in mine:
            assert versions[rep["version"]] == rep["f1"]
            if not rep["champion"]:
                assert "does not beat" in rep["reason"]
    assert not c.search_registered_models(f"name LIKE '%{gate.LEASE_SUFFIX}'"), "every lease was released"


def test_a_fault_in_the_gate_promotes_nothing_and_a_retry_succeeds(checkpoint, tmp_path):
    """The server stops while a gate waits for the lease of a holder that crashed: the gate fails in one line,
    champion stays; with the server back, the retry waits out the crashed holder's lease and promotes."""
    root = tmp_path / "server"
    root.mkdir()
    proc, uri = start_mlflow_server(root)
    port = int(uri.rsplit(":", 1)[1])
    try:
        run_id, _ = tracking.start_run(uri, Config(), str(tmp_path / "runs"), "fault")
        first = gate.log_and_register(uri, checkpoint, "FAULT", card(0.5), run_id)
        assert first.champion
        name, version = registry.register_version(uri, checkpoint, "FAULT", card(0.8), run_id)
        # A promotion that crashed while holding the lease: it never releases it; it expires in 30 s, time enough to
        # see the gate wait for it and to stop the server under it.
        tracking.client(uri).create_registered_model(name + gate.LEASE_SUFFIX, tags={
            "owner": "crashed-host:1:dead", "expires": f"{time.time() + 30:.3f}"})
        env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
        def lease_reads() -> int:
            return (root / "server.log").read_text().count(f"get?name={name}{gate.LEASE_SUFFIX} HTTP")

        seen = lease_reads()
        gating = subprocess.Popen([sys.executable, "-m", "anodfd", "models", "gate", "--dataset", "fault",
                                   "--version", str(version), "--mlflow-uri", uri],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while lease_reads() == seen:  # it is waiting for the crashed holder's lease now
            assert gating.poll() is None and time.time() < deadline, gating.communicate()
            time.sleep(0.2)
        stop_mlflow_server(proc)
        out, err = gating.communicate(timeout=120)
        assert gating.returncode == 2, out + err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "anodfd: error:" in lines[0] and "nothing was promoted" in lines[0], err

        proc, _ = start_mlflow_server(root, port)
        c = tracking.client(uri)
        assert int(c.get_registered_model(name).aliases["champion"]) == first.version, "champion unchanged"
        start = time.time()
        retry = subprocess.run([sys.executable, "-m", "anodfd", "models", "gate", "--dataset", "FAULT", "--version",
                                str(version), "--mlflow-uri", uri], env=env, capture_output=True, text=True,
                               timeout=120, check=False)
        assert retry.returncode == 0, retry.stderr
        assert "champion moved to it" in retry.stdout
        assert time.time() - start < 90, "the crashed holder's lease expired and was broken"
        assert int(c.get_registered_model(name).aliases["champion"]) == version
        moves = champion_moves(uri, "fault")
        assert [(m["version"], m["previous"]) for m in moves] == [(first.version, None), (version, first.version)]
        assert not c.search_registered_models(f"name LIKE '%{gate.LEASE_SUFFIX}'")
    finally:
        stop_mlflow_server(proc)


def test_dataset_names_are_case_insensitive(mlflow_server, checkpoint, search_run, capsys):
    tag = uuid.uuid4().hex[:6]
    first = gate.log_and_register(mlflow_server, checkpoint, f"Case{tag}", card(0.5), search_run)
    second = gate.log_and_register(mlflow_server, checkpoint, f"case{tag.upper()}", card(0.6), search_run)
    assert first.name == second.name == f"anodfdnet-Case{tag}" and second.version == 2 and second.champion
    from anodfd.cli import main

    assert main(["models", "history", "--dataset", f"CASE{tag}", "--mlflow-uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    assert re.search(r"champion\s+v2\s+v1\s", out) and "registered by a search" in out
    assert main(["models", "promote", "--dataset", f"case{tag}", "--version", "1", "--reason", "rollback: v2 drifts",
                 "--mlflow-uri", mlflow_server]) == 0
    moves = champion_moves(mlflow_server, f"case{tag}")
    assert (moves[-1]["version"], moves[-1]["previous"], moves[-1]["reason"]) == (1, 2, "rollback: v2 drifts")

