"""The single-process loop, checkpoints and the train / eval / predict commands, on a tiny OL stand-in."""

from __future__ import annotations

import json

import cv2
import pytest
import torch
from conftest import same_state

import anodfd
from anodfd.checkpoint import checkpoint_dict, load_checkpoint, model_from_checkpoint
from anodfd.cli import main as cli
from anodfd.config import PRESETS, Config, ConfigError, with_window
from anodfd.data.dataset import make_dataset
from anodfd.data.layouts import read_split
from anodfd.evaluation import evaluate
from anodfd.train.loop import epoch_line, epoch_metrics, fit, make_loader


def smoke(data, **overrides) -> Config:
    return Config().with_flat({**PRESETS["smoke"], "data.data": str(data), **overrides})


def val_f1(model, config: Config) -> float:
    pixels, images, _ = evaluate(model, make_dataset(config.data, "val"), torch.device("cpu"), config.data.window)
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


def test_ranks_draw_their_own_augmentation_with_loader_workers(synth_ol):
    """DDP ranks with DataLoader workers: each rank's augmentation stream is its own, and a rerun repeats it."""
    config = smoke(synth_ol, **{"data.resize": 32, "model.image_size": 32, "data.augment": "strong"})

    def stream(rank: int) -> torch.Tensor:
        dataset = make_dataset(config.data, "train", train=True, seed=7919 * rank)  # as train/worker.py seeds it
        loader = make_loader(dataset, 8, shuffle=False, seed=0, epoch=3, num_workers=1, rank=rank)
        return torch.cat([hist for hist, _, _ in loader])

    rank0, rank1 = stream(0), stream(1)
    assert not torch.equal(rank0, rank1), "both ranks drew the same augmentation"
    assert torch.equal(rank0, stream(0)) and torch.equal(rank1, stream(1))


@pytest.mark.parametrize("case", ["no anomalous pixel", "collapsed model"])
def test_served_threshold_stays_strictly_inside_0_1(case):
    """A validation split without anomalies (F1 is perfect at threshold 1.0) or a model that scores every pixel 0
    (F1 is best at 0.0): the checkpoint keeps the fixed 0.5 rather than a threshold `predict` must refuse."""
    from anodfd.metrics import ImageScores, PixelHistogram
    from anodfd.predict import check_threshold

    pixels = PixelHistogram()
    if case == "no anomalous pixel":
        pixels.update(torch.rand(4, 1, 16, 16) * 0.3, torch.zeros(4, 1, 16, 16))
    else:
        mask = torch.zeros(4, 1, 16, 16)
        mask[:, :, 4:8, 4:8] = 1
        pixels.update(torch.zeros(4, 1, 16, 16), mask)
    metrics = epoch_metrics(pixels, ImageScores(), 0.5)
    assert metrics["calibrated_threshold"] == 0.5 and metrics["threshold_calibrated"] == 0.0
    assert metrics["calibrated_f1"] == metrics["f1"]
    ckpt = checkpoint_dict(torch.nn.Linear(1, 1), None, 1, Config(), metrics, (0.0, 0.0))
    assert check_threshold(ckpt["threshold"]) == 0.5
    line = epoch_line({**metrics, "epoch": 1, "train_loss": 0.1, "pairs_per_s": 1.0}, 1)
    assert "no threshold calibrates on this validation split: serving at 0.5" in line


