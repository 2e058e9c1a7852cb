"""The main job end to end: `python tune/search.py` as a real driver process with its own local Ray instance,
against a real `mlflow server`: trials, nested runs, Optuna plots, registration, and resume after a killed driver.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from ray._private.utils import get_num_cpus

from anodfd.ray_connect import threads_for
from anodfd.tracking import RUN_DIR_TAG, client

pytestmark = pytest.mark.slow  # searches run as subprocesses

SEARCH = Path(__file__).resolve().parents[1] / "tune" / "search.py"


def search_cmd(data: Path, storage: Path, uri: str, name: str, *extra: str, samples: int = 3) -> list[str]:
    return [sys.executable, str(SEARCH), "--data", str(data), "--preset", "smoke", "--num-samples", str(samples),
            "--max-epochs", "2", "--storage", str(storage), "--mlflow-uri", uri, "--name", name, *extra]


def env() -> dict:
    # The driver starts its own local Ray instance, with no dashboard port clash with other test processes.
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONUNBUFFERED": "1"}


def parent_and_children(uri: str, search_dir: Path):
    c = client(uri)
    exp = c.get_experiment_by_name("anodfd-search")
    parents = c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{search_dir}'")
    assert len(parents) == 1, "one parent run per search, also after a resume"
    children = c.search_runs([exp.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return parents[0], children


def test_smoke_search_end_to_end_through_a_killed_driver(synth_ol, tmp_path, mlflow_server, monkeypatch):
    """The main job, killed mid-search and resumed (one search does both: each costs minutes).

    Ranked by AUC (not the preset's metric), over 3 epochs of which Ray keeps 2: the epoch registered is the
    trial's best-AUC epoch, scored on the test split, with its floor and card. The driver is killed once a trial has
    2 epochs; `--resume` continues every interrupted trial in its own MLflow run, logs no epoch twice and registers
    once."""
    data = shutil.copytree(synth_ol, tmp_path / "OLsearch")  # its own registered model name: anodfdnet-OLsearch
    # One trial at a time: it gets the machine's cores (less the trial driver's 0.1), as `anodfd train` would.
    cmd = search_cmd(data, tmp_path / "runs", mlflow_server, "s1", "--metric", "auc", "--max-epochs", "3",
                     "--grace-period", "1", "--max-concurrent", "1", samples=2)
    # A process group of its own: killing it kills the driver and the local Ray instance it started.
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        train_runs = tmp_path / "runs" / "s1" / "train_runs"
        deadline = time.time() + 600
        while not list(train_runs.glob("*/epoch_0002/checkpoint.pt")):  # a trial has 2 of its 3 epochs
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # What the kill interrupted: trials whose MLflow runs were still open, and the epochs they had logged.
    _, before = parent_and_children(mlflow_server, tmp_path / "runs" / "s1")
    interrupted = {r.info.run_id: len(client(mlflow_server).get_metric_history(r.info.run_id, "f1"))
                   for r in before if r.info.status == "RUNNING"}
    assert interrupted, "the kill came after every trial had finished: nothing was left to resume"

    proc = subprocess.run([*cmd, "--resume"], env=env(), check=False, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming search s1" in proc.stdout
    assert "| rank | trial | auc | depth | lr |" in proc.stdout
    assert "registry: anodfdnet-OLsearch version 1 -> alias challenger" in proc.stdout
    assert "model card: anodfd models show --dataset OLsearch --version 1" in proc.stdout

    parent, children = parent_and_children(mlflow_server, tmp_path / "runs" / "s1")
    assert parent.info.status == "FINISHED" and parent.data.params["search.metric"] == "auc"
    assert parent.data.params["search.grace_period"] == "1"  # ASHA may stop the second trial after 1 epoch
    trial_ids = [r.data.tags["anodfd.trial_id"] for r in children]
    assert len(trial_ids) == len(set(trial_ids)) == 2  # no duplicate MLflow run for any trial
    best_auc = {}  # trial run id -> its best validation AUC over the epochs it ran
    for run in children:
        assert run.info.status == "FINISHED"
        stopped = run.data.tags["anodfd.stopped_early"]
        assert stopped in ("true", "false")
        steps = [m.step for m in client(mlflow_server).get_metric_history(run.info.run_id, "f1")]
        assert steps and steps == list(range(1, len(steps) + 1)), f"epochs missing or logged twice: {steps}"
        if run.info.run_id in interrupted:  # it went on after the resume, in the same MLflow run
            assert len(steps) >= interrupted[run.info.run_id] and (len(steps) == 3 or stopped == "true"), steps
        assert "model.depth" in run.data.params
        best_auc[run.info.run_id] = max(m.value for m in client(mlflow_server).get_metric_history(run.info.run_id, "auc"))
        threads = {m.value for m in client(mlflow_server).get_metric_history(run.info.run_id, "threads")}
        assert threads == {float(threads_for(get_num_cpus() - 0.1))}, threads
    # The smoke preset's own settings are the first trial.
    assert any(r.data.params["model.depth"] == "2" and r.data.params["train.dice_weight"] == "1.0"
               and float(r.data.params["train.lr"]) == pytest.approx(3e-3) for r in children)
    c = client(mlflow_server)
    names = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "search_space.json", "best_trial.json", "optuna", "test"} <= names
    assert "optuna/optimization_history.png" in {a.path for a in c.list_artifacts(parent.info.run_id, "optuna")}

    assert len(c.search_model_versions("name = 'anodfdnet-OLsearch'")) == 1
    version = c.get_model_version("anodfdnet-OLsearch", "1")
    tags = version.tags
    assert tags["trial"] == parent.data.tags["anodfd.best_trial"] and tags["selected_by"] == "validation auc"
    # The registered trial is the best of all trials by validation AUC, not merely one that finished.
    assert best_auc[tags["trial_run_id"]] == max(best_auc.values()), (tags["trial_run_id"], best_auc)
    # The registered epoch is the one with the trial's best validation AUC, whichever epoch that was.
    auc = {m.step: m.value for m in c.get_metric_history(tags["trial_run_id"], "auc")}
    assert auc[int(tags["epoch"])] == max(auc.values()), (tags["epoch"], auc)
    # Champion exactly when the version cleared the template-differencing floor at the threshold it serves with.
    cleared = float(tags["test_f1_calibrated"]) > float(tags["floor_f1"]) and float(tags["test_auc"]) >= 0.6
    assert ("champion" in c.get_registered_model("anodfdnet-OLsearch").aliases) == cleared, tags
    assert ("stays challenger" in tags["registration_decision"]) != cleared

    # The registered version loads as a pyfunc and predicts a map at the current image's resolution.
    import mlflow

    # As a user's shell would say it: through the environment, which is put back after the test (mlflow's own
    # setters would leave this server as the process's URI for the tests after it).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    model = mlflow.pyfunc.load_model("models:/anodfdnet-OLsearch@challenger")
    pair = data / "oil_leak_test_0"
    hist = cv2.cvtColor(cv2.imread(str(pair / "hist.jpg")), cv2.COLOR_BGR2RGB)
    cur = cv2.cvtColor(cv2.imread(str(pair / "cur.jpg")), cv2.COLOR_BGR2RGB)
    out = np.asarray(model.predict({"history": hist[None], "current": cur[None]}))  # batched NxHxWx3
    assert out.shape[-2:] == cur.shape[:2] and np.isfinite(out).all() and 0 <= out.min() <= out.max() <= 1


def load_search_module():
    from tune import search

    return search


def test_resume_without_name_continues_the_latest_search_of_that_dataset(synth_ol, tmp_path):
    search = load_search_module()
    storage = tmp_path / "runs"
    for name, dataset, started in [("a", "OL", 100.0), ("newest-ol", "OL", 300.0), ("fb", "FB", 900.0)]:
        (storage / name).mkdir(parents=True)
        (storage / name / search.SEARCH_MARKER).write_text(json.dumps({"dataset": dataset, "started": started}))
    (storage / "search-OL-20200101-000000").mkdir()  # a search from before markers: its folder's age counts
    os.utime(storage / "search-OL-20200101-000000", (200.0, 200.0))
    assert search.latest_search(str(storage), "ol") == "newest-ol"
    assert search.latest_search(str(storage), "FB") == "fb"

    # Nothing to resume: one clear line, before Ray starts or anything is written.
    proc = subprocess.run([sys.executable, str(SEARCH), "--data", str(synth_ol), "--resume", "--storage",
                           str(tmp_path / "empty"), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                          env=env(), check=False, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--resume: no search of OL in {tmp_path / 'empty'} to continue" in proc.stderr
    assert not (tmp_path / "empty").exists()


def test_a_search_ranked_by_auc_without_anomalous_validation_pixels_is_refused_before_ray(synth_ol, tmp_path,
                                                                                          monkeypatch, capsys):
    """Validation without one anomalous pixel: every trial's AUC would be NaN and none could be ranked. The search
    says why, in one line, before Ray, MLflow or the storage are touched."""
    from anodfd.data.cache import read_mask
    from anodfd.data.layouts import read_split

    data = shutil.copytree(synth_ol, tmp_path / "OLnan")
    normal = [p for p in read_split(data, "train") if not read_mask(p.mask).any()]
    lines = [f"{p.cur.relative_to(data)},{p.hist.relative_to(data)},{p.mask.relative_to(data)}" for p in normal[:3]]
    (data / "validation.txt").write_text("\n".join(lines) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # ./runs and ./mlflow.db would land here
    search = load_search_module()
    argv = ["--data", str(data), "--preset", "smoke", "--metric", "auc"]
    assert search.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"search: error: the validation split of {data} has no anomalous pixel in its 3 mask(s)"), err
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--workers-per-trial", "0"], "--workers-per-trial 0: need at least 1 worker"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker 0.0: must be above 0"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker -1.0: must be 0 (CPU) or more"),
    (["--num-samples", "0"], "--num-samples 0: must be 1 or more"),
    (["--max-epochs", "0"], "--max-epochs 0: must be 1 or more"),
    (["--max-concurrent", "0"], "--max-concurrent 0: must be 1 or more"),
    (["--budget", "0"], "--budget 0: give a positive time such as 90s, 45m, 2h, or GPU-hours such as 8gpuh"),
    (["--budget", "ten minutes"], "--budget ten minutes: give a positive time"),
    (["--budget", "2d"], "--budget 2d: give a positive time"),
    (["--grace-period", "0"], "--grace-period 0: must be 1 or more and at most the 15 epochs of --max-epochs"),
    (["--max-epochs", "2", "--grace-period", "3"], "--grace-period 3: must be 1 or more and at most the 2 epochs"),
])
def test_search_refuses_bad_numbers_before_anything_runs(synth_ol, tmp_path, monkeypatch, capsys, flags, message):
    search = load_search_module()
    monkeypatch.chdir(tmp_path)  # ./runs and ./mlflow.db would land here
    assert search.main(["--data", str(synth_ol), "--preset", "smoke", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_budget_units():
    search = load_search_module()
    assert search.parse_budget("90") == (90.0, False)
    assert search.parse_budget("90s") == (90.0, False)
    assert search.parse_budget("45m") == (2700.0, False)
    assert search.parse_budget("1.5h") == (5400.0, False)
    assert search.parse_budget("8gpuh") == (28800.0, True)


def test_a_trial_the_budget_stopped_before_its_first_report_is_a_row_not_a_crash():
    """Seen with an 80 s budget on a loaded machine: Tune stopped a trial that had just started, whose result has
    neither config nor metrics. The summary lists it with no epochs, under its own trial id."""
    import pandas as pd
    from ray.tune import Result  # Ray

    search = load_search_module()
    history = pd.DataFrame({"epoch": [1], "f1": [0.4], "train_s": [1.0], "val_s": [0.5], "time_total_s": [20.0]})
    done = Result(metrics={"trial_id": "6f1265f0", "config": {"train.lr": 0.003}}, checkpoint=None, error=None,
                  path="/s/run_trial_6f1265f0_1_train_lr=0.0030_2026-12-03_21-20-11", metrics_dataframe=history)
    cut = Result(metrics=None, checkpoint=None, error=None,
                 path="/s/run_trial_53e157e5_3_model_depth=8,train_lr=0.0000_2026-12-03_21-21-11")
    rows = search.summarise([cut, done], "f1", max_epochs=1)
    assert [(r.trial_id, r.epochs, r.params) for r in rows] == [("6f1265f0", 1, {"train.lr": 0.003}), ("53e157e5", 0, {})]
    assert rows[0].extra == {"step_s": 1.5, "trial_s": 20.0} and rows[1].extra == {}
    assert "| 2 | 53e157e5 | nan |" in search.format_table(rows, "f1")


def test_asha_rank_table_by_hand():
    """benchmarks/asha_rank.py: 4 trials of 3 epochs. At epoch 1 the final winner (c) is third, outside the top half;
    from epoch 2 the order is the final one. Spearman by hand: ranks at epoch 1 a2 b3 c1 d0 against final a1 b2
    c3 d0, sum of d^2 = 1 + 1 + 4 = 6, rho = 1 - 6 * 6 / (4 * 15) = 0.4."""
    from conftest import load_benchmark

    asha = load_benchmark("asha_rank")
    trials = {"a": [0.5, 0.5, 0.6], "b": [0.6, 0.7, 0.7], "c": [0.4, 0.8, 0.9], "d": [0.1, 0.2, 0.3], "e": [0.9]}
    rows = asha.rank_table(trials)  # e stopped after 1 epoch: left out
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["spearman"] == pytest.approx(0.4) and rows[1]["spearman"] == pytest.approx(1.0)
    assert [r["winner_kept"] for r in rows] == [False, True, True]
    assert [(r["top_quarter_kept"], r["top_quarter"]) for r in rows] == [(0, 1), (1, 1), (1, 1)]


def test_a_budget_ends_the_search_in_time_and_registers_the_best_so_far(synth_ol, tmp_path):
    """20 one-epoch trials would take a quarter of an hour here; an 80 s budget stops the trials once it is spent,
    and the search ranks and registers what ran. Ranked by defect F (defect level, not pixels)."""
    data = shutil.copytree(synth_ol, tmp_path / "OLbudget")
    cmd = search_cmd(data, tmp_path / "runs", f"sqlite:///{tmp_path / 'm.db'}", "b", "--max-epochs", "1",
                     "--max-concurrent", "1", "--budget", "80s", "--metric", "defect_f", samples=20)
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env(), check=False, text=True, capture_output=True, timeout=900)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "within 80 s of trials" in proc.stdout
    reached = re.search(r"budget of 80 s reached: (\d+) of 20 trials trained an epoch or more", proc.stdout)
    assert reached and 1 <= int(reached.group(1)) < 20, proc.stdout[-3000:]
    assert "registry: anodfdnet-OLbudget version 1 -> alias challenger" in proc.stdout
    # Where the time went: the parent's seconds in steps are the trials' own train_s + val_s, epoch by epoch, over
    # the epochs Tune received (a trial the budget stops can have logged one more to MLflow first).
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    parent, children = parent_and_children(uri, tmp_path / "runs" / "b")
    assert parent.data.params["search.grace_period"] == "1"  # the presets' 4 epochs, capped at --max-epochs 1
    assert parent.data.params["search.metric"] == "defect_f" and "| rank | trial | defect_f | depth |" in proc.stdout
    version = client(uri).get_model_version("anodfdnet-OLbudget", "1")
    assert version.tags["selected_by"] == "validation defect_f"
    defect_f = {r.info.run_id: max((m.value for m in client(uri).get_metric_history(r.info.run_id, "defect_f")
                                    if m.step <= int(r.data.tags["anodfd.epochs_run"])), default=-1.0)
                for r in children}
    assert defect_f[version.tags["trial_run_id"]] == max(defect_f.values())  # a trial with the best defect F
    steps = sum(m.value for r in children for k in ("train_s", "val_s")
                for m in client(uri).get_metric_history(r.info.run_id, k)
                if m.step <= int(r.data.tags["anodfd.epochs_run"]))
    assert parent.data.metrics["step_seconds"] == pytest.approx(steps, rel=1e-6)
    assert 0 < parent.data.metrics["step_share"] < 1 and "time in train and validation steps:" in proc.stdout
    # Ray's start, the scoring of the best trial and the registration come on top of the budget; 20 trials do not.
    assert took < 80 + 240, took


def test_missing_dataset_fails_fast_with_the_fix(tmp_path):
    proc = subprocess.run([sys.executable, str(SEARCH), "--dataset", "OL", "--data-root", str(tmp_path)],
                          env=env(), check=False, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert str(tmp_path / "OL") in proc.stderr and "anodfd synth OL --out" in proc.stderr
    assert not (tmp_path / "runs").exists()
