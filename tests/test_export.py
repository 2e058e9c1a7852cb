"""ONNX export: one graph with dynamic batch, height and width, equal to PyTorch, used by `predict --onnx`."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anodfd.checkpoint import checkpoint_dict, save_checkpoint
from anodfd.cli import main as cli
from anodfd.config import PRESETS, Config, ConfigError, with_window
from anodfd.export import OnnxModel, export_onnx, parity
from anodfd.model import build_model


def trained_like(config: Config, seed: int = 0, nudge: float = 0.05) -> torch.nn.Module:
    """A randomly initialised network with its weights nudged, so its maps have structure to compare."""
    torch.manual_seed(seed)
    model = build_model(config.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * nudge)
    return model


def pair_files(tmp: Path) -> list[str]:
    """A 200x150 noise pair with one inverted patch, written to ``tmp``: the --hist/--cur flags naming it."""
    rng = np.random.default_rng(2)
    hist = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
    cur = hist.copy()
    cur[40:90, 60:120] = 255 - cur[40:90, 60:120]
    cv2.imwrite(str(tmp / "h.png"), hist)
    cv2.imwrite(str(tmp / "c.png"), cur)
    return ["--hist", str(tmp / "h.png"), "--cur", str(tmp / "c.png")]


@pytest.mark.slow  # torch's ONNX exporter traces the network: about half a minute an export on 2 cores
@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_export_matches_pytorch_at_two_sizes_and_batches(name, tmp_path):
    """The paper and tiny variants, exported once, agree with PyTorch to 1e-4 at 256x256 (batch 1) and 96x160
    (batch 2), and at a third size checked here by hand: batch, height and width are inputs, not constants."""
    import onnx

    config = with_window(Config().with_flat({"model.name": name}), {"data.resize": 256})
    model = trained_like(config)
    path = export_onnx(model, config, 0.4, tmp_path)
    assert parity(model, path) < 1e-4
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["history", "current"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims[:3]) and dims[3] == 3, dims  # symbolic batch, height, width

    onnx_model = OnnxModel(path)
    assert onnx_model.threshold == 0.4 and onnx_model.config.model == config.model
    rng = np.random.default_rng(1)
    hist, cur = (torch.from_numpy(rng.integers(0, 256, (3, 3, 128, 48), dtype=np.uint8)) for _ in range(2))
    from anodfd.inference import predict_probs

    expected = predict_probs(model, hist, cur, torch.device("cpu"))
    np.testing.assert_allclose(onnx_model.probs(hist, cur).numpy(), expected.numpy(), atol=1e-4)


@pytest.mark.slow  # an ONNX export
def test_predict_with_onnx_equals_predict_with_the_checkpoint(tmp_path):
    """`anodfd predict --onnx` reads view, window and threshold from the file, and gives the checkpoint's maps,
    boxes and scores for a pair larger than one window (tiled)."""
    import json

    config = with_window(Config().with_flat(PRESETS["smoke"]), {"data.resize": 0, "data.crop": 64})
    model = trained_like(config, seed=3, nudge=0.15)
    ckpt = tmp_path / "c.pt"
    save_checkpoint(checkpoint_dict(model, None, 1, config, {"calibrated_threshold": 0.55}, (0.0, 0.0)), ckpt)
    assert cli(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")]) == 0

    pair = pair_files(tmp_path)
    assert cli(["predict", "--checkpoint", str(ckpt), *pair, "--out", str(tmp_path / "torch")]) == 0
    assert cli(["predict", "--onnx", str(tmp_path / "export" / "model.onnx"), *pair, "--out", str(tmp_path / "ort")]) == 0
    maps = [cv2.imread(str(tmp_path / d / "c_map.png"), cv2.IMREAD_GRAYSCALE).astype(int) for d in ("torch", "ort")]
    assert maps[0].std() > 2  # a map with structure
    assert np.abs(maps[0] - maps[1]).max() <= 1  # 8-bit PNGs of maps equal to 1e-4
    runs = [json.loads((tmp_path / d / "c.json").read_text()) for d in ("torch", "ort")]
    assert runs[0]["threshold"] == runs[1]["threshold"] == 0.55
    assert abs(runs[0]["score"] - runs[1]["score"]) < 1e-4
    assert [b["area"] for b in runs[0]["boxes"]] == [b["area"] for b in runs[1]["boxes"]]


def test_a_file_that_is_not_an_export_gets_one_clear_error(tmp_path):
    (tmp_path / "bad.onnx").write_text("not a graph")
    with pytest.raises(ConfigError, match="bad.onnx: ONNX Runtime cannot load it"):
        OnnxModel(tmp_path / "bad.onnx")
    with pytest.raises(ConfigError, match="missing.onnx: no such ONNX file"):
        OnnxModel(tmp_path / "missing.onnx")
