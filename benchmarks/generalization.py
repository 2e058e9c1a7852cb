"""Leave-groups-out folds: every method scored on groups (boards) that neither the model nor its threshold saw.

    python benchmarks/generalization.py --data ../shared/data/deeppcb --epochs 10

DeepPCB's trainval pairs come from 7 boards (the first five digits of an id). Each fold holds out 2-3 boards
(every board is held out once); of the remaining boards one calibrates the threshold (``--val-groups``, so the
threshold is also chosen on a board training never saw) and the others train. Rows, all scored on the same
held-out pairs at the masks' native resolution:
- template differencing: grey |current - history| after a 3x3 opening, above half the range (no learning);
- ECC registration (as ``--align ecc``) and the same differencing;
- the README's recipe: AnoDFDNet ``tiny``, ``--resize 0 --scale 1 --crop 256 --crop-pos-fraction 0.5 --align
  ecc --confirm diff``, the smoke preset's losses, cosine schedule, ``--epochs``, at the threshold calibrated on
  the calibration board,
  trained with ``--confirm diff``: a region the network detects is kept only where the registered difference also
  fires somewhere inside it (`anodfd.confirm`; the network's recall and pixels, the differencing's sparse false
  alarms), as `predict`, `eval` and serving apply it;
- the same checkpoint unconfirmed, its threshold calibrated on unconfirmed maps of the calibration board (the
  network alone);
- the confirmed maps again, at the threshold ``--calibrate defect`` serves: the one of a 0.05 grid with the best
  defect F on the calibration board's masks, instead of the best pixel F1. All three come from the same forward
  passes.
Columns, per held-out board and pooled: defect F under the overlap rule against the dataset's own boxes and under
DeepPCB's rule (IoU > 0.33, one to one), box recall, false alarms per pair, pixel F1, and training minutes.
``--augment`` and ``--misregister`` train the recipe with another augmentation (each such run is kept apart under
``--work``). ``--sweep`` adds the confirmed maps at every threshold from 0.05 to 0.95, and found at the defect
threshold but drawn at the pixel one (`outlined`). The table is printed; ``--json`` keeps every figure. ``--work
DIR`` keeps each fold's trained run: a rerun with the same folder and folds scores finished runs again instead of
training them, and resumes unfinished ones.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch

from anodfd.checkpoint import inference_model, load_checkpoint
from anodfd.config import PRESETS, SCHEDULES, Config, ConfigError, with_window
from anodfd.confirm import confirmed, evidence
from anodfd.data.align import align_pair
from anodfd.data.cache import read_mask, read_rgb
from anodfd.data.dataset import make_dataset
from anodfd.data.layouts import read_boxes, read_split
from anodfd.data.shift import box_mask_dataset
from anodfd.data.transforms import AUGMENTS
from anodfd.evaluation import evaluate
from anodfd.metrics import DEFECT_GRID, BoxCounts, DefectGrid, PixelHistogram
from anodfd.train.loop import check_resumable, fit

DEEPPCB_FOLDS = ["00041,44000", "13000,50600,92000", "20085,77000"]


def outlined(probs: np.ndarray, detect: float, threshold: float) -> np.ndarray:
    """Regions found at ``detect`` and drawn at ``threshold`` (HxW bool): each 8-connected region of ``probs >=
    detect`` keeps its pixels ``>= threshold``, or all of them when none reaches it. ``--sweep`` scores it to ask
    whether a low threshold's extra boxes are faint defects of their own (kept whole here) or wider outlines of
    regions the higher threshold finds anyway (drawn at the higher one here)."""
    if detect >= threshold:
        return probs >= threshold
    n, labels = cv2.connectedComponents((probs >= detect).astype(np.uint8), connectivity=8)
    peak = np.zeros(n, np.float32)
    np.maximum.at(peak, labels.ravel(), probs.ravel().astype(np.float32))
    whole = peak < threshold
    whole[0] = False  # the background
    return (probs >= threshold) | whole[labels]


class Tally:
    """Pixel and box counts of one method, per group and pooled."""

    def __init__(self) -> None:
        self.pixels: dict[str, PixelHistogram] = defaultdict(lambda: PixelHistogram(bins=100))
        self.boxes: dict[str, BoxCounts] = defaultdict(BoxCounts)

    def add(self, group: str, binary: np.ndarray, mask: np.ndarray, boxes: np.ndarray) -> None:
        for g in (group, "pooled"):
            self.pixels[g].update(torch.from_numpy(binary.astype(np.float32))[None, None],
                                  torch.from_numpy(mask)[None, None])
            self.boxes[g].update(binary.astype(np.uint8), boxes)

    def rows(self) -> dict[str, dict]:
        out = {}
        for g in sorted(self.boxes, key=lambda g: (g == "pooled", g)):
            b = self.boxes[g].compute()
            out[g] = {"pairs": self.boxes[g].counts["pairs"], "defect_f": b["box_f"], "strict_f": b["strict_f"],
                      "recall": b["box_recall"], "false_alarms": b["box_false_alarms_per_image"],
                      "pixel_f1": self.pixels[g].compute(0.5)["f1"]}
        return out


def fold_dataset(src: Path, root: Path, regex: str, held: set[str], calibrate: str,
                 train_labels: Path | None = None) -> None:
    """``root`` as a view of ``src``: its image, mask and box folders linked, its own lists (train: the other
    boards but ``calibrate``, val: ``calibrate``, test: the held-out boards). With ``train_labels`` (a folder of
    masks named as ``src``'s), the train and val pairs' masks are linked from there one by one, and the held-out
    pairs keep ``src``'s: a model may learn from other labels, but it is scored against the shipped ones."""
    pairs = read_split(src, "train") + read_split(src, "val")
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for p in pairs:
        group = re.search(regex, p.name).group(1)
        split = "test" if group in held else "val" if group == calibrate else "train"
        lists[split].append(p.name)
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("A", "B", "boxes") + (() if train_labels else ("label",)):
        if not (root / sub).exists():
            (root / sub).symlink_to(src / sub)
    if train_labels:  # the held-out boards change with the fold, so the links are made again
        shutil.rmtree(root / "label", ignore_errors=True)
        (root / "label").mkdir()
        for split, names in lists.items():
            for name in names:
                (root / "label" / f"{name}.png").symlink_to((src if split == "test" else train_labels)
                                                            / "label" / f"{name}.png")
    (root / "list").mkdir(exist_ok=True)
    for split, names in lists.items():
        (root / "list" / f"{split}.txt").write_text("\n".join(sorted(names)) + "\n")


def differencing(data: Path, regex: str, tally: Tally, align: str) -> None:
    """Scores differencing on the held-out pairs."""
    for p in read_split(data, "test"):
        hist, cur, mask = read_rgb(p.hist), read_rgb(p.cur), read_mask(p.mask)
        if align != "none":
            hist = align_pair(hist, cur, align)[0]
        tally.add(re.search(regex, p.name).group(1), evidence(hist, cur), mask, read_boxes(p))


def recipe(data: Path, args: argparse.Namespace) -> Config:
    """The recipe's config on ``data``, with the command line's seed, schedule and augmentation: built once before
    any compute, so that a bad value fails there, with the config's own one-line rule."""
    return with_window(Config().with_flat({
        **PRESETS["smoke"], "data.data": str(data), "model.name": "tiny", "train.epochs": args.epochs,
        "train.seed": args.seed, "train.schedule": args.schedule, "data.align": "ecc", "data.confirm": "diff",
        "data.augment": args.augment, "data.misregister": args.misregister, "data.cache_dir": args.cache_dir or ""}),
        {"data.resize": 0, "data.scale": 1.0, "data.crop": 256, "data.crop_pos_fraction": 0.5})


def network(data: Path, regex: str, tallies: tuple[Tally, Tally, Tally], args: argparse.Namespace,
            out: Path, sweep: dict[str, Tally] | None = None) -> tuple[float | None, dict[str, float]]:
    """Trains the recipe (``--confirm diff``) on the fold's masks (``--train-masks``), or resumes its run in
    ``out``, and scores its best checkpoint on the held-out boards three times from the same forward passes:
    unconfirmed and confirmed, each at the threshold that maximises its own pixel F1 on the calibration board, and
    confirmed at the threshold ``--calibrate defect`` picks there; with ``sweep``, the confirmed maps also at every
    threshold of the defect grid and `outlined` (found at the defect threshold, drawn at the pixel one). Returns
    training minutes (None: trained earlier, in a run that did not record them) and the thresholds with their
    calibration-board figures."""
    config = recipe(data, args)
    record = out / "train_minutes.json"  # summed over the sessions that trained this run
    earlier = (json.loads(record.read_text())["minutes"] if record.exists()
               else 0.0 if not (out / "last.pt").exists() else None)
    start = time.perf_counter()
    last = load_checkpoint(out / "last.pt") if (out / "last.pt").exists() else None
    if last and last["epoch"] >= args.epochs:  # trained: fit() would register every training pair again first
        check_resumable(last, config, out / "last.pt")
        best = out / "best.pt"
    else:
        best = fit(config, out, log=lambda line: print(f"    {line}", file=sys.stderr))["best"]
    minutes = None if earlier is None else earlier + (time.perf_counter() - start) / 60
    if minutes is not None:
        record.write_text(json.dumps({"minutes": minutes}))
    ckpt = load_checkpoint(best)
    model, cfg = inference_model(ckpt)

    def both_maps(split: str, each) -> None:
        """Each pair's unconfirmed and confirmed map at native size (the recipe's view is native: scale 1)."""
        dataset = make_dataset(cfg.data, split)

        def on_pair(i: int, probs: np.ndarray, mask: np.ndarray) -> None:
            hist, cur, _ = dataset.arrays(i)
            assert hist.shape[:2] == mask.shape, "the recipe's view must be native for maps to be compared"
            each(dataset.pairs[i], probs, confirmed(probs, evidence(hist, cur)), mask)

        evaluate(model, dataset, torch.device("cpu"), cfg.data.window, on_pair=on_pair,
                 progress=f"scoring the {'calibration' if split == 'val' else 'held-out'} boards")

    calib = (PixelHistogram(), PixelHistogram())
    grid = DefectGrid()  # confirmed maps: defect F at each threshold, as `--calibrate defect` counts it

    def calibrate(pair, plain: np.ndarray, sure: np.ndarray, mask: np.ndarray) -> None:
        for h, m in zip(calib, (plain, sure)):
            h.update(torch.from_numpy(m)[None, None], torch.from_numpy(mask)[None, None])
        grid.update(sure, mask)

    both_maps("val", calibrate)
    (t_plain, f1_plain), (t_sure, f1_sure) = (h.best_f1_threshold() for h in calib)
    t_defect, f_defect = grid.best()
    print(f"  calibration board: unconfirmed F1 {f1_plain:.3f} at {t_plain:.3f}; confirmed F1 {f1_sure:.3f} at "
          f"{t_sure:.3f} (the checkpoint serves {float(ckpt['threshold']):.3f}); confirmed defect F {f_defect:.3f} "
          f"at {t_defect:.2f} (--calibrate defect)", flush=True)

    def score(pair, plain: np.ndarray, sure: np.ndarray, mask: np.ndarray) -> None:
        group, boxes = re.search(regex, pair.name).group(1), read_boxes(pair)
        tallies[0].add(group, plain >= t_plain, mask, boxes)
        tallies[1].add(group, sure >= t_sure, mask, boxes)
        tallies[2].add(group, sure >= t_defect, mask, boxes)
        if sweep is not None:
            sweep["found at the defect threshold, drawn at the pixel one"].add(
                group, outlined(sure, t_defect, t_sure), mask, boxes)
            for t in DEFECT_GRID:
                sweep[f"confirmed at {t:.2f}"].add(group, sure >= t, mask, boxes)

    both_maps("test", score)
    return minutes, {"threshold": t_plain, "calibration_f1": f1_plain, "confirmed_threshold": t_sure,
                     "confirmed_calibration_f1": f1_sure, "defect_threshold": t_defect,
                     "confirmed_calibration_defect_f": f_defect}


def claim_run(run: Path, fold: dict) -> None:
    """``run`` is this fold's: new, or made for the same held-out and calibration boards. A checkpoint cannot tell
    (every fold's view has the same path), and a model scored on boards it trained on would look like a result."""
    stamp = run / "fold.json"
    if run.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != fold):
        sys.exit(f"{run}: not a run of this fold (held out {', '.join(fold['held'])}, threshold on {fold['calibrate']}) "
                 f"by its {stamp.name}; remove it or pass another --work")
    run.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(fold))


