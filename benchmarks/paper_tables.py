"""The paper's tables on your data: Table 1 (every method, one budget, one seed) and Table 3 (AnoDFDNet's
Transformer depth), plus one ROC plot with every method's curve.

    python benchmarks/paper_tables.py --data data/OL --epochs 8 --image-size 128
    python benchmarks/paper_tables.py --data ../shared/data/deeppcb --epochs 6 --image-size 256

Each trained cell is one Ray Train run (`train_on_ray`), logged to MLflow as a child of one parent run; the
tables (Markdown and CSV) and `roc.png` are written to --out and logged to the parent run. Every method gets
the same config (epochs, batch, learning rate, image size, augmentation, seed); only `model.name` and
`model.depth` change. Models are scored on the test split at the paper's fixed threshold 0.5 with the
checkpoint of best validation F1; a dataset without a test split (DeepPCB's A/B/label layout) is scored on its
validation split with the last checkpoint, so nothing is selected on the data it is scored on.

Table 1 also has a row with no training: template differencing, |current - history| in grey, a 3x3
morphological opening, and the threshold that maximises F1 on the train split.

Rerunning with the same --out reuses the cells already finished (`cells/*.json`) and trains only the rest.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from anodfd import tracking
from anodfd.checkpoint import load_checkpoint, model_from_checkpoint
from anodfd.config import BASELINE_NAMES, DEPTHS, MODEL_NAMES, Config, ConfigError
from anodfd.data.dataset import make_dataset
from anodfd.data.layouts import DatasetError, available_splits, resolve_data_dir
from anodfd.evaluation import evaluate_split
from anodfd.metrics import PixelHistogram, plot_roc
from anodfd.model import count_parameters
from anodfd.scoring import template_difference
from anodfd.train.launch import RayOptions, train_on_ray

TEMPLATE_DIFF = "template-diff"
COLUMNS = ("precision", "recall", "oa", "f1", "iou", "auc")
HEADERS = {"precision": "Pre", "recall": "Re", "oa": "OA", "f1": "F1", "iou": "IoU", "auc": "AUC"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder (paper or A/B/label layout)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="DDP workers of each Ray Train run")
    p.add_argument("--anodfd-model", default="resnet18", choices=[n for n in MODEL_NAMES if n not in BASELINE_NAMES],
                   help="the AnoDFDNet variant (default resnet18: the baselines' encoder)")
    p.add_argument("--methods", nargs="+", default=[*BASELINE_NAMES, TEMPLATE_DIFF],
                   choices=[*BASELINE_NAMES, TEMPLATE_DIFF], help="Table 1 rows besides AnoDFDNet")
    p.add_argument("--depths", nargs="+", type=int, default=list(DEPTHS), choices=DEPTHS, help="Table 3 rows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help="0 = whole epochs")
    p.add_argument("--out", default=None, help="results folder (default runs/tables-<data>-<size>px)")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--experiment", default="anodfd-tables")
    return p.parse_args(argv)


def base_config(args: argparse.Namespace, data_dir: Path) -> Config:
    return Config().with_flat({
        "data.data": str(data_dir), "data.resize": args.image_size, "model.image_size": args.image_size,
        "model.name": args.anodfd_model, "train.epochs": args.epochs, "train.batch_size": args.batch_size,
        "train.lr": args.lr, "train.seed": args.seed, "train.max_steps_per_epoch": args.max_steps_per_epoch,
        "train.bce_weight": 1.0, "train.dice_weight": 1.0,
    })


def cells(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(model name, depth) of every run to train: Table 1's AnoDFDNet row is Table 3's depth-2 row."""
    wanted = [(args.anodfd_model, d) for d in sorted(set(args.depths) | {2})]
    return wanted + [(m, 0) for m in args.methods if m != TEMPLATE_DIFF]


def cell_name(model: str, depth: int) -> str:
    return f"{model}-d{depth}" if model not in BASELINE_NAMES else model


def score_split(data_dir: Path, layout: str) -> tuple[str, bool]:
    """(split to score on, whether it is a separate test split)."""
    if "test" in available_splits(data_dir, layout):
        return "test", True
    return "val", False