def test_eval_says_in_words_when_a_metric_is_undefined(synth_ol, tmp_path, capsys):
    """Every test pair anomalous (as in DeepPCB): image-level AUROC has no value. The CLI says why, and the JSON
    holds null with the reason, never NaN."""
    import shutil

    from anodfd.data.cache import read_mask
    from anodfd.data.layouts import read_split

    data = shutil.copytree(synth_ol, tmp_path / "allbad")
    anomalous = [p for p in read_split(data, "test") if read_mask(p.mask).any()]
    (data / "test.txt").write_text("".join(f"{p.cur.relative_to(data)},{p.hist.relative_to(data)},"
                                           f"{p.mask.relative_to(data)}\n" for p in anomalous))
    fit(smoke(data, **{"train.epochs": 1, "train.max_steps_per_epoch": 1}), tmp_path / "run", log=lambda s: None)
    out = tmp_path / "m.json"
    assert cli(["eval", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(data), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    why = f"all {len(anomalous)} pairs of the test split are anomalous; it needs both kinds"
    assert f"image_auroc undefined: {why}" in printed and "image-level AUROC nan" not in printed
    text = out.read_text()
    assert "NaN" not in text
    result = json.loads(text)
    assert result["image_auroc"] is None and result["undefined"] == {"image_auroc": why}
    assert 0.0 <= result["auc"] <= 1.0


def test_models_of_any_size_are_scored_on_the_masks_own_pixels(synth_ol):
    """A 64 px model and a 96 px one are counted on the same pixels: every pixel of every test mask, once."""
    from anodfd.data.cache import read_mask
    from anodfd.metrics import defect_regions
    from anodfd.model import build_model
    from anodfd.scoring import score_native

    masks = [read_mask(p.mask) for p in read_split(synth_ol, "test")]
    counted = []
    views = [{"data.resize": 64}, {"data.resize": 96}, {"data.resize": 0, "data.scale": 0.5, "data.crop": 32}]
    for view in views:  # squashed to 64 or 96, or scaled to 64x64 and seen through 32 px tiles
        config = with_window(smoke(synth_ol), view)
        pixels, _, defects, _ = score_native(build_model(config.model).eval(), config.data, "test", progress=False)
        counted.append((int(pixels.pos.sum()), int(pixels.neg.sum()), defects.counts["defects"]))
    n_defects = sum(len(defect_regions(m)[1]) for m in masks)
    expected = (sum(int(m.sum()) for m in masks), sum(m.size - int(m.sum()) for m in masks), n_defects)
    assert counted == [expected] * len(views)


def test_training_on_native_crops_learns_and_logs_defect_metrics(synth_ol, tmp_path):
    """`--resize 0 --crop 64`: 64 px crops of the 128 px pairs, half of them on an anomaly; validation slides 64 px
    tiles over whole pairs and counts native pixels. Validation F1 rises, and every epoch has defect metrics."""
    config = with_window(smoke(synth_ol, **{"train.epochs": 10}),
                         {"data.resize": 0, "data.crop": 64, "data.crop_pos_fraction": 0.5})
    assert config.model.image_size == 64
    torch.manual_seed(0)
    before = val_f1(anodfd.build_model(config.model), config)
    result = fit(config, tmp_path / "run", log=lambda s: None)
    model, saved = model_from_checkpoint(load_checkpoint(result["best"]))
    assert saved.data == config.data  # the view travels with the checkpoint
    after = val_f1(model, saved)
    assert before["calibrated_f1"] < 0.1
    assert after["calibrated_f1"] > before["calibrated_f1"] + 0.3 and after["auc"] > 0.9
    keys = {"defect_precision", "defect_recall", "defect_f", "false_alarms_per_image", "all_found"}
    assert all(keys <= set(h) for h in result["history"])
    assert max(h["defect_recall"] for h in result["history"]) > 0.5


def test_calibrate_defect_serves_the_threshold_with_the_best_validation_defect_f(synth_ol, tmp_path):
    """`--calibrate defect`: the checkpoint serves the grid threshold whose validation defect F is best, as scoring
    the saved model again finds it, with the pixel F1 there as its calibrated F1; the epoch line shows both."""
    from anodfd.metrics import DEFECT_GRID, DefectGrid

    config = smoke(synth_ol, **{"train.epochs": 4, "train.calibrate": "defect"})
    lines: list[str] = []
    result = fit(config, tmp_path / "run", log=lines.append)
    ckpt = load_checkpoint(result["best"])
    model, saved = model_from_checkpoint(ckpt)
    grid = DefectGrid()
    pixels, _, _ = evaluate(model, make_dataset(saved.data, "val"), torch.device("cpu"), saved.data.window,
                            on_pair=lambda i, probs, mask: grid.update(probs, mask))
    threshold, defect_f = grid.best()
    assert ckpt["threshold"] == threshold and threshold in DEFECT_GRID
    assert ckpt["metrics"]["calibrated_defect_f"] == pytest.approx(defect_f) and defect_f > 0.3
    assert ckpt["metrics"]["calibrated_f1"] == pytest.approx(pixels.compute(threshold)["f1"])
    assert any(f"defect F {defect_f:.4f} @ {threshold:.3f}" in line for line in lines), lines


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


class Interrupted(Exception):
    pass


def stop_after(epoch: int):
    """A `fit` log that interrupts the run once ``epoch``'s checkpoint is written (its line is logged after)."""
    def log(line: str) -> None:
        if line.startswith(f"epoch {epoch}/"):
            raise Interrupted
    return log


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_is_bit_identical_to_a_straight_run_and_refuses_another_model(synth_ol, tmp_path, schedule):
    """3 epochs straight against 2 epochs, an interruption, and a resume: the same weights, optimizer state and best
    score, with every random stream in use (strong augmentation, misregistration, dropout, shuffling) and with
    either learning-rate schedule (cosine: lr, 3/4 lr, 1/4 lr, by hand)."""
    config = smoke(synth_ol, **{"train.epochs": 3, "train.max_steps_per_epoch": 3, "data.resize": 64,
                                "data.crop": 48, "data.crop_pos_fraction": 0.5, "data.augment": "strong",
                                "data.misregister": 0.03, "train.schedule": schedule})
    straight_run = fit(config, tmp_path / "straight", log=lambda s: None)
    lr = config.train.lr
    expected = [lr] * 3 if schedule == "constant" else [lr, 0.75 * lr, 0.25 * lr]
    assert [h["lr"] for h in straight_run["history"]] == pytest.approx(expected, rel=1e-9)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        fit(config, out, log=stop_after(2))
    lines = []
    result = fit(config, out, log=lines.append)
    assert "resuming" in lines[0] and "from epoch 2" in lines[0]
    assert [h["epoch"] for h in result["history"]] == [3]

    straight, resumed = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(out / "last.pt")
    assert resumed["epoch"] == 3
    assert same_state(straight["model"], resumed["model"])
    assert same_state(straight["optimizer"], resumed["optimizer"])
    timing = {"pairs_per_s", "data_wait", "train_s", "val_s"}  # measured, not computed
    assert straight["best"] == resumed["best"]
    assert {k: v for k, v in straight["metrics"].items() if k not in timing} == {
        k: v for k, v in resumed["metrics"].items() if k not in timing}
    assert same_state(load_checkpoint(tmp_path / "straight" / "best.pt")["model"],
                       load_checkpoint(out / "best.pt")["model"])

    before = (out / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="different model"):
        fit(config.with_flat({"model.depth": 0, "train.epochs": 4}), out, log=lambda s: None)
    with pytest.raises(ConfigError, match="relight False"):
        fit(config.with_flat({"data.relight": True, "train.epochs": 4}), out, log=lambda s: None)
    assert (out / "last.pt").read_bytes() == before  # nothing already written is lost
    with pytest.raises(ConfigError, match=r"\(train.schedule\): must be one of constant, cosine"):
        config.with_flat({"train.schedule": "linear"})


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
    assert set(metrics) == {"precision", "recall", "oa", "f1", "iou", "auc", "eer", "threshold", "image_auroc",
                            "undefined", "resolution", "defect_threshold", "defects"}
    assert metrics["threshold"] == 0.5 and 0.0 <= metrics["f1"] <= 1.0 and metrics["resolution"] == "native"
    assert set(metrics["defects"]) == {"defect_precision", "defect_recall", "defect_f", "false_alarms_per_image",
                                       "all_found"} and 0.0 < metrics["defect_threshold"] < 1.0
    # A value, or null with the reason (this stand-in's test pairs may all be anomalous).
    assert (metrics["image_auroc"] is None) == ("image_auroc" in metrics["undefined"])
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


def test_bad_checkpoint_is_one_clear_error(synth_ol, tmp_path, capsys):
    """With every other input in order, a corrupt checkpoint is what `predict` and `eval` name, in one line."""
    (tmp_path / "x.pt").write_text("garbage")
    pair = read_split(synth_ol, "test")[0]
    argv = ["predict", "--checkpoint", str(tmp_path / "x.pt"), "--hist", str(pair.hist), "--cur", str(pair.cur),
            "--out", str(tmp_path / "out")]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / 'x.pt'}: not a readable anodfd checkpoint" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert cli(["eval", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(synth_ol)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / 'x.pt'}: not a readable anodfd checkpoint" in err and "\n" not in err


BAD_TRAIN_FLAGS = [
    (["--lr", "-1"], "--lr -1.0 (train.lr): must be in (0, 1]"),
    (["--lr", "0"], "--lr 0.0 (train.lr)"),
    (["--batch-size", "0"], "--batch-size 0 (train.batch_size): must be 1 or more"),
    (["--epochs", "0"], "--epochs 0 (train.epochs): must be 1 or more"),
    (["--resize", "7"], "--resize 7 (data.resize): must be a whole number of pixels, at least 32, or 0 to keep"),
    (["--resize", "100"], "--resize 100 (data.resize): model paper sees 100x100 windows, which must be divisible"),
    (["--resize", "0"], "--crop 0 (data.crop): --resize 0 keeps each image's own size, which cannot be batched whole"),
    (["--resize", "0", "--crop", "72"], "--crop 72 (data.crop): model paper sees 72x72 windows"),
    (["--scale", "0.5"], "--scale 0.5 (data.scale): applies only with --resize 0"),
    (["--crop", "64", "--crop-pos-fraction", "1.5"], "--crop-pos-fraction 1.5 (data.crop_pos_fraction): must be in"),
    (["--bce-weight", "0", "--dice-weight", "0"], "the BCE, Dice and focal weights are all 0"),
    (["--dice-weight", "-0.5"], "--dice-weight -0.5 (train.dice_weight): must be 0 or more"),
    (["--focal-weight", "nan"], "--focal-weight nan (train.focal_weight)"),
    (["--pos-weight", "0"], "--pos-weight 0.0 (train.pos_weight): must be above 0"),
    (["--misregister", "0.7"], "--misregister 0.7 (data.misregister): must be in [0, 0.5)"),
    (["--num-workers", "-1"], "--num-workers -1 (data.num_workers)"),
    (["--max-steps-per-epoch", "-1"], "--max-steps-per-epoch -1 (train.max_steps_per_epoch)"),
    (["--workers", "0"], "--workers 0: need at least 1 worker"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker 0.0: must be above 0"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker -1.0: must be 0 (CPU) or more"),
    (["--keep", "0"], "--keep 0: keep at least 1 checkpoint"),
]


@pytest.mark.parametrize("flags, message", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_bad_numbers_fail_in_one_line_before_anything_runs(synth_ol, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)  # the default run folder (./runs) and MLflow store (./mlflow.db) would land here
    assert cli(["train", "--data", str(synth_ol), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert list(tmp_path.iterdir()) == [], "nothing is written for a run that cannot start"


def test_checkpoints_written_before_views_existed_still_load():
    """Checkpoints and registry versions store `data.image_size`; it is read as today's `data.resize`."""
    old = Config().to_dict()
    old["data"]["image_size"] = old["data"].pop("resize")
    for key in ("scale", "crop", "crop_pos_fraction"):
        del old["data"][key]
    old["data"]["image_size"] = 128
    loaded = Config.from_dict(old)
    assert loaded.data.resize == 128 and loaded.data.crop == 0 and loaded.data.window == 128


@pytest.mark.parametrize("key, value", [("train.threshold", 0.0), ("train.threshold", 1.0), ("data.val_fraction", 0.0),
                                        ("data.val_fraction", 1.5), ("train.beta1", 1.0), ("train.weight_decay", -1.0),
                                        ("train.calibrate", "f1")])
def test_settings_without_a_flag_are_checked_too(key, value):
    with pytest.raises(ConfigError, match=rf"\({key}\)"):
        Config().with_flat({key: value})
