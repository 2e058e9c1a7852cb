"""How the registry scores a model: one split, at the masks' native resolution, beside a template-differencing floor.

A model trained at 64² and one trained at 640² are only comparable on the same pixels, so every probability map
is resized to its mask's own size (bilinear, exactly as `anodfd predict` does) before it is counted. The rules
are written down as a `Protocol` (data fingerprint by content, split, resolution rule, threshold rule, floor
rule); the registry compares test metrics only between versions scored under the same protocol.

The floor is template differencing, |current - history| in grey with a 3x3 opening, at native size, its
threshold fitted on the train split (as `benchmarks/paper_tables.py` does): a model that cannot beat it, or
whose pixel AUC is not clearly above chance, is not a detector anyone should deploy.

Plain PyTorch and OpenCV: nothing here knows Ray or MLflow.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from anodfd.checkpoint import inference_model
from anodfd.config import DataConfig
from anodfd.confirm import difference_map
from anodfd.data.cache import PairCache, View, read_mask
from anodfd.data.dataset import make_dataset
from anodfd.data.layouts import Pair, fingerprint, load_split, read_boxes
from anodfd.evaluation import evaluate, register_pairs
from anodfd.metrics import (
    DEFECT_GAP,
    MIN_REGION_AREA,
    BoxCounts,
    DefectCounts,
    ImageScores,
    PixelHistogram,
    plot_roc,
)

PROTOCOL_VERSION = 4  # 2: defect-level scores; 3: mask fragments grouped into defects, specks ignored;
# 4: the gate compares F1 at the served threshold
MIN_AUC = 0.6  # pixel AUC a version needs to take champion: 0.5 is a coin toss, 0.6 is clearly more
GRID_PAIRS = 4  # test pairs in the model card's overlay grid


@dataclass(frozen=True)
class Protocol:
    """What a test score means: which data, which split, at which resolution, at which thresholds."""

    fingerprint: str  # `anodfd.data.layouts.fingerprint`: the splits' file contents
    split: str = "test"
    resolution: str = "native: each probability map bilinearly resized to its mask's size, as anodfd predict"
    thresholds: str = ("test_* at 0.5 (the paper's); test_*_calibrated at the checkpoint's validation-calibrated one, "
                       "which it serves with and the gate compares")
    floor: str = "template differencing at native size, 3x3 opening, threshold fitted on the train split"
    defects: str = (f"at the served threshold: mask pixels grouped across gaps of up to {DEFECT_GAP} px, groups of at "
                    f"least {MIN_REGION_AREA} px, are defects (smaller ones are ignored specks); each predicted region "
                    f"of at least {MIN_REGION_AREA} px (as anodfd predict) is a detection; a defect is found when a "
                    "detection overlaps it; a detection on no defect and no speck is a false alarm")
    version: int = PROTOCOL_VERSION

    @property
    def id(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Protocol:
        return cls(**json.loads(text))


def shortfall(f1: float, auc: float, floor_f1: float, min_auc: float = MIN_AUC, at: str = "") -> str | None:
    """Why a version with test ``f1`` (measured ``at`` some threshold) and ``auc`` may not be champion, with by how
    much; None if it clears the floor."""
    problems = []
    if not f1 > floor_f1:
        problems.append(f"test F1 {f1:.4f}{at} is {floor_f1 - f1:.4f} short of the template-differencing floor "
                        f"{floor_f1:.4f}")
    if not auc >= min_auc:  # also NaN
        problems.append(f"pixel AUC {auc:.4f} is {min_auc - auc:.4f} short of {min_auc:g}")
    return "; ".join(problems) or None


@dataclass
class Scorecard:
    """A checkpoint's scores under one protocol: what the registry stores on a version and compares."""

    protocol: Protocol
    metrics: dict[str, float]  # at threshold 0.5
    calibrated: dict[str, float]  # at `threshold`
    threshold: float  # the calibrated threshold the model serves with
    floor_f1: float
    floor_threshold: float
    pairs: int
    split_sizes: dict[str, int] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # name -> picture (roc.png, overlays.jpg)
    # `DefectCounts.compute()` at `threshold`, and `BoxCounts.compute()` where the split's pairs have boxes
    defects: dict[str, float] = field(default_factory=dict)

    @property
    def shortfall(self) -> str | None:
        return shortfall(self.calibrated["f1"], self.metrics["auc"], self.floor_f1,
                         at=f" at its served threshold {self.threshold:.6g}")

    def tags(self) -> dict[str, str]:
        """Registry version tags: test_<metric>, test_<metric>_calibrated, the protocol and the floor."""
        return {
            **{f"test_{k}": f"{v:.6g}" for k, v in self.metrics.items() if k != "threshold"},
            **{f"test_{k}_calibrated": f"{v:.6g}" for k, v in self.calibrated.items() if k != "threshold"},
            **{f"test_{k}": f"{v:.6g}" for k, v in self.defects.items()},
            "served_threshold": f"{self.threshold:.6g}",
            "fingerprint": self.protocol.fingerprint,
            "protocol": self.protocol.to_json(),
            "protocol_id": self.protocol.id,
            "floor_f1": f"{self.floor_f1:.6g}",
            "floor_threshold": f"{self.floor_threshold:.6g}",
            "test_pairs": str(self.pairs),
            **{f"split_{k}": str(v) for k, v in self.split_sizes.items()},
        }


# --- scoring -----------------------------------------------------------------------------------------------


def _progress(items, desc: str, show: bool):
    return tqdm(items, desc=desc, unit="pair", disable=not show, leave=False)


