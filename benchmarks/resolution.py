"""Squashed pairs against native crops with tiled inference, scored on the masks' own pixels.

    python benchmarks/resolution.py --data ../shared/data/deeppcb --epochs 6
    anodfd synth OL --out data/OL-2048 --pairs 60 --size 2048x1536 --seed 1
    python benchmarks/resolution.py --data data/OL-2048 --epochs 40 --scales 1 0.25
    python benchmarks/resolution.py --data data/OL-2048 --epochs 40 --align ecc --relight --fit-threshold
    anodfd synth OL --out data/OL-2048-holdout --pairs 100 --size 2048x1536 --seed 7
    python benchmarks/resolution.py --data data/OL-2048 --epochs 40 --align ecc --relight --fit-threshold \
        --schedule cosine --holdout data/OL-2048-holdout   # small-defect recall on 100 more pairs
    anodfd synth OL --out data/OL-2048-small --pairs 100 --size 2048x1536 --seed 11 --small-anomalies
    python benchmarks/resolution.py --data data/OL-2048 --epochs 40 --align ecc --relight --fit-threshold \
        --schedule cosine --holdout data/OL-2048-small     # on defects a few pixels across
    python benchmarks/resolution.py --timing        # tiled inference speed and memory only
    python benchmarks/resolution.py --misses runs/resolution10/deeppcb/crop-align-ecc/last.pt \
        --data ../shared/data/deeppcb                # why a model's defects were missed

Rows for one dataset, all scored on its validation split (`val`) at the masks' native resolution:
- template differencing at native size (grey |current - history|, 3x3 opening), threshold fitted on train;
- AnoDFDNet `--resize 256`: every pair squashed to 256x256, the paper's way;
- AnoDFDNet `--resize 0 --scale S --crop 256 --crop-pos-fraction P` for each S of `--scales` (default 1, native
  pixels): 256 px training crops of the scaled pair, aspect kept (a share P, default 0.5, placed on an anomaly),
  validation and scoring through blended 256 px tiles.
Both networks get the same budget: the same epochs, steps and batch of 256x256 samples, the same seed. Each is
scored with its last epoch's weights (no selection on the split it is scored on) at the paper's threshold 0.5, and
with `--fit-threshold` also at its F1-best threshold on the train split, as template differencing is.
Columns: pixel F1 and AUC, defect F and recall (`anodfd.metrics.DefectCounts`: a defect is found when a predicted
region of at least 16 px overlaps it), and the recall of small defects (largest side under 1% and under 3% of the
image's longer side). `--timing` measures tiled inference at 2048x1536 (pairs/s for `tiny` and `paper`) and the
peak memory of a process scoring one 2048x1536 pair against one 4096x3072 pair.
`--holdout DIR` adds each row scored on every pair of another dataset, none of which it was trained on or fitted
to: a validation split of 11 pairs holds a single defect under 1% of the side. Results land in `--out` as JSON;
reruns reuse finished trainings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from anodfd.checkpoint import inference_model, load_checkpoint, model_from_checkpoint
from anodfd.config import PRESETS, SCHEDULES, Config, with_window
from anodfd.data.cache import View
from anodfd.data.dataset import make_dataset
from anodfd.data.layouts import DatasetError, load_split
from anodfd.data.transforms import AUGMENTS
from anodfd.evaluation import evaluate
from anodfd.inference import sliding_probs
from anodfd.metrics import (
    DEFECT_GAP,
    MIN_REGION_AREA,
    DefectCounts,
    PixelHistogram,
    defect_regions,
    detections,
)
from anodfd.scoring import difference_map, template_difference
from anodfd.train.loop import fit

SQUASHED = {"AnoDFDNet --resize 256 (squashed)": {"data.resize": 256}}


def crop_view(scale: float, pos_fraction: float = 0.5) -> tuple[str, dict]:
    return (f"AnoDFDNet --scale {scale:g} --crop 256 --crop-pos-fraction {pos_fraction:g}, tiled",
            {"data.resize": 0, "data.scale": scale, "data.crop": 256, "data.crop_pos_fraction": pos_fraction})
SMALL = (0.01, 0.03)  # small-defect bins: largest side under this share of the image's longer side
HOLDOUT_SPLITS = ("train", "val", "test")  # a --holdout set is scored whole: none of it was trained on


# From the paper's 0.5 up: below it, a crop model's map merges into regions that span the image, each "finding"
# every defect it touches for one false alarm at most.
SWEEP = (0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999)
EQUAL_ALARMS = 1.0  # false alarms per pair at which --holdout rows also compare defect recall


class Tally:
    """Pixel histogram, defect counts and small-defect recall over (map, mask) pairs at native size. With ``sweep``,
    defects are also counted at each threshold of `SWEEP`, to compare models at equal false alarms: the threshold
    that is best for pixel F1 says little about finding a 10 px defect."""

    def __init__(self, threshold: float = 0.5, sweep: bool = False) -> None:
        self.pixels, self.defects, self.threshold = PixelHistogram(), DefectCounts(), threshold
        self.small = {s: [0, 0] for s in SMALL}  # share -> [found, total]
        self.swept = {t: Tally(t) for t in SWEEP} if sweep else {}

    def add(self, probs: np.ndarray, mask: np.ndarray) -> None:
        self.pixels.update(torch.from_numpy(probs)[None, None], torch.from_numpy(mask)[None, None])
        self.defects.update((probs >= self.threshold).astype(np.uint8), mask)
        self.add_extras(probs, mask)

    def add_extras(self, probs: np.ndarray, mask: np.ndarray) -> None:
        """Small-defect recall and the sweep only, for maps whose pixels and defects are counted elsewhere
        (`evaluation.evaluate`)."""
        self.add_small((probs >= self.threshold).astype(np.uint8), mask)
        for tally in self.swept.values():
            binary = (probs >= tally.threshold).astype(np.uint8)
            tally.defects.update(binary, mask)
            tally.add_small(binary, mask)

    def add_small(self, binary: np.ndarray, mask: np.ndarray) -> None:
        labels, _, kept = detections(binary, MIN_REGION_AREA)
        detected = np.isin(labels, kept)
        truth, defects = defect_regions(mask)
        side = max(mask.shape)
        for i in defects:
            ys, xs = np.nonzero(truth == i)
            largest = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            found = bool(detected[ys, xs].any())
            for share, counts in self.small.items():
                if largest < share * side:
                    counts[0] += found
                    counts[1] += 1

    def row(self) -> dict:
        m, d = self.pixels.compute(self.threshold), self.defects.compute()
        out = {"pixel_f1": m["f1"], "auc": m["auc"], "defect_f": d["defect_f"], "defect_recall": d["defect_recall"],
               "false_alarms_per_image": d["false_alarms_per_image"]}
        for share, (found, total) in self.small.items():
            out[f"recall_under_{share:g}"] = found / total if total else None
            out[f"defects_under_{share:g}"] = total
        if self.swept:
            out["sweep"] = {f"{t:g}": {k: v for k, v in tally.row().items() if k not in ("pixel_f1", "auc")}
                            for t, tally in self.swept.items()}
            # the lowest threshold of the sweep with at most EQUAL_ALARMS false alarms per pair
            t = next((t for t, tally in self.swept.items()
                      if tally.defects.compute()["false_alarms_per_image"] <= EQUAL_ALARMS), SWEEP[-1])
            out[f"at_{EQUAL_ALARMS:g}_false_alarms"] = {"threshold": t, **out["sweep"][f"{t:g}"]}
        return out


def config_for(data: str, view: dict, args: argparse.Namespace) -> Config:
    base = Config().with_flat({**PRESETS["smoke"], "data.data": data, "model.name": args.model,
                               "train.epochs": args.epochs, "train.max_steps_per_epoch": args.steps,
                               "train.batch_size": args.batch_size, "train.seed": args.seed,
                               "data.augment": args.augment, "data.align": args.align, "data.relight": args.relight,
                               "train.schedule": args.schedule})
    return with_window(base, view)


def score_model(checkpoint: Path, splits: tuple[str, ...], threshold: float = 0.5, data: str | None = None) -> dict:
    """The checkpoint's rows on ``splits`` of its own dataset, or of ``data``'s (a holdout set, also swept)."""
    model, config = inference_model(load_checkpoint(checkpoint))
    if data:
        config = config.with_flat({"data.data": data})
    tally, count = Tally(threshold, sweep=bool(data)), 0
    start = time.perf_counter()
    for split in splits:
        dataset = make_dataset(config.data, split)
        # `evaluate` counts pixels and defects (at the tally's threshold); the tally adds small defects and the sweep.
        pixels, _, defects = evaluate(model, dataset, torch.device("cpu"), config.data.window, threshold=threshold,
                                      on_pair=lambda i, probs, mask: tally.add_extras(probs, mask))
        tally.pixels.merge(pixels)
        tally.defects.merge(defects)
        count += len(dataset)
    return {**tally.row(), "score_s_per_pair": (time.perf_counter() - start) / count}


def train_threshold(checkpoint: Path) -> float:
    """The F1-best threshold on the train split (no augmentation, whole pairs tiled), as template differencing's."""
    model, config = inference_model(load_checkpoint(checkpoint))
    pixels, _, _ = evaluate(model, make_dataset(config.data, "train"), torch.device("cpu"), config.data.window)
    return pixels.best_f1_threshold()[0]


