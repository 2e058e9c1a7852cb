"""The paper's measures, pooled over every pixel of a split, from fixed-size score histograms.

A `PixelHistogram` counts positive and negative pixels per probability bin. Memory does not grow with the
split, and histograms from several processes add up exactly: distributed evaluation sums `state()` with
`dist.all_reduce(SUM)` and rebuilds with `from_state`.

Binning (why thresholds on the grid are exact):
    bin k (of `bins`) holds the probabilities p with k/bins <= p < (k+1)/bins, i.e. k = floor(p * bins),
    clamped to [0, bins - 1] (so p = 1.0, and anything above, lands in the top bin; anything below 0 in
    bin 0). The bin is found by comparing p, in float64, against the edges k/bins computed in float64
    (`torch.bucketize`), not by multiplying p * bins, whose rounding could push a probability just below
    an edge into the bin above. Hence, for every grid threshold t = k/bins with k < bins, the pixels in
    bins k..bins-1 are exactly those with p >= t (p compared as the float64 value of its own dtype,
    t as the Python float k/bins): the paper's threshold 0.5 is exact. Threshold 1.0 (k = bins) predicts
    nothing positive, since p == 1.0 shares the top bin. Thresholds off the grid are rounded to the
    nearest grid point, and `compute` reports the grid threshold actually used.

Empty denominators (one convention, everywhere): a ratio 0/0 is 0.0, except in the all-negative perfect
case (no positive pixel present and none predicted: tp = fp = fn = 0), where precision, recall, F1 and IoU
are all 1.0, since there was nothing to find and nothing was flagged. So "predicted nothing" on a split
with anomalies scores F1 = 0, and "flagged something" on a split without any scores precision = 0.
AUC and EER need both classes: with only one class present they are NaN (so is the ROC).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

DEFAULT_BINS = 1000


class PixelHistogram:
    """Counts of positive and negative pixels per probability bin (default 1000 bins on [0, 1])."""

    def __init__(self, bins: int = DEFAULT_BINS, device: torch.device | str | None = None) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = int(bins)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Row 0 negatives, row 1 positives: the row index is the label.
        self._counts = torch.zeros(2, self.bins, dtype=torch.int64, device=self.device)
        self._edges: dict[torch.device, Tensor] = {}

    @property
    def neg(self) -> Tensor:
        return self._counts[0]

    @property
    def pos(self) -> Tensor:
        return self._counts[1]

    def _edges_on(self, device: torch.device) -> Tensor:
        # Cached per device: updates run where the probabilities are (often the GPU).
        if device not in self._edges:
            grid = torch.arange(self.bins + 1, dtype=torch.float64, device=device) / self.bins
            self._edges[device] = grid
        return self._edges[device]

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add pixels: `probs` in [0, 1] (any shape), `target` with values in {0, 1} of the same shape."""
        if probs.shape != target.shape:
            raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} differ in shape")
        p = probs.detach().reshape(-1).to(torch.float64)
        if torch.isnan(p).any():
            raise ValueError("probs contain NaN")
        labels = (target.detach().reshape(-1) > 0.5).to(torch.int64).to(p.device)
        # right=True counts the edges <= p, so index = that count - 1 = floor(p * bins), computed exactly.
        index = torch.bucketize(p, self._edges_on(p.device), right=True) - 1
        index = index.clamp_(0, self.bins - 1)
        counts = torch.bincount(index + labels * self.bins, minlength=2 * self.bins)
        self._counts += counts.view(2, self.bins).to(self.device)

    def merge(self, other: PixelHistogram) -> PixelHistogram:
        """Add another histogram's counts into this one (in place) and return self."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms with {self.bins} and {other.bins} bins")
        self._counts += other._counts.to(self.device)
        return self

    def state(self) -> Tensor:
        """All counts as one int64 tensor [2, bins] (row 0 negatives, row 1 positives), for all_reduce."""
        return self._counts.clone()

    @classmethod
    def from_state(cls, state: Tensor) -> PixelHistogram:
        if state.dim() != 2 or state.shape[0] != 2:
            raise ValueError(f"state must have shape [2, bins], got {tuple(state.shape)}")
        hist = cls(bins=state.shape[1], device=state.device)
        hist._counts += state.to(torch.int64)
        return hist

    # -- thresholded measures -------------------------------------------------------------------

    def grid_index(self, threshold: float) -> int:
        """The grid point k (threshold k/bins) nearest to `threshold`, clamped to [0, bins]."""
        return min(max(round(threshold * self.bins), 0), self.bins)

    def confusion(self, threshold: float = 0.5) -> tuple[int, int, int, int]:
        """tp, fp, tn, fn; a pixel is predicted positive iff prob >= threshold (rounded to the grid)."""
        k = self.grid_index(threshold)
        neg, pos = self._numpy()
        tp, fn = int(pos[k:].sum()), int(pos[:k].sum())
        fp, tn = int(neg[k:].sum()), int(neg[:k].sum())
        return tp, fp, tn, fn

    def compute(self, threshold: float = 0.5) -> dict[str, float]:
        """precision, recall, oa, f1, iou at `threshold`; auc, eer; and the grid threshold used."""
        tp, fp, tn, fn = self.confusion(threshold)
        total = tp + fp + tn + fn
        if tp + fp + fn == 0:  # all-negative perfect case, see the module docstring
            precision = recall = f1 = iou = 1.0
        else:
            precision = _ratio(tp, tp + fp)
            recall = _ratio(tp, tp + fn)
            f1 = _ratio(2 * tp, 2 * tp + fp + fn)
            iou = _ratio(tp, tp + fp + fn)
        return {
            "precision": precision,
            "recall": recall,
            "oa": _ratio(tp + tn, total),
            "f1": f1,
            "iou": iou,
            "auc": self.auc(),
            "eer": self.eer(),
            "threshold": self.grid_index(threshold) / self.bins,
        }

    def best_f1_threshold(self) -> tuple[float, float]:
        """(threshold, f1) maximising F1 over the grid thresholds k/bins, k = 0..bins.

        When several thresholds tie (typically empty bins between well separated classes) the middle one
        is returned: it leaves the same margin on both sides.
        """
        tp, fp = self._positives_at()
        positives = tp[0]
        denominator = positives + tp + fp  # = 2tp + fp + fn
        f1 = np.where(denominator > 0, 2.0 * tp / np.maximum(denominator, 1), 1.0)
        best = np.flatnonzero(f1 == f1.max())
        k = int(best[len(best) // 2])
        return k / self.bins, float(f1[k])

    # -- threshold-free measures ----------------------------------------------------------------

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr), bins + 1 points from (0, 0) to (1, 1), sweeping the threshold from high to low.

        NaN arrays when only one class is present.
        """
        tp, fp = self._positives_at()
        positives, negatives = tp[0], fp[0]
        if positives == 0 or negatives == 0:
            nan = np.full(self.bins + 1, np.nan)
            return nan, nan.copy()
        return fp[::-1] / negatives, tp[::-1] / positives

    def auc(self) -> float:
        """Trapezoidal area under the ROC; pixels sharing a bin count as ties (half credit)."""
        fpr, tpr = self.roc()
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))

    def eer(self) -> float:
        """Equal error rate: where FPR = FNR = 1 - TPR, linearly interpolated on the ROC."""
        return _eer_point(*self.roc())[0]

    # -- helpers --------------------------------------------------------------------------------

    def _numpy(self) -> tuple[np.ndarray, np.ndarray]:
        counts = self._counts.cpu().numpy()
        return counts[0], counts[1]

    def _positives_at(self) -> tuple[np.ndarray, np.ndarray]:
        """tp[k], fp[k] for k = 0..bins: pixels of each class with prob >= k/bins (int64, exact)."""
        neg, pos = self._numpy()
        tp = np.append(np.cumsum(pos[::-1])[::-1], 0)
        fp = np.append(np.cumsum(neg[::-1])[::-1], 0)
        return tp, fp


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _eer_point(fpr: np.ndarray, tpr: np.ndarray) -> tuple[float, float, float]:
    """(eer, fpr, tpr) at the crossing of the ROC with the line fpr = 1 - tpr; NaNs without a ROC."""
    if np.isnan(fpr).any():
        return math.nan, math.nan, math.nan
    # gap = FPR - FNR rises from -1 at (0, 0) to +1 at (1, 1) along the sweep; find where it reaches 0.
    gap = fpr + tpr - 1.0
    i = int(np.argmax(gap >= 0))
    if gap[i] == 0 or i == 0:
        return float(fpr[i]), float(fpr[i]), float(tpr[i])
    a = gap[i - 1] / (gap[i - 1] - gap[i])
    x = fpr[i - 1] + a * (fpr[i] - fpr[i - 1])
    y = tpr[i - 1] + a * (tpr[i] - tpr[i - 1])
    return float(x), float(x), float(y)


