"""benchmarks/paper_tables.py at a tiny budget: real Ray Train runs under one MLflow parent run, tables whose
numbers are the cells' own, template differencing checked by hand, and a rerun that reuses finished cells.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import load_benchmark

from anodfd.config import Config
from anodfd.data.dataset import make_dataset
from anodfd.tracking import RUN_DIR_TAG, client

pytestmark = pytest.mark.slow  # trains every model of the paper's tables

TABLES = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_tables.py"


def run_tables(data: Path, out: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(TABLES), "--data", str(data), "--epochs", "2", "--image-size", "64",
         "--anodfd-model", "tiny", "--methods", "fc-siam-diff", "template-diff", "--depths", "2",
         "--max-steps-per-epoch", "4", "--out", str(out), "--mlflow-uri", uri],
        env=env, text=True, capture_output=True, timeout=900, check=False)


def read_csv(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {row["label"]: row for row in csv.DictReader(f)}


def hand_template_f1(data: Path, threshold: float) -> float:
    """|current - history| in grey, 3x3 opening, threshold: F1 over the test split, in plain numpy."""
    config = Config().with_flat({"data.data": str(data), "data.resize": 64})
    dataset = make_dataset(config.data, "test")
    tp = fp = fn = 0
    for i in range(len(dataset)):
        hist, cur, mask = dataset.arrays(i)
        diff = np.abs(cv2.cvtColor(cur, cv2.COLOR_RGB2GRAY).astype(int) - cv2.cvtColor(hist, cv2.COLOR_RGB2GRAY))
        opened = cv2.dilate(cv2.erode(diff.astype(np.uint8), np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8))
        pred, truth = opened / 255.0 >= threshold - 1e-9, mask > 0
        tp += int((pred & truth).sum())
        fp += int((pred & ~truth).sum())
        fn += int((~pred & truth).sum())
    return 2 * tp / (2 * tp + fp + fn)


def test_paper_tables_tiny_run(synth_ol, tmp_path, mlflow_server):
    out = tmp_path / "tables"
    proc = run_tables(synth_ol, out, mlflow_server)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    table1, table3 = read_csv(out / "table1.csv"), read_csv(out / "table3.csv")
    assert list(table1)[:2] == ["AnoDFDNet (tiny, depth 2)", "fc-siam-diff"]
    assert list(table1)[2].startswith("template differencing (threshold ")
    assert list(table3) == ["depth 2"]
    assert (out / "roc.png").stat().st_size > 10_000
    for name, label in (("tiny-d2", "AnoDFDNet (tiny, depth 2)"), ("fc-siam-diff", "fc-siam-diff")):
        cell = json.loads((out / "cells" / f"{name}.json").read_text())
        for k in ("precision", "recall", "oa", "f1", "iou", "auc"):
            assert abs(float(table1[label][k]) - cell[k]) < 1e-12
        assert 0 <= cell["f1"] <= 1 and cell["split"] == "test" and Path(cell["checkpoint"]).name == "best.pt"
    assert table3["depth 2"]["f1"] == table1["AnoDFDNet (tiny, depth 2)"]["f1"]  # one run serves both tables

    template = next(v for k, v in table1.items() if k.startswith("template"))
    threshold = float(template["label"].split("threshold ")[1].rstrip(")"))
    assert abs(float(template["f1"]) - hand_template_f1(synth_ol, threshold)) < 1e-9

    # One parent run with the tables, one child run per trained cell.
    c = client(mlflow_server)
    exp = c.get_experiment_by_name("anodfd-tables")
    (parent,) = c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{out}'")
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["anodfd.cell"] for r in children) == ["fc-siam-diff", "tiny-d2"]
    assert all("test_f1" in r.data.metrics for r in children)
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "tables")} >= {"tables/table1.md", "tables/roc.png"}

    # A rerun reuses the finished cells: nothing is trained or overwritten again.
    before = (out / "cells" / "tiny-d2.json").read_text()
    again = run_tables(synth_ol, out, mlflow_server)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done earlier") == 2 and "starting run" not in again.stdout
    assert (out / "cells" / "tiny-d2.json").read_text() == before


def test_paper_tables_rejects_a_missing_dataset_before_training(tmp_path, capsys):
    tables = load_benchmark("paper_tables")
    rc = tables.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"),
                      "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert rc == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