def score_template(data: str, splits: tuple[str, ...], threshold: float | None = None) -> dict:
    """Template differencing on ``splits`` of ``data`` at ``threshold``; by default the one fitted on ``data``'s train
    split. Given a threshold (fitted on another dataset), ``data`` is a holdout set: also swept."""
    holdout = threshold is not None
    if not holdout:
        _, threshold = template_difference(Config().with_flat({"data.data": data}).data, splits[0], native=True)
    tally = Tally(threshold, sweep=holdout)
    for split in splits:
        dataset = make_dataset(Config().with_flat({"data.data": data}).data, split)
        for i, pair in enumerate(dataset.pairs):
            history, current = (cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in (pair.hist, pair.cur))
            mask = dataset.native_mask(i)
            if history.shape != mask.shape:
                history, current = (cv2.resize(x, mask.shape[::-1], interpolation=cv2.INTER_AREA)
                                    for x in (history, current))
            tally.add(difference_map(history, current), mask)
    return {**tally.row(), "threshold": threshold}


def run_dataset(args: argparse.Namespace) -> list[dict]:
    data = str(Path(args.data).resolve())
    out = Path(args.out) / Path(data).name
    out.mkdir(parents=True, exist_ok=True)
    holdout = str(Path(args.holdout).resolve()) if args.holdout else None
    on_holdout = f", on {Path(holdout).name} (all splits)" if holdout else ""
    rows = [{"method": "template differencing, native", **score_template(data, (args.split,))}]
    print(rows[-1], flush=True)
    if holdout:
        rows.append({"method": f"template differencing, native{on_holdout}",
                     **score_template(holdout, HOLDOUT_SPLITS, rows[0]["threshold"])})
        print(rows[-1], flush=True)
    views = {**SQUASHED, **dict(crop_view(s, args.crop_pos_fraction) for s in args.scales)}
    aligned = ("" if args.align == "none" else f" --align {args.align}") + (" --relight" if args.relight else "")
    # keeps the runs and results of each align, relight, crop-pos-fraction, augment, schedule and seed apart (a run
    # folder that exists is resumed)
    tag = aligned.replace(" --align ", "-align-").replace(" --relight", "-relight")
    pos = "" if args.crop_pos_fraction == 0.5 else f"-pos{args.crop_pos_fraction:g}"
    tag += "".join(f"-{value}" for value, default in ((args.augment, "paper"), (args.schedule, "constant"))
                   if value != default) + (f"-seed{args.seed}" if args.seed else "")
    for method, view in views.items():
        method += aligned
        config = config_for(data, view, args)
        scale = config.data.scale
        run = out / (("resize" if not config.data.crop else ("crop" if scale == 1 else f"crop-scale{scale:g}") + pos)
                     + tag)
        start = time.time()
        fit(config, run)
        rows.append({"method": method, "train_minutes": (time.time() - start) / 60,
                     **score_model(run / "last.pt", (args.split,))})
        print(rows[-1], flush=True)
        threshold = 0.5
        if args.fit_threshold:
            threshold = train_threshold(run / "last.pt")
            rows.append({"method": f"{method}, threshold {threshold:.3f} fitted on train",
                         **score_model(run / "last.pt", (args.split,), threshold), "threshold": threshold})
            print(rows[-1], flush=True)
        if holdout:
            rows.append({"method": f"{method}, threshold {threshold:.3f}{on_holdout}",
                         **score_model(run / "last.pt", HOLDOUT_SPLITS, threshold, holdout), "threshold": threshold})
            print(rows[-1], flush=True)
    (out / f"resolution{pos}{tag}.json").write_text(json.dumps({"budget": budget(args), "rows": rows}, indent=2))
    return rows


