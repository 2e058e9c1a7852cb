"""Procedural stand-ins for the paper's private Diff, FB and OL datasets (high-speed-train undercarriages).

Every pair is drawn from scratch: an undercarriage-like scene (plates, beams, bolts, rivets, pipes, cables,
brackets, grime), anomalies painted on the current image only, and nuisance on both images (illumination,
sensor noise, JPEG, and a small viewpoint change of the history). The mask marks exactly the pixels the
anomalies changed, in current-image coordinates; nuisance never enters it.

The output uses the paper's on-disk layout, so the rest of the project reads it like the real data::

    oil_leak_train_0/{cur.jpg, hist.jpg, cur_gt.png}   ...   train.txt  validation.txt  test.txt

How a pair is made (``_render_pair``):

1. draw the scene on a canvas a little larger than the image: crisp ``albedo`` (colours and edges) times a
   smooth ``shade`` field (plate gradients, grime, fine grain);
2. the current image is the canvas's centre crop; anomalies are painted on it (for Diff, some are drawn on the
   history instead: a component that is there in history and gone now);
3. mask = (pixels an anomaly covers with alpha >= 0.5) and (pixels that visibly differ from the history);
4. the history is the whole canvas seen through a small random homography; each image then gets its own
   illumination change, sensor noise and JPEG compression.

Every pair has its own RNG seeded from (seed, kind, index): results depend neither on worker count nor order.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from anodfd.config import ConfigError

KINDS = ("OL", "FB", "Diff")

JPEG_QUALITY = 92  # fixed, so the same seed gives byte-identical files
NORMAL_FRACTION = 0.2  # pairs without an anomaly (empty mask)
VAL_FRACTION = 0.2  # train+val is cut 8:2, as in the paper
MIN_SIDE = 32  # smaller images cannot hold a recognisable scene
MAX_SIDE = 8192  # about twice the paper's largest side (FB, 4247): far larger pairs take hours and gigabytes each
VISIBLE = 8  # grey levels a pixel must change by (before nuisance) to count as changed
FB_SIZE_RANGE = ((123, 271), (4247, 1282))  # the paper's FB extremes, (width, height)


@dataclass(frozen=True)
class _Spec:
    prefix: str  # pair folders are {prefix}_{train|test}_{i}
    trainval: int
    test: int
    size: tuple[int, int] | None  # (width, height); None = varies per pair (FB)
    viewpoint: float  # history shift, as a fraction of the image side


_SPECS = {
    "OL": _Spec("oil_leak", 1275, 153, (2048, 1536), 0.005),
    "FB": _Spec("foreign_body", 180, 39, None, 0.025),
    "Diff": _Spec("diff", 399, 101, (1920, 1200), 0.025),
}


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """``"512x384"`` -> ``(512, 384)`` (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if m is None:
        raise ValueError(f"size must look like WIDTHxHEIGHT, e.g. 512x384; got {text!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be positive, e.g. 512x384; got {text!r}")
    return w, h


def synthesize(
    kind: str,
    out: str | Path,
    pairs: int | None = None,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
    small: bool = False,
    force: bool = False,
    test_pairs: int | None = None,
) -> Path:
    """Write a synthetic ``kind`` dataset (OL, FB or Diff) to ``out`` in the paper's layout; return ``out``.

    ``pairs`` is the total pair count (None = the paper's), split like the paper: the same test share, then
    train+val cut 8:2; ``test_pairs`` sets the test count instead of the paper's share (a test split of a few pairs
    cannot tell a model that finds 80% of its defects from one that finds half). ``size`` forces one (width,
    height) for every pair (None = the paper's sizes).
    ``workers`` processes draw pairs in parallel (None = all cores, 1 = inline, no processes).
    ``small`` draws every anomaly a few pixels to a few tens of pixels across (`SMALL_AREA`), the defects that
    vanish when a large image is squashed; the paper's sizes start at 0.1% of the image's area.
    ``out`` must be new or empty unless ``force``: a dataset there would be overwritten in part.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if seed < 0:
        raise ConfigError(f"--seed {seed}: must be 0 or more")
    if size is not None:
        w, h = (int(v) for v in size)
        if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
            raise ConfigError(f"--size {w}x{h}: both sides must be {MIN_SIDE} to {MAX_SIDE} pixels")
        size = (w, h)
    root = Path(out)
    if root.is_file() or (root.is_dir() and not force and any(root.iterdir())):
        raise ConfigError(f"--out {root}: already holds {'a file' if root.is_file() else 'files'}; pass a new or "
                          "empty folder, or --force to write over it")
    jobs, splits = _plan(kind, pairs, seed, size, root, small, test_pairs)
    root.mkdir(parents=True, exist_ok=True)
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    workers = min(workers, len(jobs))
    results: dict[int, tuple[str, float]] = {}
    bar = tqdm(total=len(jobs), desc=f"synth {kind}", unit="pair", disable=not progress)
    if workers == 1:
        for job in jobs:
            index, folder, frac = _make_pair(job)
            results[index] = (folder, frac)
            bar.update()
    else:
        chunk = max(1, len(jobs) // (workers * 8))  # small chunks keep the bar moving and the load balanced
        # spawn, not fork: a forked child inherits OpenCV's thread pool mid-state and can deadlock in it
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            for index, folder, frac in pool.imap_unordered(_make_pair, jobs, chunksize=chunk):
                results[index] = (folder, frac)
                bar.update()
    bar.close()

    for name, indices in splits.items():
        lines = [f"{f}\\cur.jpg,{f}\\hist.jpg,{f}\\cur_gt.png" for f in (results[i][0] for i in indices)]
        (root / name).write_text("".join(line + "\n" for line in lines))
    _write_readme(root, kind, seed, size, splits, results, small)
    _write_contact_sheet(root, [(results[i][0], results[i][1]) for i in sorted(results)])
    return root


# ----------------------------------------------------------------------------------------------------------
# Planning: which pair goes where, and its own RNG
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    kind: str
    seed: int
    index: int  # global pair index: seeds the pair's RNG
    folder: str
    size: tuple[int, int] | None  # forced size, or None for the paper's
    root: str
    small: bool = False  # anomalies of `SMALL_AREA` only


def _split_counts(kind: str, pairs: int | None, test_pairs: int | None = None) -> tuple[int, int, int]:
    """(train, validation, test) pair counts."""
    spec = _SPECS[kind]
    if pairs is None:
        trainval, test = spec.trainval, spec.test
    else:
        if pairs < 1:
            raise ConfigError(f"--pairs {pairs}: must be 1 or more")
        test = round(pairs * spec.test / (spec.trainval + spec.test))
        if pairs >= 3:
            test = max(1, test)
        trainval = pairs - test
    if test_pairs is not None:
        total = trainval + test
        if not 1 <= test_pairs <= total - 2:
            raise ConfigError(f"--test-pairs {test_pairs}: must be 1 to {total - 2}, leaving at least one train and "
                              f"one validation pair of the {total}")
        trainval, test = total - test_pairs, test_pairs
    val = round(trainval * VAL_FRACTION)
    if trainval >= 2:
        val = max(1, val)
    return trainval - val, val, test


def _plan(
    kind: str, pairs: int | None, seed: int, size: tuple[int, int] | None, root: Path, small: bool = False,
    test_pairs: int | None = None,
) -> tuple[list[_Job], dict[str, list[int]]]:
    """One job per pair, and the global indices of each split list (train.txt, validation.txt, test.txt)."""
    n_train, n_val, n_test = _split_counts(kind, pairs, test_pairs)
    prefix = _SPECS[kind].prefix
    trainval = n_train + n_val
    jobs = [
        _Job(kind, seed, i, f"{prefix}_train_{i}" if i < trainval else f"{prefix}_test_{i - trainval}", size,
             str(root), small)
        for i in range(trainval + n_test)
    ]
    # validation pairs are a seeded random fifth of the train folders, as a random 8:2 cut would be
    order = np.random.default_rng([seed, _kind_code(kind), 2**31]).permutation(trainval)
    splits = {
        "train.txt": sorted(int(i) for i in order[n_val:]),
        "validation.txt": sorted(int(i) for i in order[:n_val]),
        "test.txt": list(range(trainval, trainval + n_test)),
    }
    return jobs, splits


def _kind_code(kind: str) -> int:
    return zlib.crc32(kind.encode())  # stable across runs and Python versions, unlike hash()


def _pair_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _kind_code(kind), index])


def _fb_size(rng: np.random.Generator) -> tuple[int, int]:
    """A (width, height) within the paper's FB range, with varied aspect (portrait crops to wide strips)."""
    (w_min, h_min), (w_max, h_max) = FB_SIZE_RANGE
    h = math.exp(rng.uniform(math.log(h_min), math.log(h_max)))
    aspect = math.exp(rng.uniform(math.log(w_min / h_min), math.log(w_max / h_max)))
    return int(np.clip(round(h * aspect), w_min, w_max)), round(h)


def _write(path: Path, img: np.ndarray) -> None:
    """Encode by extension (JPEG at the fixed quality) and write; unlike imwrite, fine with any path."""
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix == ".jpg" else []
    ok, buf = cv2.imencode(path.suffix, img, params)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would only contend


def _make_pair(job: _Job) -> tuple[int, str, float]:
    """Draw one pair and write its folder; return (index, folder, anomalous fraction of the mask)."""
    rng = _pair_rng(job.seed, job.kind, job.index)
    size = job.size or _SPECS[job.kind].size or _fb_size(rng)
    cur, hist, mask = _render_pair(job.kind, rng, *size, small=job.small)
    folder = Path(job.root) / job.folder
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "cur.jpg", cur)
    _write(folder / "hist.jpg", hist)
    _write(folder / "cur_gt.png", mask)
    return job.index, job.folder, float(np.count_nonzero(mask)) / mask.size


