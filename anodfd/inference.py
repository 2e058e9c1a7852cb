"""Anomaly maps of pairs of any size: the network's window slid over the pair's view, tiles blended, map resized back.

A model trained on ``window`` x ``window`` crops sees a 2048x1536 image as overlapping windows of that size. Each
tile's probabilities are weighted by a Gaussian bump that is highest at the tile's centre, where the network saw
the most context, and tiny (never zero) at its border, where zero padding distorts it; the blended map therefore
has no seams at tile borders. Tiles go through the network ``batch`` at a time, so memory stays flat as images
grow: only the uint8 pair and two float maps scale with the image. A view exactly one window large is one tile,
which is plain untiled inference (the paper's resized pairs are this case).

Training validation, `anodfd eval`, `anodfd predict`, the pyfunc and the registry's scoring all call
`served_probs` (through `pair_map` for decoded files), so they cannot drift apart; it confirms the map by
registered differencing (`anodfd.confirm`) when the config asks. Plain torch and numpy.

MONAI's `sliding_window_inference` does the same; it was not used because importing it adds about 9 s to every
process (the CLI, each Ray worker, the served model) and it needs the whole image as a float tensor.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anodfd.config import DEVICES, ConfigError, DataConfig
from anodfd.confirm import confirmed, evidence
from anodfd.data.align import Registration
from anodfd.data.cache import View, view_pair
from anodfd.data.dataset import normalize, to_chw
from anodfd.metrics import image_scores

OVERLAP = 0.25  # the least share of a window that neighbouring tiles share
TILE_BATCH = 8  # tiles per forward pass: bounds memory whatever the image size


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(DEVICES, name):
        raise ConfigError(f"--device {name!r}: not a device; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name!r}: PyTorch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


def autocast(device: torch.device):
    """bf16 autocast on GPU (no loss scaling needed, unlike fp16); full precision on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.inference_mode()
def predict_probs(model: nn.Module, hist: torch.Tensor, cur: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 Bx3xHxW pairs -> Bx1xHxW probabilities on the CPU, in one forward pass."""
    if not isinstance(model, nn.Module):  # an exported graph in ONNX Runtime (anodfd.export.OnnxModel)
        return model.probs(hist, cur)
    model.eval()
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    h, c = (normalize(x.to(device, non_blocking=True)).contiguous(memory_format=fmt) for x in (hist, cur))
    with autocast(device):
        return torch.sigmoid(model(h, c).float()).cpu()


def resize_probs(probs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A Bx1xhxw probability map at another resolution (bilinear: probabilities stay in [0, 1])."""
    if probs.shape[-2:] == (height, width):
        return probs
    return F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)


def tile_starts(length: int, window: int, overlap: float = OVERLAP) -> list[int]:
    """Offsets of the windows covering ``[0, length)``: the first at 0, the last flush with the end, evenly spread
    so that neighbours share at least ``overlap`` of a window."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / (window * (1 - overlap))) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


@functools.lru_cache(maxsize=8)
def blend_weights(window: int) -> torch.Tensor:
    """A tile's weight per pixel: a Gaussian of sigma window/8 about its centre, floored at 1e-4 so that a border
    pixel only one tile covers keeps that tile's value."""
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-0.5 * (x / (window / 8)) ** 2)
    return torch.outer(g, g).div(g.max() ** 2).clamp_min(1e-4).float()


@torch.inference_mode()
def sliding_probs(
    model: nn.Module, hist: np.ndarray, cur: np.ndarray, window: int, device: torch.device | str = "cpu",
    batch: int = TILE_BATCH,
) -> torch.Tensor:
    """An HxWx3 uint8 RGB pair in the network's view -> HxW float32 probabilities (CPU), from blended windows."""
    device = torch.device(device)
    h, w = cur.shape[:2]
    if hist.shape != cur.shape:
        raise ValueError(f"history {hist.shape} and current {cur.shape} differ in size")
    if h < window or w < window:  # smaller than one window: reflected, as training crops are padded
        pad = ((0, max(0, window - h)), (0, max(0, window - w)), (0, 0))
        hist, cur = np.pad(hist, pad, mode="reflect"), np.pad(cur, pad, mode="reflect")
    height, width = cur.shape[:2]
    corners = [(y, x) for y in tile_starts(height, window) for x in tile_starts(width, window)]
    weights = blend_weights(window)
    total, weight = torch.zeros(height, width), torch.zeros(height, width)
    for start in range(0, len(corners), batch):
        chunk = corners[start:start + batch]
        probs = predict_probs(model, torch.stack([to_chw(hist[y:y + window, x:x + window]) for y, x in chunk]),
                              torch.stack([to_chw(cur[y:y + window, x:x + window]) for y, x in chunk]), device)
        for (y, x), p in zip(chunk, probs[:, 0]):
            total[y:y + window, x:x + window] += p * weights
            weight[y:y + window, x:x + window] += weights
    return (total / weight)[:h, :w]


class PairMap(NamedTuple):
    probs: np.ndarray  # HxW float32 probabilities at the current image's size
    score: float  # the pair's anomaly score (`image_scores`)
    registration: Registration  # how history was registered onto current (`--align`); identity for none


def served_probs(
    model: nn.Module, hist: np.ndarray, cur: np.ndarray, window: int, confirm: str = "none",
    device: torch.device | str = "cpu", batch: int = TILE_BATCH,
) -> torch.Tensor:
    """`sliding_probs`, then with ``confirm`` "diff" only the regions the pair's grey difference confirms
    (`anodfd.confirm.confirmed`): the map validation calibrates on and every serving path cuts."""
    probs = sliding_probs(model, hist, cur, window, device, batch)
    if confirm == "diff":
        probs = torch.from_numpy(confirmed(probs.numpy(), evidence(hist, cur)))
    return probs


def pair_map(
    model: nn.Module, data: DataConfig, hist_rgb: np.ndarray, cur_rgb: np.ndarray,
    device: torch.device | str = "cpu", batch: int = TILE_BATCH,
) -> PairMap:
    """One decoded RGB pair of any size -> its probability map at the current image's size, score and registration.

    The pair is brought to the config's view exactly as the decode cache brings it for training (`view_pair`),
    then slid over.
    """
    hist, cur, registration = view_pair(hist_rgb, cur_rgb, View.of(data))
    probs = served_probs(model, hist, cur, data.window, data.confirm, device, batch)
    full = resize_probs(probs[None, None], *cur_rgb.shape[:2])[0, 0].numpy()
    return PairMap(full, float(image_scores(probs[None, None])[0]), registration)