@torch.inference_mode()
def score_native(
    model: nn.Module, data: DataConfig, split: str, device: torch.device | str = "cpu", batch_size: int = 8,
    grid_pairs: int = 0, progress: bool = True, threshold: float = 0.5, boxes: BoxCounts | None = None,
) -> tuple[PixelHistogram, ImageScores, DefectCounts, list[tuple[np.ndarray, ...]]]:
    """Pixel histogram, pair scores and defect counts (maps cut at ``threshold``) of ``model`` over ``split``,
    counted on each mask's own pixels (`anodfd.evaluation.evaluate`, tiles ``batch_size`` at a time).

    The network sees each pair as `anodfd predict` feeds it (the checkpoint's view and window). Also returns the
    first ``grid_pairs`` pairs as (history, current, mask, map) at display size, for the overlay grid. ``boxes``
    is filled with the maps counted against each pair's own boxes (`read_boxes`), for the pairs that have a file.
    """
    dataset = make_dataset(data, split)  # checks every file of the split before any compute
    pair_boxes = [read_boxes(p) for p in dataset.pairs] if boxes is not None else []  # bad lines fail up front
    grid = []

    def keep_for_grid(i: int, probs: np.ndarray, mask: np.ndarray) -> None:
        if i < grid_pairs:
            grid.append(_display(dataset.pairs[i], mask, probs))
        if pair_boxes and pair_boxes[i] is not None:
            boxes.update((probs >= threshold).astype(np.uint8), pair_boxes[i])

    pixels, images, defects = evaluate(model, dataset, torch.device(device), data.window, threshold,
                                       batch=batch_size, on_pair=keep_for_grid, confirm=data.confirm,
                                       progress=f"scoring {split} at native size" if progress else None)
    register_pairs([dataset], lambda line: print(line, file=sys.stderr))  # names pairs left unregistered
    return pixels, images, defects, grid


def _display(pair: Pair, mask: np.ndarray, probs: np.ndarray, width: int = 320) -> tuple[np.ndarray, ...]:
    """(history, current, mask, map) of one pair scaled to ``width`` pixels wide, RGB, for the overlay grid."""
    h, w = mask.shape
    size = (width, max(1, round(h * width / w)))

    def image(path: Path) -> np.ndarray:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        return cv2.cvtColor(cv2.resize(img, size, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)

    return (image(pair.hist), image(pair.cur), cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST),
            cv2.resize(probs, size, interpolation=cv2.INTER_LINEAR))


def template_difference(data: DataConfig, split: str, native: bool = True,
                        progress: bool = True) -> tuple[PixelHistogram, float]:
    """Template differencing's histogram on ``split`` and its threshold, fitted on the train split.

    ``native``: on the files as they are, counted on the masks' pixels; otherwise on the pairs in the config's
    view (as the models see them).
    """
    cache = PairCache(data.cache_dir or None)

    def histogram(name: str) -> PixelHistogram:
        hist = PixelHistogram()
        pairs = load_split(Path(data.data), name, data.layout, data.val_fraction, group_regex=data.group_regex,
                           val_groups=data.val_groups)
        for pair in _progress(pairs, f"template differencing on {name}", progress):
            if native:
                history, current = (cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in (pair.hist, pair.cur))
                mask = read_mask(pair.mask)
                if history.shape != mask.shape or current.shape != mask.shape:
                    # Pairs of another size than their mask: compare at the mask's size.
                    history, current = (cv2.resize(x, mask.shape[::-1], interpolation=cv2.INTER_AREA)
                                        for x in (history, current))
            else:
                arr = cache.get(pair, View.of(data))
                history, current, mask = arr[..., :3], arr[..., 3:6], arr[..., 6]
            hist.update(torch.from_numpy(difference_map(history, current)), torch.from_numpy(mask))
        return hist

    threshold, _ = histogram("train").best_f1_threshold()
    return histogram(split), threshold


def score_checkpoint(
    ckpt: dict, data_dir: str | Path, split: str = "test", device: torch.device | str = "cpu",
    out: str | Path | None = None, progress: bool = True,
) -> Scorecard:
    """A checkpoint's `Scorecard` on ``split`` of ``data_dir``; with ``out``, also its ROC curve and overlay grid."""
    from anodfd.predict import overlay_grid

    model, config = inference_model(ckpt, device)
    config.data.data = str(data_dir)
    data = config.data
    protocol = Protocol(fingerprint(Path(data_dir), data.layout), split)
    threshold = float(ckpt.get("threshold", 0.5))
    if not 0.0 < threshold < 1.0:
        threshold = 0.5
    boxes = BoxCounts()
    pixels, _, defects, grid = score_native(model, data, split, device, grid_pairs=GRID_PAIRS if out else 0,
                                            progress=progress, threshold=threshold, boxes=boxes)
    floor, floor_threshold = template_difference(data, split, native=True, progress=progress)
    # The files were checked when the splits were scored above: only the counts are needed here.
    sizes = {s: len(load_split(Path(data_dir), s, data.layout, data.val_fraction, check=False,
                               group_regex=data.group_regex, val_groups=data.val_groups))
             for s in ("train", "val", split)}
    card = Scorecard(protocol, pixels.compute(0.5), pixels.compute(threshold), threshold,
                     floor.compute(floor_threshold)["f1"], floor_threshold, sizes[split], sizes,
                     defects={**defects.compute(), **(boxes.compute() if boxes.counts["pairs"] else {})})
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        card.files["roc.png"] = plot_roc({"model": pixels, "template differencing": floor}, out / "roc.png",
                                         title=f"{Path(data_dir).name}, {split} split, native resolution")
        if grid:
            cv2.imwrite(str(out / "overlays.jpg"), overlay_grid(grid, threshold))
            card.files["overlays.jpg"] = out / "overlays.jpg"
    return card
