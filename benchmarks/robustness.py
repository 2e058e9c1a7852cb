"""Pixel F1 against viewpoint shift: differencing and AnoDFDNet, with and without registration (`--align`).

    python benchmarks/robustness.py --data ../shared/data/deeppcb --epochs 6
    anodfd synth FB --out data/FB-384 --pairs 120 --size 384x288 --seed 1
    python benchmarks/robustness.py --data data/FB-384 --epochs 6

The validation split is copied by `anodfd data shift` at each shift (history corners moved up to 0.5%, 1%, 2%
and 4% of the side, with brightness, contrast and noise changed; 0% changes only those), and every method is
scored on each copy and on the untouched pairs ("aligned"), at the masks' native resolution. Rows:
- template differencing (grey |current - history|, 3x3 opening), threshold fitted on the train split;
- ECC registration (`anodfd.data.align`, as `--align ecc` does it) then the same differencing;
- AnoDFDNet `tiny` trained on the (aligned) train split with `--align none`, `--align none --misregister 0.02`,
  `--align ecc` and `--align ecc --misregister 0.005` (a small residual misregistration), all with the same budget
  (epochs, steps, batch of `--resize 256` pairs, seed), scored with their last epoch's weights at threshold 0.5.
`--checkpoints` adds rows for models trained elsewhere (another view or budget). Also the time per pair of each
registration method. The table is printed; the JSON and a plot (F1 against
shift) land in `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from anodfd.checkpoint import load_checkpoint, model_from_checkpoint
from anodfd.config import PRESETS, Config, with_window
from anodfd.data.align import align_pair
from anodfd.data.cache import read_mask, read_rgb
from anodfd.data.dataset import make_dataset
from anodfd.data.layouts import load_split
from anodfd.data.shift import shift_dataset
from anodfd.evaluation import evaluate
from anodfd.metrics import PixelHistogram
from anodfd.scoring import difference_map, template_difference
from anodfd.train.loop import fit

SHIFTS = (0.0, 0.005, 0.01, 0.02, 0.04)
NETWORKS = {
    "AnoDFDNet --align none": {"data.align": "none"},
    "AnoDFDNet --align none --misregister 0.02": {"data.align": "none", "data.misregister": 0.02},
    "AnoDFDNet --align ecc": {"data.align": "ecc"},
    "AnoDFDNet --align ecc --misregister 0.005": {"data.align": "ecc", "data.misregister": 0.005},
}


def columns(data: Path, out: Path, split: str) -> dict[str, Path]:
    """Column name -> dataset folder: the untouched pairs, then one shifted copy of ``split`` per shift."""
    cols = {"aligned": data}
    for shift in SHIFTS:
        dst = out / "shifted" / f"{shift:g}"
        if not (dst / "shift.json").exists():
            shift_dataset(data, dst, shift, photometric_change=True, seed=0, splits=(split,))
        cols[f"{shift:.1%}"] = dst
    return cols


def differencing(data_dir: Path, split: str, threshold: float, align: str) -> float:
    """Pixel F1 at ``threshold`` of differencing after registering with ``align``."""
    pixels = PixelHistogram()
    for pair in load_split(data_dir, split):
        history, current, mask = read_rgb(pair.hist), read_rgb(pair.cur), read_mask(pair.mask)
        history, _, _ = align_pair(history, current, align)
        probs = difference_map(history, current)
        if probs.shape != mask.shape:
            probs = cv2.resize(probs, mask.shape[::-1], interpolation=cv2.INTER_LINEAR)
        pixels.update(torch.from_numpy(probs), torch.from_numpy(mask))
    return pixels.compute(threshold)["f1"]


def network_f1(model: torch.nn.Module, config: Config, data_dir: Path, split: str) -> float:
    data = config.with_flat({"data.data": str(data_dir)}).data
    pixels, _, _ = evaluate(model, make_dataset(data, split), torch.device("cpu"), data.window,
                            progress=f"{data.align} on {data_dir.name}")
    return pixels.compute(0.5)["f1"]


def registration_seconds(data_dir: Path, split: str, method: str) -> float:
    """Mean seconds to register one pair at native size with ``method``."""
    times = []
    for pair in load_split(data_dir, split):
        history, current = read_rgb(pair.hist), read_rgb(pair.cur)
        start = time.perf_counter()
        align_pair(history, current, method)
        times.append(time.perf_counter() - start)
    return float(np.mean(times))


def run(args: argparse.Namespace) -> dict:
    data = Path(args.data).resolve()
    out = Path(args.out) / data.name
    out.mkdir(parents=True, exist_ok=True)
    cols = columns(data, out, args.split)
    base = Config().with_flat({**PRESETS["smoke"], "data.data": str(data), "model.name": "tiny",
                               "train.epochs": args.epochs, "train.max_steps_per_epoch": args.steps,
                               "train.batch_size": args.batch_size, "train.seed": args.seed, "data.augment": "paper"})
    _, threshold = template_difference(base.data, args.split)  # fitted on train
    rows = []
    for name, align in (("template differencing", "none"), ("ECC registration + differencing", "ecc")):
        row = {"method": name}
        for col, folder in cols.items():
            row[col] = differencing(folder, args.split, threshold, align)
        rows.append(row)
        print(row, flush=True)
    for name, overrides in NETWORKS.items():
        config = with_window(base, {"data.resize": 256, **overrides})
        run_dir = out / name.split(" ", 1)[1].replace("--", "").replace(" ", "_")
        start = time.time()
        fit(config, run_dir)
        row = {"method": name, "train_minutes": (time.time() - start) / 60}
        model, _ = model_from_checkpoint(load_checkpoint(run_dir / "last.pt"))
        for col, folder in cols.items():
            row[col] = network_f1(model, config, folder, args.split)
        rows.append(row)
        print(row, flush=True)
    for checkpoint in args.checkpoints:  # models trained elsewhere (another view, budget), scored on every column
        model, config = model_from_checkpoint(load_checkpoint(checkpoint))
        row = {"method": f"{checkpoint} ({config.data.window} px windows, --align {config.data.align})"}
        for col, folder in cols.items():
            row[col] = network_f1(model, config, folder, args.split)
        rows.append(row)
        print(row, flush=True)
    timing = {m: registration_seconds(cols["2.0%"], args.split, m) for m in ("ecc", "features")}
    budget = (f"tiny, {args.epochs} epochs" + (f" of {args.steps} steps" if args.steps else "") +
              f", batch {args.batch_size} of 256x256 pairs, seed {args.seed}, {torch.get_num_threads()} CPU threads")
    result = {"dataset": data.name, "split": args.split, "budget": budget, "rows": rows,
              "registration_seconds_per_pair": timing, "columns": list(cols)}
    (out / "robustness.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "robustness.png")
    return result


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shifts = [100 * s for s in SHIFTS]
    for row in result["rows"]:
        ax.plot(shifts, [row[f"{s:.1%}"] for s in SHIFTS], marker="o", label=row["method"])
    ax.set_xlabel("history corners moved, % of the side (with photometric change)")
    ax.set_ylabel("pixel F1 (native masks)")
    ax.set_title(f"{result['dataset']}, {result['split']} split")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(result: dict) -> None:
    cols = result["columns"]
    print(f"\n{result['dataset']}, {result['split']} split, pixel F1 at native size; {result['budget']}\n")
    print("| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in result["rows"]:
        print(f"| {row['method']} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    timing = result["registration_seconds_per_pair"]
    print("\nregistration, ms per pair at native size: " + ", ".join(f"{m} {1000 * s:.0f}" for m, s in timing.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a dataset folder with train and val splits")
    p.add_argument("--split", default="val")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=0, help="max steps per epoch (0 = whole epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/robustness")
    p.add_argument("--checkpoints", nargs="*", default=[],
                   help="also score these checkpoints on every column (e.g. native-crop models)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)  # registration timed on one core, as the target states
    print_table(run(args))


if __name__ == "__main__":
    main()
