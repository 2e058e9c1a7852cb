"""Copies of a dataset with one kind of file rewritten: `anodfd data shift` (history images moved, to stress-test
viewpoint robustness) and `anodfd data boxmasks` (masks derived from the dataset's boxes on the registered pair).

Shift: each listed history image of the chosen splits is warped by its own random homography: each corner moved by up to
``homography`` of the image side, independently in x and y. With ``photometric``, its brightness, contrast and
noise change too. Current images and masks are untouched (the masks describe the current image), so they and every
other file are hard-linked where the file system allows, else copied. The draw depends only on the seed and the
file's path inside the dataset, so a rerun writes the same bytes. Pixels the warp brings in from outside the frame
are filled by reflection: a real second pass sees more scene there, not a black wedge that would itself look like
a change. Every homography is written to ``shift.json`` (history file -> 3x3 matrix mapping original to shifted).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from anodfd.config import ConfigError
from anodfd.data.align import prepare_history
from anodfd.data.cache import read_bgr, read_rgb
from anodfd.data.layouts import (
    SPLITS,
    DatasetError,
    Pair,
    boxes_path,
    detect_layout,
    list_path,
    load_split,
    read_boxes,
)

MAX_SHIFT = 0.25  # corners moved by a quarter of the side already fold most images over themselves
MANIFEST = "shift.json"


def random_homography(width: int, height: int, shift: float, rng: np.random.Generator) -> np.ndarray:
    """A 3x3 homography that moves each image corner by up to ``shift`` of the width (x) and height (y)."""
    corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    moved = corners + rng.uniform(-shift, shift, (4, 2)).astype(np.float32) * np.float32([width, height])
    return cv2.getPerspectiveTransform(corners, moved).astype(np.float64)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness within ±20 grey levels, contrast x0.85-1.15 around the mean, Gaussian noise of sigma up to 4."""
    x = image.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.85, 1.15) + mean + rng.uniform(-20, 20)
    x += rng.normal(0.0, rng.uniform(0.0, 4.0), x.shape).astype(np.float32)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def shift_image(image: np.ndarray, homography: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.warpPerspective(image, homography, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _rng(seed: int, relative: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(relative.encode())]))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy reads the same
        shutil.copy2(src, dst)


def shift_dataset(
    src: str | Path, out: str | Path, homography: float, photometric_change: bool = False, seed: int = 0,
    splits: tuple[str, ...] = SPLITS, layout: str = "auto", progress: bool = True,
) -> dict[str, list[list[float]]]:
    """Write the shifted copy of ``src`` to ``out`` (which must not exist yet); returns the manifest."""
    if not 0.0 <= homography <= MAX_SHIFT:
        raise ConfigError(f"--homography {homography}: corners move by a fraction of the side in [0, {MAX_SHIFT}]; "
                          "0.02 is a 2% shift")
    src, out = Path(src).resolve(), Path(out).resolve()
    histories = [p.hist for p in _copy(src, out, splits, layout)]
    manifest = {}
    for hist in tqdm(sorted(set(histories)), desc=f"shifting {src.name}", unit="pair", disable=not progress):
        relative = hist.relative_to(src).as_posix()
        image = read_bgr(hist)
        rng = _rng(seed, relative)
        matrix = random_homography(image.shape[1], image.shape[0], homography, rng)
        shifted = shift_image(image, matrix)
        if photometric_change:
            shifted = photometric(shifted, rng)
        _replace(out / relative, shifted)
        manifest[relative] = matrix.tolist()
    (out / MANIFEST).write_text(json.dumps({"homography": homography, "photometric": photometric_change,
                                            "seed": seed, "splits": list(splits), "warps": manifest}, indent=1))
    return manifest


