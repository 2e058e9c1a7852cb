"""Registered differencing as a second opinion on the network's map (``--confirm diff``).

On held-out DeepPCB boards the network finds more defects than registered differencing, but also flags unchanged
structure the training boards never showed (fine diagonal tracks); differencing after registration is sparse in
false alarms but misses faint defects (docs/results/generalization.md). Confirming keeps a region the network
detects only where the registered difference also fires somewhere inside it: the network's recall and pixels,
the differencing's few false alarms.

The rule acts on the probability map, not on one thresholded mask, so a threshold calibrated on confirmed maps is
the one served: `confirmed` returns the map whose cut at *every* threshold t is exactly the 8-connected regions of
``probs >= t`` that hold a pixel of evidence. Validation, calibration, `eval`, `predict`, `score`, the registry
and the pyfunc all confirm through `anodfd.inference` when the checkpoint's config says so.
"""

from __future__ import annotations

import cv2
import numpy as np

DIFF_LEVEL = 0.5  # grey difference, as a share of the range, that counts as evidence (as template differencing)
FLOOR = 0.05  # the lowest threshold the rule is exact at: no served threshold is lower
_KERNEL = np.ones((3, 3), np.uint8)
_CHECK_EVERY = 8  # dilation steps between convergence checks: a check costs as much as a step


def difference_map(history: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Template differencing's score in [0, 1]: grey |current - history| after a 3x3 opening (BGR or RGB in).

    A grey opening then a threshold equals a threshold then a binary opening (flat structuring element): specks
    smaller than 3x3 are never flagged.
    """
    grey = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) if x.ndim == 3 else x for x in (history, current)]
    return cv2.morphologyEx(cv2.absdiff(grey[1], grey[0]), cv2.MORPH_OPEN, _KERNEL).astype(np.float32) / 255.0


def confirmed(probs: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """``probs`` (HxW float32) with each pixel lowered to the highest threshold at which its 8-connected region of
    ``probs >= t`` still holds an ``evidence`` pixel (HxW bool); 0 where no such threshold from `FLOOR` up exists.
    Cut at any t >= `FLOOR`, it keeps exactly the regions of ``probs >= t`` that hold evidence; cut lower, it keeps
    what the cut at `FLOOR` keeps.

    This is greyscale reconstruction by dilation of ``probs`` on the evidence under ``probs``: the marker grows one
    pixel per step, never above ``probs``, until it stops changing (steps: the longest path inside a region). Below
    the floor a map is one region spanning the image, hundreds of steps wide; above it, regions are defect-sized.
    """
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    probs = np.where(probs >= FLOOR, probs, np.float32(0))
    marker = np.where(evidence, probs, np.float32(0))
    while True:
        before = marker
        for _ in range(_CHECK_EVERY):
            marker = np.minimum(cv2.dilate(marker, _KERNEL), probs)
        if np.array_equal(marker, before):
            return marker


def evidence(history: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Where the (registered) pair differs enough to confirm a detection: HxW bool."""
    return difference_map(history, current) > DIFF_LEVEL