# ----------------------------------------------------------------------------------------------------------
# One pair
# ----------------------------------------------------------------------------------------------------------


def _render_pair(kind: str, rng: np.random.Generator, w: int, h: int,
                 small: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(current BGR, history BGR, mask 0/255), all h x w; with ``small``, anomalies of `SMALL_AREA` only."""
    spec = _SPECS[kind]
    normal = rng.random() < NORMAL_FRACTION
    m = math.ceil(1.6 * spec.viewpoint * max(w, h)) + 2  # canvas margin the history's view can reach into
    scene = _draw_scene(rng, w + 2 * m, h + 2 * m)
    scene.small = small
    hist_albedo = scene.albedo  # anomalies drawn on the history (Diff's missing parts) go here, at +m
    cur_albedo = scene.albedo[m : m + h, m : m + w].copy()
    cur_shade = scene.shade[m : m + h, m : m + w]
    claim = np.zeros((h, w), bool)  # pixels anomalies cover with alpha >= 0.5 (before the visibility test)
    mask = np.zeros((h, w), np.uint8)

    hist_clean = _apply_shade(hist_albedo, scene.shade)
    cur_clean = hist_clean[m : m + h, m : m + w].copy()
    boxes: list[tuple[int, int, int, int]] = []
    attempts = 0
    # a small anomaly must still leave a detectable defect (16 px, `anodfd.metrics.MIN_REGION_AREA`)
    least = 16 if small else max(4, 2e-4 * w * h)
    while not normal and np.count_nonzero(mask) < least and attempts < 6:
        # Usually one anomaly; sometimes two or three. Retry if they ended up invisible (e.g. grey on grey).
        count = 1 if attempts else 1 + int(rng.random() < 0.25) + int(rng.random() < 0.08)
        for _ in range(count):
            box = _ADD_ANOMALY[kind](rng, cur_albedo, hist_albedo, m, claim, scene)
            if box[2] > box[0] and box[3] > box[1]:
                boxes.append(box)
        attempts += 1
        if not boxes:
            continue
        # re-shade only what anomalies touched; the rest of both images is still the shared scene
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        hx0, hy0, hx1, hy1 = x0 + m, y0 + m, x1 + m, y1 + m
        hist_clean[hy0:hy1, hx0:hx1] = _apply_shade(hist_albedo[hy0:hy1, hx0:hx1], scene.shade[hy0:hy1, hx0:hx1])
        cur_clean[y0:y1, x0:x1] = _apply_shade(cur_albedo[y0:y1, x0:x1], cur_shade[y0:y1, x0:x1])
        diff = cv2.absdiff(cur_clean[y0:y1, x0:x1], hist_clean[hy0:hy1, hx0:hx1]).max(axis=2)
        mask[y0:y1, x0:x1] = np.where(claim[y0:y1, x0:x1] & (diff > VISIBLE), 255, 0)

    hist_view = _view_change(rng, hist_clean, w, h, m, spec.viewpoint)
    return _nuisance(rng, cur_clean), _nuisance(rng, hist_view), mask


# ----------------------------------------------------------------------------------------------------------
# Small drawing helpers
# ----------------------------------------------------------------------------------------------------------

AA = cv2.LINE_AA


def _bgr(v: np.ndarray | tuple | float) -> tuple[float, float, float]:
    """A colour cv2 accepts (plain floats, clipped to 0..255)."""
    a = np.clip(np.broadcast_to(np.asarray(v, np.float64), (3,)), 0, 255)
    return float(a[0]), float(a[1]), float(a[2])


def _metal(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A grey with a slight tint (bluish steel, brownish paint), BGR."""
    tone = rng.uniform(lo, hi)
    return tone * (1 + rng.uniform(-0.07, 0.07, 3))


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int = 3) -> np.ndarray:
    """Smooth noise, roughly in [-1, 1]: random grids (``cells`` across the longer side) upsampled and summed."""
    out = np.zeros((h, w), np.float32)
    total, amp = 0.0, 1.0
    for o in range(octaves):
        n = cells * 2**o
        gw, gh = max(2, round(n * w / max(h, w))), max(2, round(n * h / max(h, w)))
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total, amp = total + amp, amp * 0.5
    return out / total


def _curve(rng: np.random.Generator, p0: np.ndarray, p1: np.ndarray, bend: float, n: int = 40) -> np.ndarray:
    """A smooth cubic Bezier from p0 to p1 whose control points wander ``bend`` pixels off the chord."""
    c1 = p0 + (p1 - p0) / 3 + rng.uniform(-bend, bend, 2)
    c2 = p0 + 2 * (p1 - p0) / 3 + rng.uniform(-bend, bend, 2)
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t**2 * c2 + t**3 * p1
    return np.round(pts).astype(np.int32)