def budget(args: argparse.Namespace) -> str:
    steps = f"{args.steps} steps" if args.steps else "whole epochs"
    return (f"{args.model}, {args.epochs} epochs of {steps}, batch {args.batch_size} of 256x256 samples, "
            f"{args.augment} augmentation, {args.schedule} learning rate, seed {args.seed}, "
            f"{torch.get_num_threads()} CPU threads")


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n")
    print("| method | pixel F1 | AUC | defect F | defect recall | recall, defects < 1% of side | < 3% of side |")
    print("|---|---|---|---|---|---|---|")
    def small(share: float, r: dict) -> str:
        value = r[f"recall_under_{share:g}"]
        return "none" if value is None else f"{value:.3f} ({r[f'defects_under_{share:g}']})"

    for r in rows:
        print(f"| {r['method']} | {r['pixel_f1']:.4f} | {r['auc']:.4f} | {r['defect_f']:.4f} | "
              f"{r['defect_recall']:.4f} | {small(0.01, r)} | {small(0.03, r)} |")
    equal = f"at_{EQUAL_ALARMS:g}_false_alarms"
    swept = [(r["method"], r[equal]) for r in rows if equal in r]
    if swept:
        print(f"\nAt the lowest threshold of {SWEEP} with at most {EQUAL_ALARMS:g} false alarms per pair:\n")
        print("| method | threshold | false alarms / pair | defect recall | < 1% of side | < 3% of side |")
        print("|---|---|---|---|---|---|")
        for method, r in swept:
            print(f"| {method} | {r['threshold']:g} | {r['false_alarms_per_image']:.2f} | {r['defect_recall']:.4f} | "
                  f"{small(0.01, r)} | {small(0.03, r)} |")


