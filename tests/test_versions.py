"""The versions that decide a model's numbers: recorded in every checkpoint, compared on load (one warning line),
and compared across nodes by the preflight (tests/test_cluster.py runs that on a real cluster)."""

from __future__ import annotations

import importlib.metadata

import cv2
import numpy as np
import torch

from anodfd.checkpoint import checkpoint_dict, inference_model, load_checkpoint, save_checkpoint
from anodfd.cli import main as cli
from anodfd.config import PRESETS, Config
from anodfd.model import build_model
from anodfd.versions import NUMERIC_PACKAGES, mismatches, package_versions


def test_mismatches_compare_in_full_or_by_major_and_minor():
    mine = {"torch": "2.14.1", "numpy": "2.4.6", "opencv-python-headless": "5.1.0.95", "timm": "1.0.31"}
    theirs = {"torch": "2.14.1+cu130", "numpy": "2.4.2", "opencv-python-headless": "5.0.0.93", "timm": "1.0.31"}
    assert mismatches(theirs, mine) == [("numpy", "2.4.2", "2.4.6"),
                                       ("opencv-python-headless", "5.0.0.93", "5.1.0.95")]
    assert mismatches(theirs, mine, level=2) == [("opencv-python-headless", "5.0.0.93", "5.1.0.95")]
    assert mismatches({"ray": "missing"}, {"ray": "2.60.0"}) == [("ray", "missing", "2.60.0")]


def test_a_checkpoint_records_the_versions_and_loading_it_elsewhere_warns_once(tmp_path, capsys):
    assert package_versions() == {n: importlib.metadata.version(n) for n in NUMERIC_PACKAGES}
    config = Config().with_flat({**PRESETS["smoke"], "data.resize": 64, "model.image_size": 64})
    torch.manual_seed(0)
    model = build_model(config.model)
    same, other = tmp_path / "same.pt", tmp_path / "other.pt"
    ckpt = checkpoint_dict(model, None, 1, config, {"calibrated_threshold": 0.5}, (0.0, 0.0))
    save_checkpoint(ckpt, same)
    assert load_checkpoint(same)["versions"] == package_versions()  # and it loads with weights_only=True
    recorded = {**package_versions(), "opencv-python-headless": "4.14.0.94", "numpy": "2.4.0"}  # numpy: patch only
    save_checkpoint({**ckpt, "versions": recorded}, other)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), np.uint8)
    for name in ("h.png", "c.png"):
        cv2.imwrite(str(tmp_path / name), image)
    capsys.readouterr()
    for i, path in enumerate([same, other, other]):
        assert cli(["predict", "--checkpoint", str(path), "--hist", str(tmp_path / "h.png"), "--cur",
                    str(tmp_path / "c.png"), "--out", str(tmp_path / f"pred{i}")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    mine = package_versions()["opencv-python-headless"]
    assert len(warnings) == 1, warnings  # the same checkpoint loaded again says nothing more
    assert f"opencv-python-headless 4.14.0.94 (here {mine})" in warnings[0] and "numpy" not in warnings[0]
    inference_model(load_checkpoint(other))  # serving and score load through the same function
    assert "warning:" not in capsys.readouterr().err
