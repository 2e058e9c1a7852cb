"""Anomaly maps for pairs of any resolution: full-size map PNG, overlay, and JSON with a score and boxes."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from anodfd.config import Config, ConfigError, DataConfig
from anodfd.data.align import Registration
from anodfd.data.cache import read_rgb
from anodfd.data.check import check_image
from anodfd.data.layouts import IMAGE_EXTS, DatasetError
from anodfd.inference import pair_map
from anodfd.metrics import MIN_REGION_AREA, detections


@dataclass
class Prediction:
    name: str
    score: float  # the pair's anomaly score (see metrics.image_scores)
    boxes: list[dict]  # regions above the threshold, in current-image pixels
    map_path: Path
    overlay_path: Path
    json_path: Path


def find_pairs(hist: str, cur: str | None = None, list_file: str | None = None) -> list[tuple[str, Path, Path]]:
    """(name, history, current) from two files, two folders (matched by file name), or a split list."""
    if list_file:
        root = Path(list_file).resolve().parent
        pairs = []
        if not Path(list_file).is_file():
            raise DatasetError(f"--list {list_file}: {'a folder' if Path(list_file).is_dir() else 'no such file'}; "
                               "pass a list file of 'cur,hist[,gt]' lines")
        try:
            text = Path(list_file).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise DatasetError(f"--list {list_file}: not UTF-8 text (byte {e.start}); pass a list file of "
                               "'cur,hist[,gt]' lines") from None
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                fields = [f.strip().replace("\\", "/") for f in line.split(",")]
                if len(fields) < 2:
                    raise DatasetError(f"{list_file} line {n}: expected 'cur,hist[,gt]', got {line.strip()!r}")
                c, h = root / fields[0], root / fields[1]
                pairs.append((c.parent.name if c.stem == "cur" else c.stem, h, c))
    else:
        h, c = Path(hist), Path(cur)
        if h.is_dir() and c.is_dir():
            names = sorted(p.name for p in c.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            pairs = [(Path(n).stem, h / n, c / n) for n in names]
        else:
            pairs = [(c.stem, h, c)]
    for _, h, c in pairs:
        for f in (h, c):
            if not f.is_file():
                raise DatasetError(f"{f}: input image not found; pass an existing file or folder")
    if not pairs:
        raise DatasetError(f"no images found in {cur}; pass files or folders of .jpg/.png images")
    return pairs


def check_pairs(pairs: list[tuple[str, Path, Path]], done: set[str] = frozenset()) -> None:
    """Every image whole and decodable, every pair with outputs of its own: checked before the first output is
    written, so a bad input never leaves a run half done (`predict`, and `score` before Ray starts). The images of
    pairs in ``done`` (scored by an earlier run of `score`) are not read again."""
    seen: dict[str, Path] = {}
    for name, hist, cur in pairs:
        if name in seen:
            raise DatasetError(f"{seen[name]} and {cur} would both write {name}.json, {name}_map.png and "
                               f"{name}_overlay.jpg; rename one, or run them into separate --out folders")
        seen[name] = cur
        if name not in done:
            check_image(hist)
            check_image(cur)


@dataclass
class PairResult:
    """One pair scored: what `predict`, the served model and `anodfd score` all report."""

    probs: np.ndarray  # HxW float32 probabilities at the current image's size
    score: float
    binary: np.ndarray  # HxW uint8, probs >= threshold
    boxes: list[dict]
    registration: Registration

    @property
    def anomalous_fraction(self) -> float:
        return float(self.binary.mean())


def analyse(model, data: DataConfig, hist_rgb: np.ndarray, cur_rgb: np.ndarray, threshold: float,
            device: torch.device | str = "cpu", min_area: int = MIN_REGION_AREA) -> PairResult:
    """A decoded RGB pair -> its map, score, thresholded regions and registration (`anodfd.inference.pair_map`)."""
    full, score, registration = pair_map(model, data, hist_rgb, cur_rgb, device)
    binary = (full >= threshold).astype(np.uint8)
    return PairResult(full, score, binary, regions(binary, full, min_area), registration)


def map_png(probs: np.ndarray) -> bytes:
    """A probability map as an 8-bit greyscale PNG (255 = probability 1): the file `predict` writes."""
    ok, buf = cv2.imencode(".png", np.round(probs * 255).astype(np.uint8))
    assert ok, "OpenCV failed to encode a PNG"
    return buf.tobytes()


def write_outputs(name: str, hist_path: Path, cur_path: Path, cur_rgb: np.ndarray, result: PairResult, out: Path,
                  threshold: float, align: str, relight: bool) -> Prediction:
    """``out``/<name>_map.png, <name>_overlay.jpg and <name>.json for one scored pair."""
    map_path, overlay_path, json_path = out / f"{name}_map.png", out / f"{name}_overlay.jpg", out / f"{name}.json"
    map_path.write_bytes(map_png(result.probs))
    cv2.imwrite(str(overlay_path), overlay(cv2.cvtColor(cur_rgb, cv2.COLOR_RGB2BGR), result.binary, result.boxes))
    reg = result.registration
    tmp = json_path.with_name(f".{json_path.name}.tmp")  # written last and renamed: a JSON means a finished pair
    tmp.write_text(json.dumps({
        "history": str(hist_path), "current": str(cur_path), "score": result.score, "threshold": threshold,
        "anomalous_fraction": result.anomalous_fraction, "boxes": result.boxes,
        "align": {"method": align, "ok": reg.ok, "reason": reg.reason, "history_from_current": reg.matrix.tolist()},
        "relight": relight,
    }, indent=2))
    os.replace(tmp, json_path)
    if not reg.ok:
        print(f"{name}: registration failed ({reg.reason}); scored unregistered", file=sys.stderr)
    return Prediction(name, result.score, result.boxes, map_path, overlay_path, json_path)


def predict_pairs(
    model: nn.Module, config: Config, pairs: list[tuple[str, Path, Path]], out: str | Path,
    threshold: float, device: torch.device | str = "cpu", min_area: int = MIN_REGION_AREA,
) -> list[Prediction]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [predict_pair(model, config.data, name, hist_path, cur_path, read_rgb(hist_path), read_rgb(cur_path), out,
                         threshold, device, min_area) for name, hist_path, cur_path in pairs]


def predict_pair(
    model, data: DataConfig, name: str, hist_path: Path, cur_path: Path, hist_rgb: np.ndarray, cur_rgb: np.ndarray,
    out: Path, threshold: float, device: torch.device | str = "cpu", min_area: int = MIN_REGION_AREA,
) -> Prediction:
    """One decoded pair scored and its files written: `predict`'s loop body, and each `anodfd score` actor's."""
    try:
        result = analyse(model, data, hist_rgb, cur_rgb, threshold, device, min_area)
    except (ConfigError, DatasetError) as e:
        raise DatasetError(f"{hist_path} and {cur_path}: {e}") from None
    return write_outputs(name, hist_path, cur_path, cur_rgb, result, out, threshold, data.align, data.relight)


def regions(binary: np.ndarray, probs: np.ndarray, min_area: int = MIN_REGION_AREA) -> list[dict]:
    """Connected anomalous regions as boxes, largest first; specks under ``min_area`` pixels are dropped."""
    labels, stats, kept = detections(binary, min_area)
    boxes = []
    for i in kept:
        x, y, w, h, area = (int(v) for v in stats[i])
        boxes.append({"x": x, "y": y, "width": w, "height": h, "area": area,
                      "max_prob": float(probs[labels == i].max())})
    return sorted(boxes, key=lambda b: -b["area"])


def overlay(image_bgr: np.ndarray, binary: np.ndarray, boxes: list[dict] | None = None) -> np.ndarray:
    """The image with anomalous pixels tinted red, their outlines drawn, and boxes around regions."""
    out = image_bgr.copy()
    red = np.zeros_like(out)
    red[..., 2] = 255
    sel = binary.astype(bool)
    out[sel] = (0.55 * out[sel] + 0.45 * red[sel]).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(out.shape[:2]) / 400))
    cv2.drawContours(out, contours, -1, (0, 0, 255), thickness)
    for b in boxes or []:
        cv2.rectangle(out, (b["x"], b["y"]), (b["x"] + b["width"], b["y"] + b["height"]), (0, 255, 255), thickness)
    return out


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold {threshold} must lie strictly between 0 and 1")
    return threshold


def overlay_grid(
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], threshold: float = 0.5
) -> np.ndarray:
    """One row per pair: history | current | ground truth outlined | predicted map tinted (RGB uint8 in).

    Logged every epoch on the same validation pairs, so training progress is something to look at.
    """
    out = []
    for hist, cur, mask, probs in rows:
        cur_bgr = cv2.cvtColor(cur, cv2.COLOR_RGB2BGR)
        truth = overlay(cur_bgr, mask.astype(np.uint8))
        heat = cv2.applyColorMap(np.round(probs * 255).astype(np.uint8), cv2.COLORMAP_JET)
        pred = cv2.addWeighted(cur_bgr, 0.5, heat, 0.5, 0)
        contours, _ = cv2.findContours((probs >= threshold).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(pred, contours, -1, (255, 255, 255), 1)
        out.append(np.concatenate([cv2.cvtColor(hist, cv2.COLOR_RGB2BGR), cur_bgr, truth, pred], axis=1))
    return np.concatenate(out, axis=0)
