"""The single-process loop, checkpoints and the train / eval / predict commands, on a tiny OL stand-in."""

from __future__ import annotations

import json

import cv2
import pytest
import torch

import anodfd
from anodfd.cli import main as cli
from anodfd.config import PRESETS, Config, ConfigError
from anodfd.data.dataset import make_dataset
from anodfd.train.loop import (
    epoch_metrics,
    evaluate,
    fit,
    load_checkpoint,
    make_loader,
    model_from_checkpoint,
)


def smoke(data, **overrides) -> Config:
    return Config().with_flat({**PRESETS["smoke"], "data.data": str(data), **overrides})


def val_f1(model, config: Config) -> float:
    loader = make_loader(make_dataset(config.data, "val"), 8, shuffle=False)
    pixels, images = evaluate(model, loader, torch.device("cpu"))
    return epoch_metrics(pixels, images, 0.5)


def test_learning_happens(synth_ol, tmp_path):
    config = smoke(synth_ol, **{"train.epochs": 15})
    torch.manual_seed(0)
    before = val_f1(anodfd.build_model(config.model), config)
    result = fit(config, tmp_path / "run", log=lambda s: None)
    model, _ = model_from_checkpoint(load_checkpoint(result["best"]))
    after = val_f1(model, config)
    # Untrained, the best achievable F1 is what flagging everything gives (~2x the anomaly fraction).
    assert before["calibrated_f1"] < 0.1
    assert after["calibrated_f1"] > before["calibrated_f1"] + 0.3
    assert after["auc"] > 0.9 and after["f1"] > 0.3
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]


def test_checkpoint_is_self_describing_and_weights_only(synth_ol, tmp_path):
    config = smoke(synth_ol, **{"train.epochs": 1, "train.max_steps_per_epoch": 2})
    fit(config, tmp_path / "run", log=lambda s: None)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "config", "metrics", "threshold", "best"} <= set(ckpt)
    assert Config.from_dict(ckpt["config"]) == config
    assert 0.0 < ckpt["threshold"] < 1.0 and "f1" in ckpt["metrics"]
    model, _ = model_from_checkpoint(ckpt)
    again, _ = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "last.pt"))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x, -x), again(x, -x))


def test_resume_continues_and_refuses_another_model(synth_ol, tmp_path):
    out = tmp_path / "run"
    config = smoke(synth_ol, **{"train.epochs": 2, "train.max_steps_per_epoch": 2})
    fit(config, out, log=lambda s: None)
    lines = []
    result = fit(config.with_flat({"train.epochs": 3}), out, log=lines.append)
    assert "resuming" in lines[0] and "from epoch 2" in lines[0]
    assert [h["epoch"] for h in result["history"]] == [3]
    assert load_checkpoint(out / "last.pt")["epoch"] == 3

    before = (out / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="different model"):
        fit(config.with_flat({"model.depth": 0, "train.epochs": 4}), out, log=lambda s: None)
    assert (out / "last.pt").read_bytes() == before  # nothing already written is lost


def test_train_eval_predict_commands(synth_ol, tmp_path, capsys, monkeypatch, ray_local):
    # `anodfd train` is a Ray Train run: 2 DDP workers on this 2-core machine, local MLflow store in the cwd.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "R"
    argv = ["train", "--data", str(synth_ol), "--preset", "smoke", "--epochs", "2", "--workers", "2", "--out", str(run)]
    assert cli(argv) == 0
    assert (run / "best.pt").exists() and (run / "last.pt").exists()
    out = capsys.readouterr().out
    assert "best epoch" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert (tmp_path / "mlflow.db").exists() and any((tmp_path / "mlartifacts").rglob("overlays_epoch_0002.png"))

    m = tmp_path / "m.json"
    roc = tmp_path / "roc.png"
    argv = ["eval", "--checkpoint", str(run / "best.pt"), "--data", str(synth_ol), "--split", "test",
            "--json", str(m), "--plot", str(roc)]
    assert cli(argv) == 0
    metrics = json.loads(m.read_text())
    assert set(metrics) == {"precision", "recall", "oa", "f1", "iou", "auc", "eer", "threshold"}
    assert metrics["threshold"] == 0.5 and 0.0 <= metrics["f1"] <= 1.0
    assert roc.stat().st_size > 5000
    out = capsys.readouterr().out
    assert "calibrated threshold" in out and "F1" in out

    pair = synth_ol / "oil_leak_test_0"
    pred = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(run / "best.pt"), "--hist", str(pair / "hist.jpg"),
            "--cur", str(pair / "cur.jpg"), "--out", str(pred)]
    assert cli(argv) == 0
    stem = "cur"
    anomaly_map = cv2.imread(str(pred / f"{stem}_map.png"), cv2.IMREAD_UNCHANGED)
    assert anomaly_map.shape == cv2.imread(str(pair / "cur.jpg")).shape[:2]  # full resolution of the current image
    assert cv2.imread(str(pred / f"{stem}_overlay.jpg")) is not None
    info = json.loads((pred / f"{stem}.json").read_text())
    assert 0.0 <= info["score"] <= 1.0 and isinstance(info["boxes"], list)


def test_predict_any_resolution_and_folders(synth_ol, tmp_path):
    config = smoke(synth_ol, **{"train.epochs": 1, "train.max_steps_per_epoch": 1})
    fit(config, tmp_path / "run", log=lambda s: None)
    hist_dir, cur_dir = tmp_path / "A", tmp_path / "B"
    hist_dir.mkdir()
    cur_dir.mkdir()
    for i, name in enumerate(["oil_leak_test_0", "oil_leak_test_1"]):
        size = (300 + 50 * i, 200)  # any size, not a multiple of the stride
        for src, dst in (("hist.jpg", hist_dir), ("cur.jpg", cur_dir)):
            cv2.imwrite(str(dst / f"p{i}.jpg"), cv2.resize(cv2.imread(str(synth_ol / name / src)), size))
    argv = ["predict", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--hist", str(hist_dir),
            "--cur", str(cur_dir), "--out", str(tmp_path / "pred")]
    assert cli(argv) == 0
    assert cv2.imread(str(tmp_path / "pred" / "p1_map.png"), cv2.IMREAD_UNCHANGED).shape == (200, 350)


def test_bad_checkpoint_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "x.pt").write_text("garbage")
    argv = ["predict", "--checkpoint", str(tmp_path / "x.pt"), "--hist", "a", "--cur", "b", "--out", str(tmp_path)]
    assert cli(argv) == 2
    assert "a: input image not found" in capsys.readouterr().err
    (tmp_path / "a.jpg").write_bytes(b"")
    assert cli(["eval", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(tmp_path)]) == 2
    assert "not a readable anodfd checkpoint" in capsys.readouterr().err