def report(tallies: dict[str, Tally], minutes: dict[str, float], calibration: dict[str, dict[str, float]],
           args: argparse.Namespace, folds_done: int) -> None:
    """The table so far (printed after every fold: a fold takes minutes to an hour) and, with ``--json``, the file."""
    result = {m: {"rows": t.rows(), "train_minutes": minutes.get(m, 0.0)} for m, t in tallies.items()}
    print(f"\nafter {folds_done} of {len(args.folds)} folds:")
    print("| method | board | pairs | defect F (overlap) | defect F (DeepPCB rule) | recall | false alarms / pair | "
          "pixel F1 | train min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, r in result.items():
        for g, row in r["rows"].items():
            minutes_ = r["train_minutes"]
            train = "" if g != "pooled" or minutes_ == 0 else "?" if minutes_ is None else f"{minutes_:.1f}"
            print(f"| {m} | {g} | {row['pairs']} | {row['defect_f']:.3f} | {row['strict_f']:.3f} | "
                  f"{row['recall']:.3f} | {row['false_alarms']:.2f} | {row['pixel_f1']:.3f} | {train} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"folds": args.folds[:folds_done], "epochs": args.epochs, "results": result,
                                         "calibration": calibration}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an A/B layout with boxes/ (DeepPCB's trainval)")
    p.add_argument("--folds", nargs="+", default=DEEPPCB_FOLDS, help="held-out boards of each fold, comma-separated")
    p.add_argument("--group-regex", default=r"^(\d{5})", help="a pair's board: this regex's first group on its id")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--schedule", choices=list(SCHEDULES), default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-network", action="store_true", help="the differencing rows only")
    p.add_argument("--sweep", action="store_true",
                   help="also the confirmed maps at every threshold of the defect grid (0.05 to 0.95), and found at the "
                        "defect threshold but drawn at the pixel one: where between the two thresholds the targets hold")
    p.add_argument("--train-masks", choices=["shipped", "boxes"], default="shipped",
                   help="what the network learns from: the shipped masks, or masks derived from the boxes on the "
                        "registered pair (`anodfd data boxmasks`, written once under --work); scored against the "
                        "shipped masks and the boxes either way")
    p.add_argument("--augment", choices=list(AUGMENTS), default="paper",
                   help="the recipe's training augmentation; strong adds scale, shift and photometric changes")
    p.add_argument("--misregister", type=float, default=0.0,
                   help="train on histories shifted, rotated and scaled by up to this fraction after registration")
    p.add_argument("--cache-dir", default=None, help="decode cache (default $ANODFD_CACHE_DIR or ~/.cache/anodfd)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None,
                   help="keep fold views and trained runs here, reused by a rerun (default: a temporary folder)")
    args = p.parse_args()
    src = args.data.resolve()
    try:
        recipe(src, args)
    except ConfigError as e:
        sys.exit(str(e))
    if not (src / "boxes").is_dir() or not (src / "A").is_dir():
        sys.exit(f"{src}: no A/ and boxes/ folders; give --data an A/B layout that ships boxes (DeepPCB's trainval)")
    groups = {re.search(args.group_regex, x.name).group(1) for x in read_split(src, "train") + read_split(src, "val")}
    held_all = [set(f.split(",")) for f in args.folds]
    unknown = set().union(*held_all) - groups
    if unknown:
        sys.exit(f"--folds names boards {', '.join(sorted(unknown))} that {src} does not have ({', '.join(sorted(groups))})")

    lever = {**({"train_masks": "boxes"} if args.train_masks == "boxes" else {}),
             **({"augment": args.augment} if args.augment != "paper" else {}),
             **({"misregister": args.misregister} if args.misregister else {})}  # what sets this run apart
    taught = "".join(f" {'on box masks' if k == 'train_masks' else f'with --{k} {v}'}" for k, v in lever.items())
    network_rows = [f"AnoDFDNet recipe{taught}, unconfirmed", f"AnoDFDNet recipe{taught}, --confirm diff",
                    f"AnoDFDNet recipe{taught}, --confirm diff --calibrate defect"]
    methods = ["template differencing", "ECC + differencing"] + ([] if args.skip_network else network_rows)
    sweep_rows = (["found at the defect threshold, drawn at the pixel one"]
                  + [f"confirmed at {t:.2f}" for t in DEFECT_GRID]) if args.sweep and not args.skip_network else []
    tallies = {m: Tally() for m in methods + sweep_rows}
    minutes: dict[str, float | None] = defaultdict(float)
    calibration: dict[str, dict[str, float]] = {}  # per fold: thresholds and calibration-board pixel F1
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="anodfd-generalization-"))
    try:
        train_labels = None
        if args.train_masks == "boxes" and not args.skip_network:
            train_labels = work / "boxmasks"
            if not (train_labels / "done").exists():  # an interrupted derivation starts again
                shutil.rmtree(train_labels, ignore_errors=True)
                c = box_mask_dataset(src, train_labels, "ecc", ("train", "val"))
                print(f"masks from {c['boxes']} boxes of {c['pairs']} registered pairs; {c['empty_boxes']} boxes show "
                      f"no difference once registered, {c['align_failed']} pairs fell back to the identity", flush=True)
                (train_labels / "done").write_text(json.dumps(c))
        for k, held in enumerate(held_all):
            calibrate = min(groups - held)
            root = work / ("fold" if train_labels is None else "fold-boxes")  # its links resolve to --data (or
            # the box masks): the decode cache keeps registrations across folds
            fold_dataset(src, root, args.group_regex, held, calibrate, train_labels)
            print(f"fold {k + 1}/{len(held_all)}: held out {', '.join(sorted(held))}; threshold on {calibrate}",
                  flush=True)
            differencing(root, args.group_regex, tallies["template differencing"], "none")
            differencing(root, args.group_regex, tallies["ECC + differencing"], "ecc")
            if not args.skip_network:
                tag = "".join(f"{'boxes' if k == 'train_masks' else f'{k}{v}'}-" for k, v in lever.items())
                run = work / f"run-{tag}{'-'.join(sorted(held))}"
                claim_run(run, {"held": sorted(held), "calibrate": calibrate} | lever)
                spent, calibration[",".join(sorted(held))] = network(
                    root, args.group_regex, tuple(tallies[r] for r in network_rows), args, run,
                    {r: tallies[r] for r in sweep_rows} if sweep_rows else None)
                total = minutes[network_rows[0]]
                minutes[network_rows[0]] = None if spent is None or total is None else total + spent
            report(tallies, minutes, calibration, args, k + 1)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
