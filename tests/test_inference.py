"""Tiled inference: one tile is untiled inference, blended tiles leave no seam, memory is bounded by the tile batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from anodfd import inference
from anodfd.config import PRESETS, Config, with_window
from anodfd.data.dataset import normalize, to_chw
from anodfd.inference import predict_probs, sliding_probs, tile_starts
from anodfd.model import build_model

CPU = torch.device("cpu")


def sensitive_model(depth: int = 2, window: int = 64) -> nn.Module:
    """The tiny AnoDFDNet for ``window`` px tiles, its weights shaken so that its map has structure."""
    config = with_window(Config().with_flat(PRESETS["smoke"]), {"data.crop": window, "model.depth": depth})
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def random_pair(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cur = hist.copy()
    cur[h // 3:h // 2, w // 3:w // 2] = 255 - cur[h // 3:h // 2, w // 3:w // 2]
    return hist, cur


@pytest.mark.parametrize("length", [40, 64, 65, 100, 176, 240, 2048])
def test_tiles_cover_the_image_and_overlap(length):
    starts = tile_starts(length, 64)
    assert starts[0] == 0 and starts[-1] == max(0, length - 64)
    assert all(0 < b - a <= 64 * (1 - inference.OVERLAP) for a, b in itertools.pairwise(starts))


@pytest.mark.parametrize("depth", [0, 2])
def test_a_pair_one_tile_large_gives_the_untiled_map(depth):
    model = sensitive_model(depth)
    hist, cur = random_pair(64, 64)
    untiled = predict_probs(model, to_chw(hist)[None], to_chw(cur)[None], CPU)[0, 0]
    assert untiled.std() > 1e-3
    torch.testing.assert_close(sliding_probs(model, hist, cur, 64), untiled, atol=1e-5, rtol=0)

    # Smaller than a window: reflected up to one, as training crops are, and cut back.
    small_h, small_c = hist[:40, :52], cur[:40, :52]
    padded = [np.pad(x, ((0, 24), (0, 12), (0, 0)), mode="reflect") for x in (small_h, small_c)]
    expected = predict_probs(model, to_chw(padded[0])[None], to_chw(padded[1])[None], CPU)[0, 0, :40, :52]
    torch.testing.assert_close(sliding_probs(model, small_h, small_c, 64), expected, atol=1e-5, rtol=0)


class BoxFilter(nn.Module):
    """A fully convolutional stand-in with a known edge effect: a 15x15 mean of |current - history| with zero padding,
    so each tile's outermost 7 px read zeros beyond the tile. Run on the whole image it is the exact map tiles
    should reproduce."""

    def forward(self, hist: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        diff = (cur - hist).abs().mean(dim=1, keepdim=True) + 0.5  # a uniform pair reads 0.5, far from padding's 0
        return torch.logit(nn.functional.avg_pool2d(diff, 15, stride=1, padding=7, count_include_pad=True)
                           .clamp(1e-4, 1 - 1e-4))


def seam_errors(tiled: torch.Tensor, exact: torch.Tensor, window: int) -> tuple[float, float]:
    """Mean |tiled - exact| within 2 px of an inner tile border, and everywhere else away from the image edge."""
    h, w = exact.shape
    border = torch.zeros(h, w, dtype=torch.bool)
    for start in tile_starts(h, window):
        for edge in (start, start + window):
            if 0 < edge < h:
                border[edge - 2:edge + 2] = True
    for start in tile_starts(w, window):
        for edge in (start, start + window):
            if 0 < edge < w:
                border[:, edge - 2:edge + 2] = True
    inner = torch.zeros(h, w, dtype=torch.bool)
    inner[8:-8, 8:-8] = True  # the image's own edge is zero-padded alike in both maps
    err = (tiled - exact).abs()
    return float(err[border & inner].mean()), float(err[~border & inner].mean())


def test_blended_tiles_leave_no_seam(monkeypatch):
    """On a pair that is uniform apart from one anomaly, the blended map is no worse along tile borders than
    elsewhere. Averaging the tiles with equal weights instead leaves each tile's edge effect in the map: the same
    measurement sees that seam, so the test can tell the two apart."""
    model = BoxFilter()
    hist = np.full((176, 240, 3), 40, np.uint8)
    cur = hist.copy()
    cur[80:92, 100:110] = 220
    exact = torch.sigmoid(model(normalize(to_chw(hist)[None]), normalize(to_chw(cur)[None])))[0, 0]

    on_border, elsewhere = seam_errors(sliding_probs(model, hist, cur, 64), exact, 64)
    assert on_border <= elsewhere + 1e-3, (on_border, elsewhere)

    monkeypatch.setattr(inference, "blend_weights", lambda window: torch.ones(window, window))
    flat_border, flat_elsewhere = seam_errors(sliding_probs(model, hist, cur, 64), exact, 64)
    assert flat_border > flat_elsewhere + 0.01 and flat_border > 10 * on_border, (flat_border, flat_elsewhere)

    # The real network, fully convolutional (depth 0): tiles agree with the whole-image map about as well on tile
    # borders as elsewhere.
    net = sensitive_model(depth=0)
    exact = predict_probs(net, to_chw(hist)[None], to_chw(cur)[None], CPU)[0, 0]
    monkeypatch.undo()
    on_border, elsewhere = seam_errors(sliding_probs(net, hist, cur, 64), exact, 64)
    assert on_border <= elsewhere + 2e-3, (on_border, elsewhere)


def test_tiles_go_through_the_network_a_bounded_batch_at_a_time():
    """A 300x500 pair in 64 px windows: every forward pass sees at most `batch` windows, each window-sized, and
    every window once: memory for the network does not grow with the image."""
    seen = []

    class Recording(nn.Module):
        def forward(self, hist: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(hist.shape))
            return (cur - hist).mean(dim=1, keepdim=True)

    hist, cur = random_pair(300, 500)
    probs = sliding_probs(Recording(), hist, cur, 64, batch=4)
    assert probs.shape == (300, 500)
    windows = len(tile_starts(300, 64)) * len(tile_starts(500, 64))
    assert all(s[0] <= 4 and s[1:] == (3, 64, 64) for s in seen)
    assert sum(s[0] for s in seen) == windows and len(seen) == -(-windows // 4)