def plot_roc(
    hist_or_curves: PixelHistogram | dict[str, PixelHistogram],
    path: str | Path,
    title: str = "ROC",
) -> Path:
    """Write a ROC curve PNG, AUC and EER in the legend; a dict name -> histogram draws one curve each."""
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = hist_or_curves if isinstance(hist_or_curves, dict) else {"": hist_or_curves}
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for name, hist in curves.items():
        fpr, tpr = hist.roc()
        eer, eer_fpr, eer_tpr = _eer_point(fpr, tpr)
        label = f"AUC {hist.auc():.3f}, EER {eer:.3f}"
        line = ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} ({label})" if name else label)[0]
        ax.plot([eer_fpr], [eer_tpr], marker="o", color=line.get_color())
    ax.set(
        xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# -- image level --------------------------------------------------------------------------------


def image_scores(probs: Tensor, topk_fraction: float = 0.01) -> Tensor:
    """Per-pair anomaly score [B] from a B x 1 x H x W probability map: the mean of its top pixels.

    The mean of the top 1% is robust to a single hot pixel (which would decide a max) yet, unlike the
    mean of the whole map, still sensitive to an anomaly covering only ~1% of the image.
    """
    if not 0 < topk_fraction <= 1:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    flat = probs.detach().reshape(probs.shape[0], -1).float()
    k = max(1, math.ceil(topk_fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


class ImageScores:
    """Accumulates (score, label) per pair, label = the mask has any anomalous pixel.

    Scores are kept as a histogram per class (a `PixelHistogram` whose "pixels" are pairs), so the state
    has a fixed size and gathers across processes like the pixel histogram.
    """

    def __init__(
        self, bins: int = DEFAULT_BINS, topk_fraction: float = 0.01, device: torch.device | str | None = None
    ) -> None:
        self.topk_fraction = topk_fraction
        self.hist = PixelHistogram(bins, device)

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch: probability maps and masks, both B x 1 x H x W."""
        labels = target.detach().reshape(target.shape[0], -1).amax(dim=1) > 0.5
        self.add(image_scores(probs, self.topk_fraction), labels)

    def add(self, scores: Tensor, labels: Tensor) -> None:
        """Add precomputed per-pair scores in [0, 1] and their 0/1 labels."""
        self.hist.update(scores, labels.float())

    def merge(self, other: ImageScores) -> ImageScores:
        self.hist.merge(other.hist)
        return self

    def state(self) -> Tensor:
        return self.hist.state()

    @classmethod
    def from_state(cls, state: Tensor, topk_fraction: float = 0.01) -> ImageScores:
        scores = cls(bins=state.shape[1], topk_fraction=topk_fraction, device=state.device)
        scores.hist = PixelHistogram.from_state(state)
        return scores

    def auroc(self) -> float:
        """Image-level ROC AUC; NaN unless both normal and anomalous pairs were seen."""
        return self.hist.auc()


# --- defect level -------------------------------------------------------------------------------------------

MIN_REGION_AREA = 16  # pixels: smaller predicted regions are specks, dropped by `predict` and by the defect count


def detections(binary: np.ndarray, min_area: int = MIN_REGION_AREA) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`anodfd predict`'s regions of a {0,1} map: 8-connected components of at least ``min_area`` pixels.

    Returns the component label image, OpenCV's per-label stats (x, y, width, height, area) and the labels kept.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    return labels, stats, [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]


DEFECT_GAP = 4  # pixels: mask fragments at most this far apart are one defect


def defect_regions(mask: np.ndarray, min_area: int = MIN_REGION_AREA, gap: int = DEFECT_GAP) -> tuple[np.ndarray, list[int]]:
    """The defects of a {0,1} mask: its pixels grouped across gaps of up to ``gap`` px (a binarised mask often splits
    one defect into fragments), keeping groups of at least ``min_area`` mask pixels. Smaller groups are specks,
    as small as the detections `anodfd predict` drops: neither to be found nor a cause of false alarms.

    Returns the label of every mask pixel (0 off the mask) and the labels that are defects.
    """
    mask = mask.astype(np.uint8)
    grown = cv2.dilate(mask, np.ones((gap + 1, gap + 1), np.uint8)) if gap else mask
    n, labels = cv2.connectedComponents(grown, connectivity=8)
    labels = labels * mask
    area = np.bincount(labels[mask > 0], minlength=n)  # over mask pixels only: 10x faster on a sparse 3 MP mask
    return labels, [i for i in range(1, n) if area[i] >= min_area]


class DefectCounts:
    """Defect-level counts over pairs: each `defect_regions` group of a mask is a defect, each `detections` region
    of a thresholded map is a detection. A defect is found when some detection overlaps it by a pixel; a detection
    overlapping no defect and no speck is a false alarm (one overlapping only specks is not counted at all).
    Integer counts, so ranks add up with `state()`.
    """

    FIELDS = ("defects", "found", "detections", "false_alarms", "pairs", "pairs_with_defects", "pairs_all_found")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.FIELDS, 0)

    def update(self, binary: np.ndarray, mask: np.ndarray, min_area: int = MIN_REGION_AREA,
               regions: tuple[np.ndarray, list[int]] | None = None) -> None:
        """Add one pair: its thresholded map and its mask, {0,1} arrays of the same HxW. ``regions``, the mask's
        `defect_regions` with some groups left out of its defects, makes those groups count as specks do."""
        if binary.shape != mask.shape:
            raise ValueError(f"map {binary.shape} and mask {mask.shape} differ in size; resize the map first")
        det_labels, _, kept = detections(binary, min_area)
        detected = np.isin(det_labels, kept)
        truth, defects = regions if regions is not None else defect_regions(mask, min_area)
        on_defect = np.isin(truth, defects)
        on_speck = (truth > 0) & ~on_defect
        found = np.unique(truth[detected & on_defect]).size
        hits = set(np.unique(det_labels[detected & on_defect]).tolist())
        specks_only = set(np.unique(det_labels[detected & on_speck]).tolist()) - hits
        counted = [k for k in kept if k not in specks_only]
        c = self.counts
        c["defects"] += len(defects)
        c["found"] += found
        c["detections"] += len(counted)
        c["false_alarms"] += sum(1 for k in counted if k not in hits)
        c["pairs"] += 1
        if defects:
            c["pairs_with_defects"] += 1
            c["pairs_all_found"] += int(found == len(defects))

    def merge(self, other: DefectCounts) -> DefectCounts:
        for k in self.FIELDS:
            self.counts[k] += other.counts[k]
        return self

    def state(self) -> Tensor:
        return torch.tensor([self.counts[k] for k in self.FIELDS], dtype=torch.int64)

    @classmethod
    def from_state(cls, state: Tensor) -> DefectCounts:
        counts = cls()
        counts.counts = dict(zip(cls.FIELDS, (int(v) for v in state.tolist())))
        return counts

    def compute(self) -> dict[str, float]:
        """defect_precision, defect_recall, defect_f, false_alarms_per_image, all_found (share of pairs with
        defects whose every defect was found). Empty denominators follow the pixel convention: nothing to find
        and nothing flagged is 1.0."""
        c = self.counts
        true_detections = c["detections"] - c["false_alarms"]
        if c["defects"] == 0 and c["detections"] == 0:
            precision = recall = 1.0
        else:
            precision, recall = _ratio(true_detections, c["detections"]), _ratio(c["found"], c["defects"])
        f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "defect_precision": precision, "defect_recall": recall, "defect_f": f,
            "false_alarms_per_image": _ratio(c["false_alarms"], c["pairs"]),
            "all_found": _ratio(c["pairs_all_found"], c["pairs_with_defects"]) if c["pairs_with_defects"] else 1.0,
        }


DEFECT_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))  # thresholds `--calibrate defect` tries


class DefectGrid:
    """`DefectCounts` of the same maps cut at each threshold of `DEFECT_GRID`: the threshold with the best defect F,
    which `--calibrate defect` serves. Ranks add up with `state()`."""

    def __init__(self) -> None:
        self.counts = {t: DefectCounts() for t in DEFECT_GRID}

    def update(self, probs: np.ndarray, mask: np.ndarray) -> None:
        regions = defect_regions(mask)  # the mask's defects once, not once per threshold
        for t, counts in self.counts.items():
            counts.update((probs >= t).astype(np.uint8), mask, regions=regions)

    def state(self) -> Tensor:
        return torch.stack([c.state() for c in self.counts.values()])

    @classmethod
    def from_state(cls, state: Tensor) -> DefectGrid:
        grid = cls()
        grid.counts = {t: DefectCounts.from_state(row) for t, row in zip(DEFECT_GRID, state)}
        return grid

    def best(self) -> tuple[float, float]:
        """(threshold, defect F) with the best defect F; ties go to the higher threshold, which flags less."""
        f = {t: c.compute()["defect_f"] for t, c in self.counts.items()}
        t = max(f, key=lambda t: (round(f[t], 9), t))
        return t, f[t]


def format_row(metrics: dict) -> str:
    """The paper's row for logs: "Pre 0.812 | Re 0.790 | OA 0.991 | F1 0.801 | IoU 0.668 | AUC ..."."""
    names = [
        ("Pre", "precision"),
        ("Re", "recall"),
        ("OA", "oa"),
        ("F1", "f1"),
        ("IoU", "iou"),
        ("AUC", "auc"),
        ("EER", "eer"),
    ]
    return " | ".join(f"{short} {metrics[key]:.3f}" for short, key in names if key in metrics)


# --- defect level against boxes ------------------------------------------------------------------------------

BOX_CLASSES = 16  # class ids 0..15 are counted per class (DeepPCB uses 1..6); a box without a class counts as 0
STRICT_IOU = 0.33  # DeepPCB's own rule: a detection's bounding box matches a box one to one above this IoU


class BoxCounts:
    """Defect-level counts against a dataset's own boxes (``x1 y1 x2 y2 class``, inclusive pixels), beside the
    mask-level `DefectCounts`, under two rules:

    - overlap: a box is found when a `detections` region has a pixel inside it; a region with no pixel in any box
      is a false alarm;
    - strict (DeepPCB's evaluation): each region's bounding box matches at most one box and each box at most one
      region, greedily by IoU, when the IoU exceeds `STRICT_IOU`; unmatched regions are false positives.

    Integer counts, so ranks add up with `state()` as the other metrics do.
    """

    FIELDS = ("boxes", "found", "detections", "false_alarms", "strict_matches", "pairs")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.FIELDS, 0)
        self.class_boxes = np.zeros(BOX_CLASSES, np.int64)
        self.class_found = np.zeros(BOX_CLASSES, np.int64)

    def update(self, binary: np.ndarray, boxes: np.ndarray, min_area: int = MIN_REGION_AREA) -> None:
        """Add one pair: its thresholded {0,1} map at native size and its boxes, an (N, 5) int array."""
        boxes = np.asarray(boxes, np.int64).reshape(-1, 5)
        labels, stats, kept = detections(binary, min_area)
        h, w = binary.shape
        kept_set = set(kept)
        hit: set[int] = set()
        c = self.counts
        for x1, y1, x2, y2, cls in boxes:
            inside = labels[max(y1, 0):min(y2, h - 1) + 1, max(x1, 0):min(x2, w - 1) + 1]
            regions = kept_set.intersection(np.unique(inside).tolist())
            hit |= regions
            k = int(cls) if 0 <= cls < BOX_CLASSES else 0
            self.class_boxes[k] += 1
            self.class_found[k] += bool(regions)
            c["found"] += bool(regions)
        c["boxes"] += len(boxes)
        c["detections"] += len(kept)
        c["false_alarms"] += len(kept_set - hit)
        c["strict_matches"] += _strict_matches(stats[kept], boxes)
        c["pairs"] += 1

    def merge(self, other: BoxCounts) -> BoxCounts:
        return BoxCounts.from_state(self.state() + other.state())

    def state(self) -> Tensor:
        counts = torch.tensor([self.counts[k] for k in self.FIELDS], dtype=torch.int64)
        return torch.cat([counts, torch.from_numpy(self.class_boxes), torch.from_numpy(self.class_found)])

    @classmethod
    def from_state(cls, state: Tensor) -> BoxCounts:
        out, values = cls(), [int(v) for v in state.tolist()]
        n = len(cls.FIELDS)
        out.counts = dict(zip(cls.FIELDS, values[:n]))
        out.class_boxes = np.array(values[n:n + BOX_CLASSES], np.int64)
        out.class_found = np.array(values[n + BOX_CLASSES:], np.int64)
        return out

    def compute(self) -> dict[str, float]:
        """box_f, box_recall, box_precision, box_false_alarms_per_image (overlap rule); strict_f, strict_recall,
        strict_precision (DeepPCB's rule); box_recall_class_K for each class K that has boxes. Nothing to find and
        nothing flagged is 1.0, as for the pixel and mask-level metrics."""
        c = self.counts

        def prf(tp_precision: int, tp_recall: int) -> tuple[float, float, float]:
            if c["boxes"] == 0 and c["detections"] == 0:
                return 1.0, 1.0, 1.0
            p, r = _ratio(tp_precision, c["detections"]), _ratio(tp_recall, c["boxes"])
            return p, r, (2 * p * r / (p + r) if p + r else 0.0)

        p, r, f = prf(c["detections"] - c["false_alarms"], c["found"])
        sp, sr, sf = prf(c["strict_matches"], c["strict_matches"])
        out = {"box_precision": p, "box_recall": r, "box_f": f,
               "box_false_alarms_per_image": _ratio(c["false_alarms"], c["pairs"]),
               "strict_precision": sp, "strict_recall": sr, "strict_f": sf}
        for k in np.flatnonzero(self.class_boxes):
            out[f"box_recall_class_{k}"] = _ratio(int(self.class_found[k]), int(self.class_boxes[k]))
        return out


def _strict_matches(stats: np.ndarray, boxes: np.ndarray) -> int:
    """One-to-one matches between regions (OpenCV stats rows: x, y, width, height, area) and boxes (x1 y1 x2 y2,
    inclusive) whose IoU exceeds `STRICT_IOU`, taken greedily from the highest IoU."""
    if not len(stats) or not len(boxes):
        return 0
    d = np.stack([stats[:, 0], stats[:, 1], stats[:, 0] + stats[:, 2] - 1, stats[:, 1] + stats[:, 3] - 1], 1)
    b = boxes[:, :4]
    ix = np.clip(np.minimum(d[:, None, 2], b[None, :, 2]) - np.maximum(d[:, None, 0], b[None, :, 0]) + 1, 0, None)
    iy = np.clip(np.minimum(d[:, None, 3], b[None, :, 3]) - np.maximum(d[:, None, 1], b[None, :, 1]) + 1, 0, None)
    inter = ix * iy

    def area(r: np.ndarray) -> np.ndarray:
        return (r[:, 2] - r[:, 0] + 1) * (r[:, 3] - r[:, 1] + 1)

    iou = inter / (area(d)[:, None] + area(b)[None, :] - inter)
    matches = 0
    while iou.size and iou.max() > STRICT_IOU:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        iou[i, :], iou[:, j] = 0, 0
        matches += 1
    return matches