def time_one(model_name: str, width: int, height: int, window: int, repeats: int) -> dict:
    """Pairs/s and memory of tiled inference on one random pair (run in its own process for a clean peak)."""
    config = with_window(Config().with_flat({"model.name": model_name}), {"data.resize": 0, "data.crop": window})
    from anodfd.model import build_model

    model = build_model(config.model).eval()
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    cur = hist.copy()
    sliding_probs(model, hist[:window, :window], cur[:window, :window], window)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sliding_probs(model, hist, cur, window)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": model_name, "size": f"{width}x{height}", "seconds_per_pair": float(np.median(times)),
            "pairs_per_s": 1 / float(np.median(times)), "peak_mb": peak, "before_mb": before}


def run_timing(args: argparse.Namespace) -> list[dict]:
    cases = [("tiny", 2048, 1536, args.repeats), ("paper", 2048, 1536, args.repeats),
             ("tiny", 4096, 3072, 1), ("paper", 4096, 3072, 1)]
    results = []
    for name, w, h, repeats in cases:
        cmd = [sys.executable, __file__, "--_time", name, str(w), str(h), str(repeats), "--threads", str(args.threads)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        print(results[-1], flush=True)
    print(f"\ntiled inference, 256 px tiles, batch 8, {args.threads} threads\n")
    print("| model | image | s per pair | pairs/s | peak memory (MB) | of which before scoring |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['size']} | {r['seconds_per_pair']:.2f} | {r['pairs_per_s']:.3f} | "
              f"{r['peak_mb']:.0f} | {r['before_mb']:.0f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "timing.json").write_text(json.dumps(results, indent=2))
    return results


MASK_RULE = 127  # DeepPCB's derived masks mark |template - test| > 127 inside a defect's box
THIN = 3  # px: a mask group no wider than this, lying along an edge, is an edge sliver
ALONG_EDGE = 0.8  # share of a sliver's pixels within 2 px of an edge of the registered history


def edge_evidence(history: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where a registered RGB pair differs by the derived masks' rule, and where the history has an edge (2 px)."""
    hist, cur = (cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.int16) for x in (history, current))
    edges = cv2.morphologyEx((hist > MASK_RULE).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    return np.abs(hist - cur) > MASK_RULE, cv2.dilate(edges, np.ones((5, 5), np.uint8)) > 0


def sort_groups(truth: np.ndarray, groups: list[int], differs: np.ndarray, near_edge: np.ndarray) -> dict[int, str]:
    """Each group of a mask derived from boxes on binarised images (DeepPCB's) as ``vanishes`` (under a fifth of its
    pixels still differ once history is registered: misregistration inside a box), ``edge_sliver`` (at most `THIN`
    px wide along an edge: binarisation noise, which differs on edges in a box or not) or ``defect``."""
    on = truth > 0
    labels, n = truth[on], truth.max() + 1
    area = np.maximum(np.bincount(labels, minlength=n), 1)
    share_differs = np.bincount(labels, differs[on], n) / area
    share_on_edge = np.bincount(labels, near_edge[on], n) / area
    # a pixel's distance to the nearest pixel off the mask is its distance to the edge of its own piece: pieces of
    # a group, and groups, are apart. A group's width is twice the largest inscribed radius of its widest piece.
    width = np.zeros(n)
    np.maximum.at(width, labels, 2 * cv2.distanceTransform(on.astype(np.uint8), cv2.DIST_L2, 3)[on])
    kinds = {}
    for g in groups:
        if share_differs[g] < 0.2:
            kinds[g] = "vanishes"
        elif width[g] <= THIN and share_on_edge[g] >= ALONG_EDGE:
            kinds[g] = "edge_sliver"
        else:
            kinds[g] = "defect"
    return kinds


def explain_misses(checkpoint: Path, data: str, split: str, threshold: float = 0.5) -> dict:
    """Sort the defects a checkpoint misses at ``threshold``: slivers at most 2 px wide, misses with pixels above the
    threshold that form no detection (a region under `MIN_REGION_AREA` px), and misses that never reach
    probability 0.2. Then sort every defect by `sort_groups` (for masks derived from boxes on binarised images,
    such as DeepPCB's) and give what that means for defect F: the score with the artifacts counted as specks
    (neither to be found nor false alarms), and the ceiling of the protocol's defect F for a model that finds every
    other defect, raises no false alarm and finds only the artifacts this one does. ``edge_slivers_off_mask`` counts
    the groups of the same kind of sliver away from every mask: what flagging edge slivers would also flag."""
    model, config = model_from_checkpoint(load_checkpoint(checkpoint))
    config.data.data = str(Path(data).resolve())
    dataset = make_dataset(config.data, split)
    # the pair at native size, registered as the network saw it, without relighting: the mask's rule is on raw grey.
    # A crop network's own view at scale 1, so its dataset's cache already holds it.
    native_view = View(resize=0, scale=1.0, align=config.data.align)
    c = dict.fromkeys(("defects", "found", "slivers", "slivers_found", "missed_region_too_small",
                       "missed_below_0.2", "edge_slivers_off_mask"), 0)
    by_kind = {k: [0, 0] for k in ("defect", "edge_sliver", "vanishes")}  # found, total
    uncounted = DefectCounts()

    def on_pair(i: int, probs: np.ndarray, mask: np.ndarray) -> None:
        binary = (probs >= threshold).astype(np.uint8)
        labels, _, kept = detections(binary)
        detected = np.isin(labels, kept)
        arr = dataset.cache.get(dataset.pairs[i], native_view)
        differs, near_edge = edge_evidence(arr[..., :3], arr[..., 3:6])
        truth, defects = defect_regions(mask)
        kinds = sort_groups(truth, defects, differs, near_edge)
        # the same kind of sliver where no box is: what a model that flagged edge slivers would flag besides
        off_mask = differs & (cv2.dilate(mask, np.ones((2 * DEFECT_GAP + 1,) * 2, np.uint8)) == 0)
        off_truth, off_groups = defect_regions(off_mask)
        c["edge_slivers_off_mask"] += list(sort_groups(off_truth, off_groups, differs, near_edge).values()).count(
            "edge_sliver")
        uncounted.update(binary, mask, regions=(truth, [d for d in defects if kinds[d] == "defect"]))
        for d in defects:
            ys, xs = np.nonzero(truth == d)
            sliver = bool(min(xs.max() - xs.min(), ys.max() - ys.min()) + 1 <= 2)
            found = bool(detected[ys, xs].any())
            c["defects"] += 1
            c["found"] += found
            c["slivers"] += sliver
            c["slivers_found"] += sliver and found
            by_kind[kinds[d]][0] += found
            by_kind[kinds[d]][1] += 1
            if not found:
                c["missed_region_too_small"] += bool(binary[ys, xs].any())
                c["missed_below_0.2"] += bool(probs[ys, xs].max() < 0.2)

    _, _, counted = evaluate(model, dataset, torch.device("cpu"), config.data.window, threshold, on_pair=on_pair)
    kept = c["defects"] - c["slivers"]
    c["recall"] = c["found"] / c["defects"]
    c["recall_without_slivers"] = (c["found"] - c["slivers_found"]) / kept if kept else None
    c["found_of"] = {k: f"{found}/{total}" for k, (found, total) in by_kind.items()}
    c["defect_f"] = counted.compute()["defect_f"]
    c["defect_f_artifacts_as_specks"] = uncounted.compute()["defect_f"]
    reachable = by_kind["defect"][1] + by_kind["edge_sliver"][0] + by_kind["vanishes"][0]
    best_recall = reachable / c["defects"] if c["defects"] else 1.0
    c["defect_f_ceiling"] = 2 * best_recall / (1 + best_recall)
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a dataset folder with train and val splits")
    p.add_argument("--split", default="val")
    p.add_argument("--align", choices=["none", "ecc", "features"], default="none",
                   help="register history onto current in every network row (template differencing stays as is)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="one native-crop row per scale (--resize 0 --scale S --crop 256)")
    p.add_argument("--fit-threshold", action="store_true",
                   help="also score each network at its F1-best threshold on the train split (as template differencing)")
    p.add_argument("--relight", action="store_true", help="match history's lighting to current's (after --align)")
    p.add_argument("--crop-pos-fraction", type=float, default=0.5,
                   help="share of the crop rows' training crops placed on an anomaly")
    p.add_argument("--augment", choices=list(AUGMENTS), default="paper",
                   help="augmentation of every network row (strong adds per-image brightness, contrast and gamma)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default="constant",
                   help="learning-rate schedule of every network row (cosine: decays to 0, a steadier last epoch)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=0, help="max steps per epoch (0 = whole epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing", action="store_true", help="measure tiled inference speed and memory")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/resolution")
    p.add_argument("--holdout", default=None, metavar="DIR",
                   help="also score every row, at the same thresholds, on every pair of this dataset (generated apart "
                        "from --data, e.g. by another seed): enough small defects to count")
    p.add_argument("--misses", type=Path, default=None, metavar="CHECKPOINT",
                   help="with --data: sort the defects this checkpoint misses on --split, instead of training")
    p.add_argument("--_time", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args._time:
        name, w, h, repeats = args._time
        print(json.dumps(time_one(name, int(w), int(h), 256, int(repeats))))
        return
    if args.misses:
        if not args.data:
            p.error("--misses needs --data")
        print(json.dumps(explain_misses(args.misses, args.data, args.split), indent=2))
        return
    try:  # before hours of training, not after
        for folder, splits in ((args.data, ("train", args.split)), (args.holdout, HOLDOUT_SPLITS)):
            for split in splits if folder else ():
                load_split(Path(folder), split)
    except DatasetError as e:
        p.error(str(e))
    if args.data:
        print_table(run_dataset(args), f"{Path(args.data).name}, {args.split} split, native masks; {budget(args)}")
    if args.timing:
        run_timing(args)
    if not (args.data or args.timing):
        p.error("pass --data DIR and/or --timing")


if __name__ == "__main__":
    main()
