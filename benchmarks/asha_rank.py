"""Does a trial's rank after its first epochs predict its rank at the end? The measurement behind --grace-period.

ASHA (reduction factor 2) stops a trial at epoch g, 2g, 4g, ... when it is not in the top half of the trials seen at
that epoch. That only pays if the early rank predicts the final one. This runs one search with early stopping off
(`--grace-period` = `--max-epochs`), so every trial trains every epoch, then reports for each epoch k:
- Spearman's rank correlation between the trials' metric at epoch k and their final score (the best over all
  epochs: what the search ranks and registers by);
- whether the trial that wins in the end is in the top half at epoch k (ASHA at grace period k keeps it);
- how many of the final top quarter are in the top half at epoch k.

    python benchmarks/asha_rank.py --data data/OL --num-samples 8 --max-epochs 8 --out docs/results/asha-rank.md
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scipy.stats import spearmanr  # installed with albumentations and MLflow

from tune.search import SEARCH_PRESETS, trial_id_of

ROOT = Path(__file__).resolve().parents[1]


def read_trials(search_dir: Path, metric: str) -> dict[str, list[float]]:
    """Each trial's metric by epoch (index 0 = epoch 1), from Tune's progress.csv in the trial's folder."""
    trials = {}
    for progress in sorted(search_dir.glob("run_trial_*/progress.csv")):
        with open(progress) as f:
            rows = sorted(csv.DictReader(f), key=lambda r: int(r["epoch"]))
        values = [float(r[metric]) if r[metric] not in ("", "nan") else math.nan for r in rows]
        trials[trial_id_of(progress.parent.name)] = values
    return trials


def rank_table(trials: dict[str, list[float]]) -> list[dict]:
    """Per epoch: the rank correlation with the final score, and who of the final best survives a halving there."""
    # Trials that trained every epoch with finite scores (a failed or cut one has nothing to compare at the end).
    epochs = max(len(v) for v in trials.values())
    full = {t: v for t, v in trials.items() if len(v) == epochs and all(math.isfinite(x) for x in v)}
    final = {t: max(v) for t, v in full.items()}
    winner = max(final, key=final.get)
    quarter = sorted(final, key=final.get, reverse=True)[:max(1, len(final) // 4)]
    rows = []
    for k in range(1, epochs + 1):
        at_k = {t: v[k - 1] for t, v in full.items()}
        half = set(sorted(at_k, key=at_k.get, reverse=True)[:max(1, len(at_k) // 2)])
        rho = float(spearmanr([at_k[t] for t in full], [final[t] for t in full]).statistic) if len(full) >= 3 else math.nan
        rows.append({"epoch": k, "spearman": rho,
                     "winner_kept": winner in half, "top_quarter_kept": sum(t in half for t in quarter),
                     "top_quarter": len(quarter)})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder (the search's --data)")
    p.add_argument("--preset", default="smoke")
    p.add_argument("--metric", default=None, help="the search's --metric (default: the preset's)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", default=None, help="search folder parent (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the table as Markdown here")
    p.add_argument("extra", nargs="*", help="more flags for tune/search.py, after --")
    args = p.parse_args(argv)
    if args.num_samples < 3 or args.max_epochs < 2:
        p.error("a rank needs 3 or more trials, and a trend 2 or more epochs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    storage = Path(args.storage or tempfile.mkdtemp(prefix="asha-rank-")).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    name = f"asha-rank-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, str(ROOT / "tune" / "search.py"), "--data", args.data, "--preset", args.preset,
           "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
           "--grace-period", str(args.max_epochs), "--seed", str(args.seed), "--storage", str(storage),
           "--name", name, "--mlflow-uri", f"sqlite:///{storage / 'mlflow.db'}", *args.extra]
    if args.metric:
        cmd += ["--metric", args.metric]
    print("running:", " ".join(cmd), flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        print(f"the search failed (exit {proc.returncode}); its output is above", file=sys.stderr)
        return proc.returncode
    metric = args.metric or SEARCH_PRESETS[args.preset]["metric"]
    trials = read_trials(storage / name, metric)
    rows = rank_table(trials)
    summary = (f"{len(trials)} trials of {args.max_epochs} epochs, no early stopping, ranked by validation {metric}; "
               f"{time.monotonic() - started:.0f} s")
    head = ("| epoch k | Spearman (metric at k vs final best) | final winner in top half at k | "
            "final top quarter in top half at k |")
    lines = [summary, "", head, "|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['spearman']:.2f} | {'yes' if r['winner_kept'] else 'no'} | "
              f"{r['top_quarter_kept']} of {r['top_quarter']} |" for r in rows]
    lines += ["", "| trial | " + " | ".join(f"epoch {k}" for k in range(1, len(rows) + 1)) + " |",
              "|---|" + "---|" * len(rows)]
    lines += [f"| {t} | " + " | ".join(f"{x:.3f}" for x in v[:len(rows)]) + " |" for t, v in sorted(trials.items())]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