def train_cell(config: Config, args: argparse.Namespace, out: Path, uri: str, parent: str, split: str,
               separate_test: bool) -> dict:
    """One Ray Train run, scored on ``split``; its result (with the pixel histogram) is saved as JSON."""
    name = cell_name(config.model.name, config.model.depth)
    saved = out / "cells" / f"{name}.json"
    if saved.is_file():
        print(f"[{name}] done earlier: {saved}")
        return json.loads(saved.read_text())
    opts = RayOptions(workers=args.workers, cpus_per_worker=1.0 if args.workers == 1 else 0.9,
                      storage=str(out / "runs"), name=name, mlflow_uri=uri, experiment=args.experiment, keep=1)
    start = time.time()
    outcome = train_on_ray(config, opts, tags={"anodfd.kind": "tables", "anodfd.cell": name}, parent_run_id=parent)
    checkpoint = Path(outcome.run_dir) / ("best.pt" if separate_test else "last.pt")
    model, cfg = model_from_checkpoint(load_checkpoint(checkpoint))
    pixels, _, _ = evaluate_split(model, cfg.data, split)
    metrics = pixels.compute(0.5)
    result = {"method": name, "model": config.model.name, "depth": config.model.depth, "split": split,
              "checkpoint": str(checkpoint), "minutes": (time.time() - start) / 60,
              **{k: metrics[k] for k in COLUMNS}, "params": count_parameters(model), "hist": pixels.state().tolist()}
    tracking.log_metrics(uri, outcome.mlflow_run_id, {f"{split}_{k}": result[k] for k in COLUMNS}, step=0)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result))
    print(f"[{name}] {split} F1 {result['f1']:.4f} IoU {result['iou']:.4f} AUC {result['auc']:.4f} "
          f"({result['minutes']:.1f} min)")
    return result


def markdown(rows: list[dict], first: str) -> str:
    head = [first, *[HEADERS[c] for c in COLUMNS], "params", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        params = f"{r['params'] / 1e6:.1f} M" if r.get("params") else "-"
        minutes = f"{r['minutes']:.1f}" if r.get("minutes") else "-"
        lines.append("| " + " | ".join([r["label"], *[f"{r[c]:.3f}" for c in COLUMNS], params, minutes]) + " |")
    return "\n".join(lines)


def write_table(rows: list[dict], out: Path, stem: str, first: str) -> list[Path]:
    (out / f"{stem}.md").write_text(markdown(rows, first) + "\n")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["label", *COLUMNS, "params", "minutes", "split"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return [out / f"{stem}.md", out / f"{stem}.csv"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data_dir = resolve_data_dir(data=args.data)
        config = base_config(args, data_dir)
        uri = tracking.resolve_tracking_uri(args.mlflow_uri)
        tracking.check_tracking(uri)
        make_dataset(config.data, "train")  # the data is checked before anything trains
        split, separate_test = score_split(data_dir, config.data.layout)
    except (ConfigError, DatasetError) as e:
        print(f"paper_tables: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/tables-{data_dir.name}-{args.image_size}px").resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = cells(args)
    print(f"{len(todo)} Ray Train runs of {args.epochs} epochs at {args.image_size}px on {data_dir}, scored on "
          f"its {split} split" + ("" if separate_test else " (no test split: last checkpoint, no selection)"))
    parent, _ = tracking.start_run(uri, config, str(out), f"tables-{data_dir.name}", args.experiment,
                                   tags={"anodfd.kind": "tables", "anodfd.dataset": data_dir.name})

    results = {}
    for i, (model, depth) in enumerate(todo, 1):
        print(f"\n=== cell {i}/{len(todo)}: {cell_name(model, depth)} ===", flush=True)
        r = train_cell(config.with_flat({"model.name": model, "model.depth": depth}), args, out, uri, parent,
                       split, separate_test)
        results[(model, depth)] = r

    curves: dict[str, PixelHistogram] = {}
    anodfd = results[(args.anodfd_model, 2)]
    table1 = [{**anodfd, "label": f"AnoDFDNet ({args.anodfd_model}, depth 2)"}]
    for m in args.methods:
        if m == TEMPLATE_DIFF:
            hist, threshold = template_difference(config.data, split, native=False)
            metrics = hist.compute(threshold)
            r = {"label": f"template differencing (threshold {threshold:.3f})", "params": 0, "minutes": 0,
                 "split": split, **{k: metrics[k] for k in COLUMNS}}
            curves["template differencing"] = hist
        else:
            r = {**results[(m, 0)], "label": m}
        table1.append(r)
    for r in table1:
        if "hist" in r:
            curves[r["label"]] = PixelHistogram.from_state(torch.tensor(r["hist"]))
    table3 = [{**results[(args.anodfd_model, d)], "label": f"depth {d}"} for d in sorted(args.depths)]

    files = write_table(table1, out, "table1", "method")
    files += write_table(table3, out, "table3", f"AnoDFDNet ({args.anodfd_model})")
    files.append(plot_roc(curves, out / "roc.png", title=f"{data_dir.name}, {split} split, {args.image_size}px"))
    for f in files:
        tracking.log_file(uri, parent, f, "tables")
    tracking.end_run(uri, parent)
    print(f"\nTable 1 ({split} split, threshold 0.5; template differencing at its own threshold)\n"
          f"{markdown(table1, 'method')}\n\nTable 3\n{markdown(table3, 'AnoDFDNet (' + args.anodfd_model + ')')}\n"
          f"\nwritten to {out}; MLflow parent run {parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