def _edge_point(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A point just outside a random side of a w x h image (curves enter and leave the frame)."""
    side = rng.integers(4)
    t = rng.uniform(0, 1)
    x, y = [(t * w, -20), (t * w, h + 20), (-20, t * h), (w + 20, t * h)][side]
    return np.array([x, y], float)


def _draw_tube(img: np.ndarray, pts: np.ndarray, thickness: float, color: np.ndarray) -> None:
    """A cylinder along a polyline: concentric strokes, darker at the rim, a bright line along the axis."""
    steps = 5
    for k in range(steps):
        f = 1 - k / steps
        shade = 0.45 + 0.75 * k / (steps - 1)
        cv2.polylines(img, [pts], False, _bgr(color * shade), max(1, round(thickness * f)), AA)
    hl = pts - np.int32(round(thickness * 0.15))  # specular line slightly towards the light (top-left)
    cv2.polylines(img, [hl], False, _bgr(np.minimum(color * 1.5 + 40, 255)), max(1, round(thickness * 0.08)), AA)


def _hexagon(cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    a = angle + np.arange(6) * np.pi / 3
    return np.round(np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)).astype(np.int32)


def _draw_bolt(img: np.ndarray, cx: float, cy: float, r: float, angle: float, color: np.ndarray) -> None:
    """Washer, hexagonal head with a lit upper-left half and a dark rim, and a thread end in the middle."""
    c = (round(cx), round(cy))
    cv2.circle(img, c, max(1, round(r * 1.35)), _bgr(color * 0.55), -1, AA)
    cv2.circle(img, c, max(1, round(r * 1.25)), _bgr(color * 0.85), -1, AA)
    hexa = _hexagon(cx, cy, r, angle)
    cv2.fillPoly(img, [hexa], _bgr(color * 0.75), AA)
    # the half of the hexagon facing the light (top-left) is brighter
    lit = np.array([[cx, cy], *[[cx + r * math.cos(t), cy + r * math.sin(t)] for t in np.linspace(
        math.pi * 0.75, math.pi * 1.75, 6)]], np.int32)
    cv2.fillPoly(img, [lit], _bgr(color * 1.1), AA)
    cv2.polylines(img, [hexa], True, _bgr(color * 0.4), max(1, round(r * 0.12)), AA)
    cv2.circle(img, c, max(1, round(r * 0.42)), _bgr(color * 0.6), -1, AA)
    cv2.circle(img, (round(cx - r * 0.35), round(cy - r * 0.35)), max(1, round(r * 0.16)),
               _bgr(np.minimum(color * 1.6 + 30, 255)), -1, AA)


def _draw_rivet(img: np.ndarray, cx: float, cy: float, r: float, color: np.ndarray) -> None:
    cv2.circle(img, (round(cx), round(cy)), max(1, round(r)), _bgr(color * 0.7), -1, AA)
    cv2.circle(img, (round(cx - r * 0.3), round(cy - r * 0.3)), max(1, round(r * 0.45)), _bgr(color * 1.3), -1, AA)


def _draw_bracket(img: np.ndarray, cx: float, cy: float, s: float, angle: float, color: np.ndarray,
                  bolt_color: np.ndarray) -> None:
    """An L-shaped bracket of size ``s`` with a bevel, held by two bolts."""
    t = s * 0.35  # arm width
    shape = np.array([[0, 0], [s, 0], [s, t], [t, t], [t, s], [0, s]], float) - s / 2
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    poly = np.round(shape @ rot.T + [cx, cy]).astype(np.int32)
    cv2.fillPoly(img, [poly], _bgr(color), AA)
    cv2.polylines(img, [poly], True, _bgr(color * 0.45), max(1, round(s * 0.03)), AA)
    cv2.polylines(img, [poly[:2]], False, _bgr(color * 1.35), max(1, round(s * 0.02)), AA)
    for bx, by in ((s * 0.75, t / 2), (t / 2, s * 0.75)):
        p = np.array([bx, by]) - s / 2
        q = rot @ p + [cx, cy]
        _draw_bolt(img, q[0], q[1], t * 0.32, angle, bolt_color)


def _draw_box(img: np.ndarray, cx: float, cy: float, bw: float, bh: float, color: np.ndarray,
              bolt_color: np.ndarray) -> None:
    """A small junction box: bevelled rectangle, a lid seam and four corner bolts."""
    x0, y0, x1, y1 = round(cx - bw / 2), round(cy - bh / 2), round(cx + bw / 2), round(cy + bh / 2)
    e = max(1, round(min(bw, bh) * 0.05))
    cv2.rectangle(img, (x0, y0), (x1, y1), _bgr(color * 0.5), -1, AA)
    cv2.rectangle(img, (x0 + e, y0 + e), (x1 - e, y1 - e), _bgr(color), -1, AA)
    cv2.line(img, (x0 + e, y0 + e), (x1 - e, y0 + e), _bgr(color * 1.35), max(1, e // 2), AA)
    cv2.line(img, (x0 + e, y0 + e), (x0 + e, y1 - e), _bgr(color * 1.2), max(1, e // 2), AA)
    cv2.rectangle(img, (x0 + 3 * e, y0 + 3 * e), (x1 - 3 * e, y1 - 3 * e), _bgr(color * 0.7), max(1, e // 2), AA)
    br = min(bw, bh) * 0.07
    for bx, by in ((x0 + 2 * br, y0 + 2 * br), (x1 - 2 * br, y0 + 2 * br), (x0 + 2 * br, y1 - 2 * br),
                   (x1 - 2 * br, y1 - 2 * br)):
        _draw_bolt(img, bx, by, br, 0.3, bolt_color)


# ----------------------------------------------------------------------------------------------------------
# The scene
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Scene:
    albedo: np.ndarray  # H x W x 3 uint8: colours with crisp edges
    shade: np.ndarray  # H x W x 3 uint8, 128 = 1.0: smooth lighting, grime and grain, multiplied on the albedo
    anchors: list[tuple[float, float]] = field(default_factory=list)  # joints where oil could leak from
    bolt_r: float = 4.0  # typical bolt radius, so a missing bolt looks like the others
    bolt_color: np.ndarray = field(default_factory=lambda: np.full(3, 120.0))
    metal: tuple[float, float] = (70.0, 170.0)  # tone range of this scene's parts
    small: bool = False  # anomalies of `SMALL_AREA` only


def _draw_scene(rng: np.random.Generator, W: int, H: int) -> _Scene:
    """An undercarriage-like W x H scene: panels, beams, boxes, brackets, pipes, cables, bolts, rivets, grime."""
    u = min(W, H)
    # low-frequency content (plate gradients, grime) is computed on a grid `ds` times coarser, then upsampled
    ds = max(1, min(8, u // 24))
    lw, lh = max(2, math.ceil(W / ds)), max(2, math.ceil(H / ds))
    low = np.ones((lh, lw), np.float32)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32) * ds

    img = np.empty((H, W, 3), np.uint8)
    img[:] = _bgr(_metal(rng, 25, 55))
    sc = _Scene(img, low, bolt_r=u * rng.uniform(0.012, 0.022), bolt_color=_metal(rng, 110, 170))
    lo = rng.uniform(55, 90)
    sc.metal = (lo, lo + rng.uniform(50, 100))
    rects: list[tuple[float, float, float, float]] = []  # plates, for bolt rows along their edges

    def shade_poly(poly: np.ndarray, gx: float, gy: float, cx: float, cy: float, span: float) -> None:
        """A linear light gradient inside one part: light glancing over a flat plate."""
        m = np.zeros((lh, lw), np.uint8)
        cv2.fillPoly(m, [np.round(poly / ds).astype(np.int32)], 1)
        g = 1 + (gx * (xx - cx) + gy * (yy - cy)) / span
        low[m > 0] = g[m > 0]

    # 1. panels on a jittered grid; some cells stay empty (dark voids between parts)
    cols = max(1, round(W / u * rng.uniform(1.0, 2.5)))
    rows = max(1, round(H / u * rng.uniform(1.0, 2.5)))
    xs = np.sort(np.concatenate([[0, W], rng.uniform(0.1, 0.9, cols - 1) * W]))
    ys = np.sort(np.concatenate([[0, H], rng.uniform(0.1, 0.9, rows - 1) * H]))
    gap = u * rng.uniform(0.006, 0.02)
    for i in range(rows):
        for j in range(cols):
            if rng.random() < 0.15:
                continue
            x0, x1, y0, y1 = xs[j] + gap, xs[j + 1] - gap, ys[i] + gap, ys[i + 1] - gap
            if x1 - x0 < 4 * gap or y1 - y0 < 4 * gap:
                continue
            c = _metal(rng, *sc.metal)
            cut = min(x1 - x0, y1 - y0) * rng.uniform(0, 0.15)  # chamfered corners
            poly = np.round([[x0 + cut, y0], [x1 - cut, y0], [x1, y0 + cut], [x1, y1 - cut], [x1 - cut, y1],
                             [x0 + cut, y1], [x0, y1 - cut], [x0, y0 + cut]]).astype(np.int32)
            cv2.fillPoly(img, [poly], _bgr(c), AA)
            e = max(1, round(gap * 0.5))
            cv2.polylines(img, [poly], True, _bgr(c * 0.55), e, AA)
            cv2.polylines(img, [poly[[7, 0, 1]]], False, _bgr(c * 1.3), max(1, e // 2), AA)  # lit top-left bevel
            shade_poly(poly, *rng.uniform(-0.35, 0.35, 2), (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0))
            rects.append((x0, y0, x1, y1))
            if rng.random() < 0.4:  # stiffening ribs across the plate
                n = rng.integers(1, 4)
                vertical = rng.random() < 0.5
                for k in range(n):
                    f = (k + 1) / (n + 1)
                    a = (x0 + f * (x1 - x0), y0 + e * 3) if vertical else (x0 + e * 3, y0 + f * (y1 - y0))
                    b = (a[0], y1 - e * 3) if vertical else (x1 - e * 3, a[1])
                    rw = max(2, round(u * 0.012))
                    cv2.line(img, _ipt(a), _ipt(b), _bgr(c * 0.6), rw, AA)
                    off = (rw // 3, 0) if vertical else (0, rw // 3)
                    cv2.line(img, _ipt(np.subtract(a, off)), _ipt(np.subtract(b, off)), _bgr(c * 1.25),
                             max(1, rw // 3), AA)

    # 2. holes and dark openings
    for _ in range(rng.integers(0, 4)):
        c = (float(rng.uniform(0, W)), float(rng.uniform(0, H)))
        ax = (max(2, round(u * rng.uniform(0.02, 0.07))), max(2, round(u * rng.uniform(0.02, 0.07))))
        cv2.ellipse(img, _ipt(c), ax, 0, 0, 360, _bgr(_metal(rng, 10, 30)), -1, AA)
        cv2.ellipse(img, _ipt(c), ax, 0, 200, 340, _bgr(_metal(rng, 100, 140)), max(1, ax[0] // 8), AA)

    # 3. beams across the whole frame, lit like rounded bars, with bolt rows
    for _ in range(rng.integers(0, 3)):
        t = u * rng.uniform(0.05, 0.12)
        c = _metal(rng, *sc.metal)
        if rng.random() < 0.6:
            y = rng.uniform(0.1, 0.9) * H
            poly = np.round([[-5, y - t / 2], [W + 5, y - t / 2], [W + 5, y + t / 2], [-5, y + t / 2]])
            shade_poly(poly.astype(np.int32), 0, rng.uniform(-0.5, 0.5), W / 2, y, t)
            line = ((0.0, y), (float(W), y))
        else:
            x = rng.uniform(0.1, 0.9) * W
            poly = np.round([[x - t / 2, -5], [x + t / 2, -5], [x + t / 2, H + 5], [x - t / 2, H + 5]])
            shade_poly(poly.astype(np.int32), rng.uniform(-0.5, 0.5), 0, x, H / 2, t)
            line = ((x, 0.0), (x, float(H)))
        poly = poly.astype(np.int32)
        cv2.fillPoly(img, [poly], _bgr(c), AA)
        cv2.polylines(img, [poly], True, _bgr(c * 0.45), max(1, round(t * 0.06)), AA)
        step = sc.bolt_r * rng.uniform(5, 9)
        length = math.dist(*line)
        for k in range(int(length / step)):
            p = np.add(line[0], np.subtract(line[1], line[0]) * (k + 0.5) * step / length)
            _draw_bolt(img, p[0], p[1], sc.bolt_r, rng.uniform(0, np.pi), sc.bolt_color)

    # 4. bolt and rivet rows along plate edges
    for x0, y0, x1, y1 in rects:
        if rng.random() < 0.55:
            r = sc.bolt_r * rng.uniform(0.8, 1.2)
            inset = r * 2.2
            if rng.random() < 0.5:  # top and bottom edges
                n = max(2, int((x1 - x0) / (r * rng.uniform(5, 10))))
                for yb in (y0 + inset, y1 - inset):
                    for bx in np.linspace(x0 + inset, x1 - inset, n):
                        _draw_bolt(img, bx, yb, r, rng.uniform(0, np.pi), sc.bolt_color)
                        sc.anchors.append((bx, yb))
            else:
                n = max(2, int((y1 - y0) / (r * rng.uniform(5, 10))))
                for xb in (x0 + inset, x1 - inset):
                    for by in np.linspace(y0 + inset, y1 - inset, n):
                        _draw_bolt(img, xb, by, r, rng.uniform(0, np.pi), sc.bolt_color)
                        sc.anchors.append((xb, by))
        if rng.random() < 0.35:
            rr = sc.bolt_r * 0.45
            n = max(2, int((x1 - x0) / (rr * 5)))
            yr = y0 + rr * 2.5 if rng.random() < 0.5 else y1 - rr * 2.5
            rc = _metal(rng, *sc.metal)
            for rx in np.linspace(x0 + rr * 3, x1 - rr * 3, n):
                _draw_rivet(img, rx, yr, rr, rc)

    # 5. junction boxes and flanges
    for _ in range(rng.integers(0, 3)):
        bw, bh = u * rng.uniform(0.12, 0.3), u * rng.uniform(0.1, 0.25)
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        _draw_box(img, cx, cy, bw, bh, _metal(rng, *sc.metal), sc.bolt_color)
        sc.anchors.append((cx, cy + bh / 2))
    for _ in range(rng.integers(0, 3)):
        r = u * rng.uniform(0.05, 0.1)
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        c = _metal(rng, *sc.metal)
        cv2.circle(img, _ipt((cx, cy)), round(r * 1.3), _bgr(c * 0.5), -1, AA)
        cv2.circle(img, _ipt((cx, cy)), round(r * 1.2), _bgr(c), -1, AA)
        cv2.circle(img, _ipt((cx, cy)), round(r * 0.7), _bgr(c * 0.75), max(1, round(r * 0.08)), AA)
        cv2.circle(img, _ipt((cx, cy)), round(r * 0.4), _bgr(c * 1.2), -1, AA)
        for k in range(8):
            a = k * np.pi / 4
            _draw_bolt(img, cx + r * 0.95 * math.cos(a), cy + r * 0.95 * math.sin(a), r * 0.13, a, sc.bolt_color)
        sc.anchors.append((cx, cy + r))

    # 6. brackets
    for _ in range(rng.integers(2, 7)):
        s = u * rng.uniform(0.06, 0.14)
        _draw_bracket(img, rng.uniform(0, W), rng.uniform(0, H), s, rng.uniform(0, 2 * np.pi),
                      _metal(rng, *sc.metal), sc.bolt_color)

    # 7. pipes (thick, with clamps) and cables (thin, sometimes coloured)
    for _ in range(rng.integers(0, 4)):
        t = u * rng.uniform(0.025, 0.06)
        pts = _curve(rng, _edge_point(rng, W, H), _edge_point(rng, W, H), u * 0.25)
        c = _metal(rng, *sc.metal)
        _draw_tube(img, pts, t, c)
        for k in range(rng.integers(1, 4)):
            i = rng.integers(3, len(pts) - 3)
            d = pts[i + 2] - pts[i - 2]
            nrm = np.array([-d[1], d[0]], float) / (np.hypot(*d) + 1e-6)
            a, b = pts[i] + nrm * t * 0.9, pts[i] - nrm * t * 0.9
            cv2.line(img, _ipt(a), _ipt(b), _bgr(c * 0.5), max(2, round(t * 0.5)), AA)
            cv2.line(img, _ipt(a), _ipt(b), _bgr(c * 1.1), max(1, round(t * 0.3)), AA)
            sc.anchors.append((float(pts[i][0]), float(pts[i][1])))
    palette = [(25, 25, 28), (40, 40, 45), (30, 90, 200), (40, 170, 210), (150, 90, 40), (60, 60, 170)]
    for _ in range(rng.integers(1, 5)):
        t = u * rng.uniform(0.008, 0.02)
        pts = _curve(rng, _edge_point(rng, W, H), _edge_point(rng, W, H), u * 0.4)
        c = np.array(palette[rng.integers(len(palette))], float) * rng.uniform(0.8, 1.1)
        for k in range(rng.integers(1, 4)):  # cables often run in bundles
            _draw_tube(img, pts + np.int32(round(k * t * 1.1)), t, c)

    # 8. the smooth part of the shading: overall light falloff, grime (darker, browner), run-off streaks
    light = 1 + rng.uniform(-0.25, 0.25) * (yy / H - 0.5) + rng.uniform(-0.15, 0.15) * (xx / W - 0.5)
    grime = np.clip(_value_noise(rng, lh, lw, rng.uniform(3, 8), 4) * 1.6 - rng.uniform(-0.2, 0.5), 0, 1)
    # noise that varies fast across x and slowly down y: vertical streaks where water ran off
    streaks = cv2.resize(rng.standard_normal((2, max(2, lw // 3))).astype(np.float32), (lw, lh),
                         interpolation=cv2.INTER_CUBIC)
    streaks = np.clip(streaks, 0, None) * rng.uniform(0, 0.25)
    dirt = np.clip(grime * rng.uniform(0.3, 0.6) + streaks, 0, 0.8)
    base = low * light
    tint = np.array([0.75, 0.6, 0.45], np.float32)  # grime takes more blue than red: a brownish cast
    shade_low = np.stack([base * (1 - dirt * tint[k]) for k in range(3)], axis=2)
    shade = cv2.resize(_fixed(shade_low), (W, H), interpolation=cv2.INTER_LINEAR)

    # 9. fine grain at half resolution, sometimes brushed (stretched along x)
    amount = 128 * rng.uniform(0.03, 0.07)
    brushed = rng.random() < 0.5
    grain = _noise_u8(rng, (max(2, H // 2), max(2, W // 2)), amount * (2.2 if brushed else 1))
    if brushed:
        grain = cv2.blur(grain, (5, 1))
    grain = cv2.resize(grain, (W, H), interpolation=cv2.INTER_LINEAR)
    sc.shade = cv2.multiply(shade, cv2.merge([grain] * 3), scale=1 / 128)
    return sc


def _ipt(p) -> tuple[int, int]:
    return round(float(p[0])), round(float(p[1]))


def _fixed(gain: np.ndarray) -> np.ndarray:
    """A gain field as uint8 with 128 = 1.0: OpenCV multiplies such fields in one fast integer pass."""
    return np.clip(gain * 128 + 0.5, 0, 255).astype(np.uint8)


def _apply_shade(albedo: np.ndarray, shade: np.ndarray) -> np.ndarray:
    return cv2.multiply(albedo, shade, scale=1 / 128)


def _noise_u8(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, mean: float = 128.0) -> np.ndarray:
    """Noise of std ``sigma`` around ``mean``, as uint8: the sum of two uniform random bytes (a triangular,
    nearly Gaussian law), many times cheaper to draw than normal floats at 2048x1536."""
    n = int(np.prod(shape))
    raw = rng.bit_generator.random_raw((2 * n + 7) // 8).view(np.uint8)  # raw 64-bit draws, 8 bytes each
    a, b = raw[:n].reshape(shape), raw[n : 2 * n].reshape(shape)
    k = sigma / 104.5  # std of the sum of two uniform bytes: sqrt(2 * (256**2 - 1) / 12)
    return cv2.addWeighted(a, k, b, k, mean - 255 * k)


# ----------------------------------------------------------------------------------------------------------
# Anomalies: patches with a colour, a coverage (the shape) and an opacity, pasted on the current albedo
# ----------------------------------------------------------------------------------------------------------


_Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in current-image pixels


@dataclass
class _Patch:
    color: np.ndarray  # h x w x 3 float32
    cover: np.ndarray  # h x w float32 in [0, 1]: the anomaly's shape, soft at the edges
    opacity: np.ndarray | float  # translucency (bags, oil); the mask ignores it, the visibility test doesn't


SMALL_AREA = (1e-5, 3e-4)  # share of the image: at 2048x1536, discs of about 6 to 35 px across (drips run longer)


def _target_radius(rng: np.random.Generator, w: int, h: int, small: bool = False) -> float:
    """Radius of a disc with a typical anomaly's area: 0.5-5% of the image, sometimes much less; with ``small``,
    `SMALL_AREA` (log-uniform, so about two in three are under 1% of a 2048 px side across)."""
    lo, hi = SMALL_AREA if small else (0.005, 0.05)
    frac = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if not small and rng.random() < 0.2:
        frac = math.exp(rng.uniform(math.log(0.001), math.log(0.005)))
    return max(2.5, math.sqrt(frac * w * h / math.pi))


def _blob_side(r: float, elong: float = 1.0) -> int:
    """Side of a box that holds a `_blob_field` blob of radius r with room for its soft rim."""
    return round(r * (1.6 + 2.0 * elong)) + 4


def _blob_field(rng: np.random.Generator, ph: int, pw: int, cx: float, cy: float, r: float, lobes: int,
                rough: float, elong: float = 1.0) -> np.ndarray:
    """A smooth field whose 0.5 level set is an irregular blob of radius ~r (union of ellipses + noise)."""
    s = max(1.0, r / 16)  # drawn coarse and upsampled: blurring at full size would be slow for big blobs
    qw, qh = max(2, round(pw / s)), max(2, round(ph / s))
    f = np.zeros((qh, qw), np.float32)
    for _ in range(lobes):
        a = rng.uniform(0.5, 0.9) * r / s
        b = a * rng.uniform(0.5, 1.0)
        dx, dy = np.clip(rng.normal(0, 0.3 * r / s, 2), -0.5 * r / s, 0.5 * r / s)
        cv2.ellipse(f, _ipt((cx / s + dx, cy / s + dy)), (max(1, round(a * elong)), max(1, round(b))),
                    float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    f = cv2.GaussianBlur(f, (0, 0), max(0.8, 0.15 * r / s))
    # the noise roughens the outline only near the blob, so it cannot raise specks far away from it
    f += rough * _value_noise(rng, qh, qw, max(2.0, max(qw, qh) / 6), 2) * np.clip(f * 4, 0, 1)
    return cv2.resize(f, (pw, ph), interpolation=cv2.INTER_LINEAR)


def _cover(field: np.ndarray, soft: float) -> np.ndarray:
    """Field -> coverage in [0, 1], with a soft edge of width ``soft`` around the 0.5 level."""
    return np.clip((field - 0.5) / soft + 0.5, 0, 1)


def _lit(field: np.ndarray, r: float) -> np.ndarray:
    """How much a bump shaped like ``field`` faces a top-left light: its gradient along (-1, -1)."""
    g = cv2.GaussianBlur(field, (0, 0), max(1.0, r * 0.04))
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    return -(gx + gy) / 8 * r * 0.25  # a Sobel kernel weighs a unit slope 8


def _oil_patch(rng: np.random.Generator, r: float) -> _Patch:
    """A dark, glossy, translucent oil stain with drips running downwards and a specular sheen."""
    drips = int(rng.integers(1, 5)) if rng.random() < 0.6 else 0
    run = r * rng.uniform(1.0, 3.0) if drips else 0.0
    elong = rng.uniform(1, 1.6)
    pw = _blob_side(r, elong)
    ph = pw + round(run)
    top = pw / 2  # the stain's centre, measured from the patch top; drips hang below it
    field = _blob_field(rng, ph, pw, pw / 2, top, r, int(rng.integers(2, 6)), 0.25, elong)
    if drips:
        d = np.zeros((ph, pw), np.float32)
        for _ in range(drips):
            x = pw / 2 + rng.uniform(-0.6, 0.6) * r
            y, end = top, top + r * 0.5 + run * rng.uniform(0.3, 1.0)
            wid = r * rng.uniform(0.05, 0.12)
            pts = [(x, y)]
            while y < end:  # a wavy run that thins as it goes, with a drop at the end
                y += max(2.0, r * 0.1)
                x += rng.normal(0, r * 0.015)
                pts.append((x, y))
            for k in range(len(pts) - 1):
                t = 1 - 0.5 * k / len(pts)
                cv2.line(d, _ipt(pts[k]), _ipt(pts[k + 1]), 1.0, max(1, round(wid * t)))
            cv2.circle(d, _ipt(pts[-1]), max(1, round(wid * rng.uniform(0.6, 1.0))), 1.0, -1)
        field = np.maximum(field, cv2.GaussianBlur(d, (0, 0), max(0.7, r * 0.02)))
    cover = _cover(field, 0.2)
    dark = rng.uniform(10, 30) * np.array([1.0, 1.05, 1.15]) * rng.uniform(0.9, 1.1, 3)
    # gloss: a highlight where the film's rim faces the light, and a few soft reflections on the film
    sheen = np.clip(_lit(field, r) - 0.2, 0, 1) * rng.uniform(0.3, 0.7)
    sheen += np.clip((_value_noise(rng, ph, pw, 5, 2) - 0.6) * 3, 0, 1) * rng.uniform(0.15, 0.4)
    sheen = np.clip(sheen, 0, 0.6) * np.clip(cover * 2 - 1, 0, 1)
    color = dark + sheen[..., None] * (np.array([190, 195, 200]) - dark)
    opacity = rng.uniform(0.55, 0.85) * (0.75 + 0.25 * np.clip(field * 2 - 1, 0, 1))  # thinner at the rim
    return _Patch(color.astype(np.float32), cover, np.maximum(opacity, sheen).astype(np.float32))


def _tissue_patch(rng: np.random.Generator, r: float) -> _Patch:
    """Crumpled tissue or paper: a light blob with soft crumple shading and a few creases."""
    pw = ph = _blob_side(r)
    field = _blob_field(rng, ph, pw, pw / 2, ph / 2, r, int(rng.integers(3, 7)), 0.3)
    cover = _cover(field, 0.08)
    crumple = _value_noise(rng, ph, pw, max(3.0, r / 8), 3)
    creases = np.zeros((ph, pw), np.float32)
    for _ in range(rng.integers(3, 10)):
        p = rng.uniform(pw * 0.2, pw * 0.8, 2)
        q = p + rng.normal(0, r * 0.4, 2)
        cv2.line(creases, _ipt(p), _ipt(q), 1.0, max(1, round(r * 0.02)))
    creases = cv2.GaussianBlur(creases, (0, 0), max(0.6, r * 0.015))
    tone = rng.uniform(185, 240) * (1 + rng.uniform(-0.03, 0.03, 3))
    light = np.clip(1 + 0.1 * crumple + 0.1 * _lit(field, r) - 0.2 * creases, 0.6, 1.15)
    return _Patch((tone * light[..., None]).astype(np.float32), cover, 0.97)


def _tape_patch(rng: np.random.Generator, r: float) -> _Patch:
    """A strip of tape: a flat, slightly bent band with square ends; packing tape is translucent."""
    length = r * rng.uniform(2.5, 5.0)
    width = math.pi * r * r / length
    pw = ph = round(length * 1.3 + width * 2)
    c = np.array([pw / 2, ph / 2])
    a = rng.uniform(0, np.pi)
    d = np.array([math.cos(a), math.sin(a)]) * length / 2
    mid = _curve(rng, c - d, c + d, length * 0.1, 24).astype(float)
    tang = np.gradient(mid, axis=0)
    nrm = np.stack([-tang[:, 1], tang[:, 0]], 1) / (np.linalg.norm(tang, axis=1, keepdims=True) + 1e-6)
    poly = np.concatenate([mid + nrm * width / 2, (mid - nrm * width / 2)[::-1]]).round().astype(np.int32)
    m = np.zeros((ph, pw), np.uint8)
    cv2.fillPoly(m, [poly], 255, AA)
    cover = m.astype(np.float32) / 255
    kinds = [((55, 55, 58), 0.98), ((160, 165, 168), 0.97), ((40, 195, 225), 0.97), ((70, 130, 185), 0.7),
             ((230, 232, 232), 0.95), ((60, 60, 190), 0.97)]
    tone, opacity = kinds[rng.integers(len(kinds))]
    grain = _value_noise(rng, ph, pw, max(3.0, length / 10), 2)
    color = np.array(tone, np.float32) * (1 + 0.06 * grain + 0.05 * _lit(cover, width))[..., None]
    return _Patch(color.astype(np.float32), cover, opacity)


def _bag_patch(rng: np.random.Generator, r: float) -> _Patch:
    """A plastic bag: a translucent, irregular polygon with bright wrinkle highlights."""
    pw = ph = round(2.8 * r)
    n = rng.integers(5, 10)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.6, 1.3, n)
    poly = np.stack([pw / 2 + rad * np.cos(ang), ph / 2 + rad * np.sin(ang)], 1).round().astype(np.int32)
    m = np.zeros((ph, pw), np.uint8)
    cv2.fillPoly(m, [poly], 255, AA)
    cover = m.astype(np.float32) / 255
    wrinkles = np.zeros((ph, pw), np.float32)
    for _ in range(rng.integers(3, 9)):
        p = rng.uniform(pw * 0.25, pw * 0.75, 2)
        q = p + rng.normal(0, r * 0.4, 2)
        cv2.line(wrinkles, _ipt(p), _ipt(q), 1.0, max(1, round(r * 0.04)), AA)
    wrinkles = cv2.GaussianBlur(wrinkles, (0, 0), max(0.7, r * 0.03)) * cover
    tones = [(235, 235, 235), (200, 150, 90), (30, 30, 30), (180, 220, 230)]
    tone = np.array(tones[rng.integers(len(tones))], np.float32)
    color = tone + wrinkles[..., None] * (255 - tone)
    opacity = np.clip(rng.uniform(0.5, 0.7) + wrinkles * 0.5, 0, 1)
    return _Patch(color.astype(np.float32), cover, opacity.astype(np.float32))


def _cable_patch(rng: np.random.Generator, r: float) -> _Patch:
    """A loose piece of cable or wire: a thin shaded curve."""
    t = max(2.0, r * rng.uniform(0.12, 0.25))
    length = min(math.pi * r * r / t, r * 8)
    pw = ph = round(length * 0.9 + 4 * t)
    c = np.array([pw / 2, ph / 2])
    a = rng.uniform(0, np.pi)
    d = np.array([math.cos(a), math.sin(a)]) * length * 0.4
    pts = _curve(rng, c - d, c + d, length * 0.3)
    m = np.zeros((ph, pw), np.uint8)
    cv2.polylines(m, [pts], False, 255, max(1, round(t)), AA)
    tones = [(20, 20, 22), (40, 40, 200), (30, 160, 220), (180, 120, 40), (200, 200, 200), (40, 130, 60)]
    tone = np.array(tones[rng.integers(len(tones))], np.float32)
    img = np.zeros((ph, pw, 3), np.uint8)
    _draw_tube(img, pts, t, tone)
    return _Patch(img.astype(np.float32), m.astype(np.float32) / 255, 1.0)


def _stone_patch(rng: np.random.Generator, r: float) -> _Patch:
    """A stone or ballast chip: a grey, speckled, lit blob with a sharp outline."""
    elong = rng.uniform(1, 1.5)
    pw = ph = _blob_side(r, elong)
    field = _blob_field(rng, ph, pw, pw / 2, ph / 2, r, int(rng.integers(1, 4)), 0.12, elong)
    cover = _cover(field, 0.05)
    tone = rng.uniform(90, 170) * (1 + rng.uniform(-0.06, 0.06, 3))
    speckle = cv2.GaussianBlur(rng.standard_normal((ph, pw)).astype(np.float32), (0, 0), 0.8)
    speckle = speckle * 0.25 + 0.12 * _value_noise(rng, ph, pw, max(3.0, r / 4), 2)
    light = np.clip(1 + speckle + 0.35 * _lit(field, r), 0.4, 1.5)
    return _Patch((tone * light[..., None]).astype(np.float32), cover, 1.0)


def _branch_patch(rng: np.random.Generator, r: float) -> _Patch:
    """A twig: brown branching lines, thinner towards the tips."""
    size = round(r * 3.2)
    m = np.zeros((size, size), np.uint8)
    thick = max(2.0, r * rng.uniform(0.08, 0.15))

    def grow(p: np.ndarray, angle: float, length: float, t: float, depth: int) -> None:
        q = p + length * np.array([math.cos(angle), math.sin(angle)])
        cv2.line(m, _ipt(p), _ipt(q), 255, max(1, round(t)), AA)
        if depth == 0:
            return
        for _ in range(rng.integers(1, 3)):
            f = rng.uniform(0.3, 0.9)
            grow(p + f * (q - p), angle + rng.choice([-1, 1]) * rng.uniform(0.3, 0.9), length * rng.uniform(0.35, 0.6),
                 t * 0.6, depth - 1)

    a = rng.uniform(0, 2 * np.pi)
    start = np.array([size / 2, size / 2]) - r * 1.2 * np.array([math.cos(a), math.sin(a)])
    grow(start, a, r * 2.4, thick, int(rng.integers(1, 4)))
    cover = m.astype(np.float32) / 255
    tone = np.array([35, 65, 100], np.float32) * rng.uniform(0.7, 1.3)
    bark = 1 + 0.2 * _value_noise(rng, size, size, max(3.0, r / 3), 2) + 0.4 * _lit(cover, thick * 2)
    return _Patch((tone * np.clip(bark, 0.5, 1.6)[..., None]).astype(np.float32), cover, 1.0)


def _scratch_patch(rng: np.random.Generator, r: float) -> _Patch:
    """Scratches: one to four thin, bright, nearly parallel lines (bare metal showing through paint)."""
    length = r * rng.uniform(1.5, 3.5)
    size = round(length * 1.2 + 8)
    m = np.zeros((size, size), np.uint8)
    a = rng.uniform(0, np.pi)
    t = max(1, round(length * rng.uniform(0.006, 0.015)))
    for k in range(rng.integers(1, 5)):
        off = rng.normal(0, length * 0.05, 2)
        d = np.array([math.cos(a), math.sin(a)]) * length / 2 * rng.uniform(0.6, 1.0)
        c = np.array([size / 2, size / 2]) + off
        cv2.polylines(m, [_curve(rng, c - d, c + d, length * 0.03, 16)], False, 255, t, AA)
    tone = rng.uniform(190, 240) * (1 + rng.uniform(-0.03, 0.03, 3))
    return _Patch(np.broadcast_to(tone, (size, size, 3)).astype(np.float32), m.astype(np.float32) / 255, 0.9)


# Foreign bodies, each with the radius factor that gives its shape about the target area (thin ones need more
# reach; a twig stays below it rather than spanning the frame).
_FOREIGN: tuple[tuple[Callable[[np.random.Generator, float], _Patch], float], ...] = (
    (_tissue_patch, 1.05), (_tape_patch, 1.0), (_bag_patch, 1.25), (_cable_patch, 1.4), (_stone_patch, 1.2),
    (_branch_patch, 1.6),
)


def _paste(img: np.ndarray, claim: np.ndarray, patch: _Patch, cx: float, cy: float) -> tuple[int, int, int, int]:
    """Blend ``patch`` centred at (cx, cy) into ``img``; mark coverage >= 0.5 in ``claim``; return its box."""
    ph, pw = patch.cover.shape
    x0, y0 = round(cx - pw / 2), round(cy - ph / 2)
    H, W = img.shape[:2]
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(W, x0 + pw), min(H, y0 + ph)
    if ix1 <= ix0 or iy1 <= iy0:
        return 0, 0, 0, 0
    sl = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
    cover = patch.cover[sl]
    opacity = patch.opacity[sl] if isinstance(patch.opacity, np.ndarray) else patch.opacity
    a = (cover * opacity)[..., None]
    roi = img[iy0:iy1, ix0:ix1].astype(np.float32)
    img[iy0:iy1, ix0:ix1] = np.clip(roi * (1 - a) + patch.color[sl] * a + 0.5, 0, 255).astype(np.uint8)
    claim[iy0:iy1, ix0:ix1] |= cover >= 0.5
    return ix0, iy0, ix1, iy1


def _place(rng: np.random.Generator, w: int, h: int, r: float) -> tuple[float, float]:
    """A centre that keeps a blob of radius r mostly inside the image."""
    mx, my = min(r, w / 2), min(r, h / 2)
    return rng.uniform(mx, w - mx), rng.uniform(my, h - my)


# An anomaly adder paints on the current albedo (or, for a missing part, on the history canvas, offset by the
# margin m), marks the pixels it covers in `claim`, and returns the box it touched.
def _add_ol(rng: np.random.Generator, cur: np.ndarray, hist: np.ndarray, m: int, claim: np.ndarray,
            scene: _Scene) -> _Box:
    h, w = cur.shape[:2]
    r = _target_radius(rng, w, h, scene.small)
    inside = [(x - m, y - m) for x, y in scene.anchors if m <= x < m + w and m <= y < m + h]
    if inside and rng.random() < 0.7:  # leaks start at joints, bolts and clamps
        cx, cy = inside[rng.integers(len(inside))]
    else:
        cx, cy = _place(rng, w, h, r)
    patch = _oil_patch(rng, r)
    ph, pw = patch.cover.shape
    return _paste(cur, claim, patch, cx, cy - pw / 2 + ph / 2)  # the stain at (cx, cy), its drips below


def _add_fb(rng: np.random.Generator, cur: np.ndarray, hist: np.ndarray, m: int, claim: np.ndarray,
            scene: _Scene) -> _Box:
    h, w = cur.shape[:2]
    r = _target_radius(rng, w, h, scene.small)
    make, factor = _FOREIGN[rng.integers(len(_FOREIGN))]
    patch = make(rng, r * factor)
    return _paste(cur, claim, patch, *_place(rng, w, h, r))


def _add_diff(rng: np.random.Generator, cur: np.ndarray, hist: np.ndarray, m: int, claim: np.ndarray,
              scene: _Scene) -> _Box:
    """Foreign body, missing component, shifted / loosened component, or scratches."""
    h, w = cur.shape[:2]
    what = rng.choice(["foreign", "missing", "shifted", "scratch"], p=[0.35, 0.3, 0.2, 0.15])
    if what == "foreign":
        return _add_fb(rng, cur, hist, m, claim, scene)
    if what == "scratch":
        r = _target_radius(rng, w, h, scene.small)
        return _paste(cur, claim, _scratch_patch(rng, r * 1.5), *_place(rng, w, h, r))

    # a component present in the history: drawn on the history canvas (missing) and moved on the current
    r = _target_radius(rng, w, h, scene.small) * 0.8
    bolt = rng.random() < 0.4
    if bolt:
        br = max(2.0, min(scene.bolt_r * rng.uniform(1.0, 2.5), r))
        draw: Callable[[np.ndarray, float, float, float], None] = (
            lambda img, x, y, a: _draw_bolt(img, x, y, br, a, scene.bolt_color))
        reach = br * 1.4
    else:
        color = _metal(rng, *scene.metal)
        if rng.random() < 0.5:
            s = r * 1.6
            draw = lambda img, x, y, a: _draw_bracket(img, x, y, s, a, color, scene.bolt_color)
            reach = s * 0.75
        else:
            bw, bh = r * rng.uniform(1.4, 2.2), r * rng.uniform(1.2, 1.8)
            draw = lambda img, x, y, a: _draw_box(img, x, y, bw, bh, color, scene.bolt_color)
            reach = math.hypot(bw, bh) / 2 + 2
    cx, cy = _place(rng, w, h, reach)
    angle = rng.uniform(0, 2 * np.pi)
    box = _draw_changed(hist, claim, lambda img: draw(img, cx + m, cy + m, angle), cx + m, cy + m, reach, m)
    if what == "shifted":
        step = reach * rng.uniform(0.3, 0.9)
        phi = rng.uniform(0, 2 * np.pi)
        nx, ny = cx + step * math.cos(phi), cy + step * math.sin(phi)
        da = rng.uniform(-0.5, 0.5)
        moved = _draw_changed(cur, claim, lambda img: draw(img, nx, ny, angle + da), nx, ny, reach, 0)
        box = (min(box[0], moved[0]), min(box[1], moved[1]), max(box[2], moved[2]), max(box[3], moved[3]))
    return box


def _draw_changed(img: np.ndarray, claim: np.ndarray, draw: Callable[[np.ndarray], None], cx: float, cy: float,
                  reach: float, offset: int) -> tuple[int, int, int, int]:
    """Run ``draw`` on ``img`` and mark the pixels it changed in ``claim`` (current coordinates = img - offset)."""
    H, W = claim.shape
    x0, y0 = max(0, math.floor(cx - reach - 2 - offset)), max(0, math.floor(cy - reach - 2 - offset))
    x1, y1 = min(W, math.ceil(cx + reach + 3 - offset)), min(H, math.ceil(cy + reach + 3 - offset))
    if x1 <= x0 or y1 <= y0:
        draw(img)
        return 0, 0, 0, 0
    before = img[y0 + offset : y1 + offset, x0 + offset : x1 + offset].copy()
    draw(img)
    after = img[y0 + offset : y1 + offset, x0 + offset : x1 + offset]
    claim[y0:y1, x0:x1] |= cv2.absdiff(after, before).max(axis=2) > 0
    return x0, y0, x1, y1


_ADD_ANOMALY: dict[str, Callable[..., _Box]] = {"OL": _add_ol, "FB": _add_fb, "Diff": _add_diff}


# ----------------------------------------------------------------------------------------------------------
# Nuisance: viewpoint, illumination, sensor noise (JPEG comes when the files are written)
# ----------------------------------------------------------------------------------------------------------


def _view_change(rng: np.random.Generator, canvas: np.ndarray, w: int, h: int, m: int, amount: float) -> np.ndarray:
    """The history as seen from a slightly different viewpoint: a random homography into the canvas."""
    side = max(w, h)
    shift = rng.uniform(-amount, amount, 2) * side  # the whole view moves ...
    jitter = rng.uniform(-amount / 2, amount / 2, (4, 2)) * side  # ... and its corners a bit more: perspective
    out = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    src = (out + m + shift + jitter).astype(np.float32)
    mat = cv2.getPerspectiveTransform(out, src)
    return cv2.warpPerspective(canvas, mat, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REFLECT)


def _nuisance(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Own lighting for each capture: gain / offset / white balance, a smooth light field, sensor noise."""
    h, w = img.shape[:2]
    lw, lh = max(2, math.ceil(w / 16)), max(2, math.ceil(h / 16))
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    yy, xx = yy / (lh - 1) - 0.5, xx / (lw - 1) - 0.5
    light = 1 + rng.uniform(-0.2, 0.2) * xx + rng.uniform(-0.2, 0.2) * yy
    for _ in range(rng.integers(1, 3)):  # a lamp's hot spot or a shadow
        cx, cy = rng.uniform(-0.5, 0.5, 2)
        sigma = rng.uniform(0.15, 0.45)
        light += rng.uniform(-0.18, 0.18) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    gain = rng.uniform(0.88, 1.12) * (1 + rng.uniform(-0.03, 0.03, 3))  # exposure and white balance
    field = cv2.resize(_fixed(np.clip(light, 0.3, None)[..., None] * gain), (w, h), interpolation=cv2.INTER_LINEAR)
    lit = cv2.multiply(img, field, scale=1 / 128)
    # per-channel sensor noise; a black-level offset rides along with it
    noise = _noise_u8(rng, (h, w, 3), rng.uniform(1.0, 3.5), 128 + rng.uniform(-8, 8))
    return cv2.addWeighted(lit, 1.0, noise, 1.0, -128.0)


# ----------------------------------------------------------------------------------------------------------
# Side files: README and contact sheet
# ----------------------------------------------------------------------------------------------------------


def _write_readme(root: Path, kind: str, seed: int, size: tuple[int, int] | None,
                  splits: dict[str, list[int]], results: dict[int, tuple[str, float]], small: bool = False) -> None:
    spec = _SPECS[kind]
    size_text = f"{size[0]}x{size[1]}" if size else (
        f"{spec.size[0]}x{spec.size[1]} (the paper's)" if spec.size else
        "varies per pair, {}x{} .. {}x{} (the paper's FB range)".format(*FB_SIZE_RANGE[0], *FB_SIZE_RANGE[1]))
    normal = sum(1 for _, frac in results.values() if frac == 0)
    counts = ", ".join(f"{name} {len(ix)}" for name, ix in splits.items())
    anomalies = "small only, {:g}-{:g}% of the image's area (--small-anomalies)".format(
        *(100 * a for a in SMALL_AREA)) if small else "the paper's sizes"
    (root / "README.txt").write_text(
        f"SYNTHETIC data: a procedural stand-in for the paper's private {kind} dataset, not real images.\n"
        f"generator: anodfd.synth.synthesize (anodfd synth {kind})\n"
        f"kind: {kind}\nseed: {seed}\nsize: {size_text}\n"
        f"pairs: {len(results)} ({counts}); {normal} normal (empty mask)\n"
        f"anomalies: {anomalies}\n"
        "layout: the paper's: <pair>/cur.jpg, hist.jpg, cur_gt.png (0/255, current-image coordinates); "
        "split lists cur,hist,gt with backslashes\n"
    )


def _write_contact_sheet(root: Path, pairs: list[tuple[str, float]], rows: int = 8, thumb: int = 256) -> None:
    """A grid of (history | current | mask in red over current) for up to ``rows`` pairs, mostly anomalous."""
    normal = [p for p in pairs if p[1] == 0][:2]
    anomalous = [p for p in pairs if p[1] > 0][: rows - len(normal)]
    rest = [p for p in pairs if p not in normal and p not in anomalous]
    chosen = sorted(anomalous + normal + rest[: rows - len(anomalous) - len(normal)], key=pairs.index)
    th, label_h = thumb * 3 // 4, 18
    sheet = np.full((label_h + len(chosen) * (th + label_h), 3 * thumb, 3), 30, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for j, name in enumerate(("history", "current", "mask (red) over current")):
        cv2.putText(sheet, name, (j * thumb + 4, 13), font, 0.45, (150, 200, 255), 1, AA)
    for k, (folder, frac) in enumerate(chosen):
        cur, hist = _read(root / folder / "cur.jpg"), _read(root / folder / "hist.jpg")
        mask = _read(root / folder / "cur_gt.png", cv2.IMREAD_GRAYSCALE)
        over = cur.copy()
        red = mask > 127
        over[red] = (0.45 * over[red] + 0.55 * np.array([0, 0, 255])).astype(np.uint8)
        y = label_h + k * (th + label_h)
        for j, img in enumerate((hist, cur, over)):
            s = min(thumb / img.shape[1], th / img.shape[0])  # letterboxed: FB pairs vary in aspect
            tw, tt = max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))
            small = cv2.resize(img, (tw, tt), interpolation=cv2.INTER_AREA)
            oy, ox = y + label_h + (th - tt) // 2, j * thumb + (thumb - tw) // 2
            sheet[oy : oy + tt, ox : ox + tw] = small
        h0, w0 = cur.shape[:2]
        text = f"{folder}   {w0}x{h0}   " + (f"anomaly {100 * frac:.2f}% of pixels" if frac else "normal")
        cv2.putText(sheet, text, (4, y + 13), font, 0.42, (230, 230, 230), 1, AA)
    _write(root / "contact_sheet.png", sheet)


def _read(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    return cv2.imdecode(np.fromfile(path, np.uint8), flags)  # unlike imread, fine with any path
