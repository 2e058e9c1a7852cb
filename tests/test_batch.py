"""`anodfd score` on a real local Ray instance: the files `anodfd predict` writes, a ranked parquet, resumable reruns
that skip finished pairs, and a refusal to mix two models' results in one folder."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from anodfd.cli import main
from anodfd.data.layouts import read_split

pytestmark = pytest.mark.slow  # batch scoring on Ray Data


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints):
    """Two tiny trained checkpoints with different weights (another seed)."""
    return tiny_checkpoints


def test_score_writes_what_predict_writes_ranks_and_resumes(ray_local, synth_ol, checkpoints, tmp_path, capsys):
    listing = str(synth_ol / "test.txt")
    assert main(["predict", "--checkpoint", str(checkpoints[0]), "--list", listing, "--out", str(tmp_path / "p")]) == 0
    assert main(["score", "--checkpoint", str(checkpoints[0]), "--list", listing, "--out", str(tmp_path / "s")]) == 0
    # Decoding in parallel tasks (the default for GPU actors) hands the actors the same pixels.
    assert main(["score", "--checkpoint", str(checkpoints[0]), "--list", listing, "--out", str(tmp_path / "t"),
                 "--decode", "tasks"]) == 0
    assert "decoding in parallel tasks" in capsys.readouterr().out
    predicted = sorted(f.name for f in (tmp_path / "p").iterdir())
    n = len(read_split(synth_ol, "test"))
    assert n >= 4 and len(predicted) == 3 * n
    assert {f.name for f in (tmp_path / "s").iterdir()} == {*predicted, "scores.parquet", "score-run.json"}

    for name in (f[:-5] for f in predicted if f.endswith(".json")):
        p, s, t = (json.loads((tmp_path / d / f"{name}.json").read_text()) for d in ("p", "s", "t"))
        # Actors run torch with one thread here too: the same numbers, not just close ones.
        assert s == p and t == p, name
        maps = [cv2.imread(str(tmp_path / d / f"{name}_map.png"), cv2.IMREAD_GRAYSCALE) for d in ("p", "s", "t")]
        np.testing.assert_array_equal(maps[0], maps[1])
        np.testing.assert_array_equal(maps[0], maps[2])

    table = pd.read_parquet(tmp_path / "s" / "scores.parquet")
    assert len(table) == n and list(table["score"]) == sorted(table["score"], reverse=True)
    for row in table.itertuples():
        result = json.loads((tmp_path / "p" / f"{row.pair}.json").read_text())
        assert (row.score, row.regions, row.anomalous_fraction) == (
            result["score"], len(result["boxes"]), result["anomalous_fraction"])

    # Resumable: a pair whose result is gone is scored again; the others are not touched.
    kept = {f: f.stat().st_mtime_ns for f in (tmp_path / "s").glob("*_map.png")}
    gone = table["pair"][0]
    (tmp_path / "s" / f"{gone}.json").unlink()
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(checkpoints[0]), "--list", listing, "--out", str(tmp_path / "s")]) == 0
    assert f"1 of {n} pairs to score ({n - 1} already in" in capsys.readouterr().out
    changed = [f.name for f, t in kept.items() if f.stat().st_mtime_ns != t]
    assert changed == [f"{gone}_map.png"]
    assert pd.read_parquet(tmp_path / "s" / "scores.parquet").equals(table)

    # Another model into the same folder: refused before anything runs, nothing changed.
    before = {f.name: f.read_bytes() for f in (tmp_path / "s").iterdir()}
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(checkpoints[1]), "--list", listing, "--out", str(tmp_path / "s")]) == 2
    assert "holds results of another model" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in (tmp_path / "s").iterdir()} == before