def box_mask_dataset(src: str | Path, out: str | Path, align: str = "ecc", splits: tuple[str, ...] = SPLITS,
                     layout: str = "auto", progress: bool = True) -> dict[str, int]:
    """Write a copy of ``src`` to ``out`` whose masks are derived from the dataset's boxes on the registered pair:
    a pixel is a defect where the history, registered onto the current image by ``align``, and the current image
    differ by more than half the grey range, inside one of the pair's boxes (`read_boxes`). DeepPCB's shipped masks
    apply the same rule without registration, so a track edge a pixel off marks a sliver inside every box it
    crosses. Pairs without a boxes file keep their mask. Returns counts: pairs rewritten, boxes, boxes in which
    nothing differs once registered (their mask stays empty there), and registrations that fell back."""
    src, out = Path(src).resolve(), Path(out).resolve()
    boxed: dict[Pair, np.ndarray] = {}

    def read_every_box(pairs: list[Pair]) -> None:  # a bad line, or no boxes at all, fails before a file is written
        boxed.update({p: b for p in pairs if (b := read_boxes(p)) is not None})
        if not boxed:
            raise DatasetError(f"{src}: no pair has a boxes file ({boxes_path(pairs[0]).relative_to(src)} for the "
                               "first); boxmasks derives masks from boxes: add them, or choose a dataset that has them")

    _copy(src, out, splits, layout, read_every_box)
    counts = {"pairs": 0, "boxes": 0, "empty_boxes": 0, "align_failed": 0}
    for pair, boxes in tqdm(sorted(boxed.items(), key=lambda kv: str(kv[0].mask)),
                            desc=f"masks from boxes of {src.name}", unit="pair", disable=not progress):
        hist, cur = read_rgb(pair.hist), read_rgb(pair.cur)
        if hist.shape != cur.shape:
            hist = cv2.resize(hist, cur.shape[1::-1], interpolation=cv2.INTER_AREA)
        registered, registration = prepare_history(hist, cur, align, relight=False)
        counts["align_failed"] += not registration.ok
        differs = np.abs(cv2.cvtColor(registered, cv2.COLOR_RGB2GRAY).astype(np.int16)
                         - cv2.cvtColor(cur, cv2.COLOR_RGB2GRAY)) > 127
        mask = np.zeros(cur.shape[:2], np.uint8)
        for x1, y1, x2, y2, _ in boxes:
            inside = (slice(max(y1, 0), y2 + 1), slice(max(x1, 0), x2 + 1))
            mask[inside] |= differs[inside]
            counts["empty_boxes"] += not differs[inside].any()
        _replace(out / pair.mask.relative_to(src), mask * 255)
        counts["pairs"] += 1
        counts["boxes"] += len(boxes)
    return counts


def _copy(src: Path, out: Path, splits: tuple[str, ...], layout: str,
          check: Callable[[list[Pair]], None] | None = None) -> list[Pair]:
    """Every file of ``src`` hard-linked (or copied) under ``out``, after every pair of ``splits`` was checked (and
    ``check`` ran on them): the pairs, for the caller to rewrite one kind of their files with `_replace`."""
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"--splits {split!r}: choose from {', '.join(SPLITS)}")
    if out.exists():
        raise ConfigError(f"{out} already exists; pass a new --out folder (nothing is overwritten)")
    if out == src or src in out.parents:
        raise ConfigError(f"--out {out} is inside the dataset {src}; write the copy elsewhere")
    layout = detect_layout(src, layout)
    pairs = []
    for split in splits:
        if split != "val" and not list_path(src, split, layout).is_file():
            continue  # a split this dataset does not have
        pairs += load_split(src, split, layout)  # every file checked before anything is written
    if not pairs:
        have = [s for s in SPLITS if list_path(src, s, layout).is_file()]
        raise DatasetError(f"{src} has no {' or '.join(splits)} list (it lists {', '.join(have) or 'nothing'}); "
                           "choose --splits among those")
    if check is not None:
        check(pairs)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        _link(f, out / f.relative_to(src))
    return pairs


def _replace(target: Path, image: np.ndarray) -> None:
    target.unlink()  # the link `_copy` made: the original must stay as it was
    # A JPEG parameter for a PNG mask makes OpenCV 5 warn once a file.
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if target.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(target), image, params):
        raise DatasetError(f"{target}: could not be written")
