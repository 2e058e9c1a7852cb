"""Does searching pay? A search against one good run of the best known recipe, at equal budget, both scored on
groups (boards) that neither the training, the ranking nor the threshold saw.

    python benchmarks/search.py --data ../shared/data/deeppcb --budget 10m --work runs/search-bench

One leave-boards-out fold of DeepPCB (`generalization.py`'s folds): ``--test-groups`` are held out for the final
score, ``--val-groups`` rank the trials and calibrate the threshold, the other boards train. Both arms run
`tune/search.py` with the paper preset's space at the tiny variant, ranked by validation defect F:
- **search**: ``--num-samples`` trials of up to ``--max-epochs`` epochs under ASHA, stopped by ``--budget``;
- **one run**: the preset's first point alone (the held-out-board recipe), for as many epochs as the search's trials
  trained in all (its cosine schedule spans them), so both spend the same training.
The registration of every pair at the recipe's view is done once before either arm (the decode cache), so neither
pays it inside its budget. Each arm's best checkpoint is scored on the held-out boards by the search's own
promotion (native resolution, at the threshold it serves with, against DeepPCB's boxes); the table compares the
registry's figures. ``--json`` keeps them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from anodfd.config import Config, with_window
from anodfd.data.dataset import make_dataset
from anodfd.evaluation import register_pairs
from anodfd.tracking import client
from tune.space import BENCHMARK_RECIPE

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [("test_box_f", "defect F (overlap)"), ("test_box_recall", "recall"),
           ("test_box_false_alarms_per_image", "false alarms / pair"), ("test_strict_f", "defect F (DeepPCB rule)"),
           ("test_f1_calibrated", "pixel F1 (served)"), ("test_auc", "pixel AUC")]


def load_generalization():
    spec = importlib.util.spec_from_file_location("generalization", ROOT / "benchmarks" / "generalization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_arm(name: str, data: Path, args: argparse.Namespace, *flags: str) -> tuple[float, str]:
    """One `tune/search.py` run; returns (wall seconds, its stdout). Its log goes to ``work/<name>.log``."""
    cmd = [sys.executable, str(ROOT / "tune" / "search.py"), "--data", str(data), "--preset", "paper", "--model", "tiny",
           "--metric", "defect_f", "--max-concurrent", "1", "--storage", str(args.work / "runs"), "--name", name,
           "--mlflow-uri", f"sqlite:///{args.work / 'mlflow.db'}", "--seed", str(args.seed), *flags]
    print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr)
    start = time.monotonic()
    with open(args.work / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
    (args.work / f"{name}.out").write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}); see {args.work / f'{name}.log'}")
    return time.monotonic() - start, proc.stdout


def epochs_trained(stdout: str) -> int:
    """The summary table's `epochs` column, summed over the search's trials."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    col = head.index("epochs")
    return sum(int(ln.strip("|").split("|")[col]) for ln in lines[1:] if not ln.startswith("|---"))


def version_tags(work: Path, dataset: str) -> dict[str, str]:
    c = client(f"sqlite:///{work / 'mlflow.db'}")
    versions = c.search_model_versions(f"name = 'anodfdnet-{dataset}'")
    return dict(max(versions, key=lambda v: int(v.version)).tags)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="DeepPCB (A/B/label/list/boxes)")
    p.add_argument("--group-regex", default=r"^(\d{5})")
    p.add_argument("--test-groups", default="20085,77000", help="boards held out for the final score")
    p.add_argument("--val-groups", default="00041", help="boards that rank trials and calibrate the threshold")
    p.add_argument("--budget", default="10m", help="the search's wall-clock budget (tune/search.py --budget)")
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("runs/search-bench"))
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    gen = load_generalization()
    held = {g for g in args.test_groups.split(",") if g}
    for arm in ("search", "single"):  # one folder per arm: each registers its own model, anodfdnet-pcb_<arm>
        gen.fold_dataset(args.data.resolve(), args.work / f"pcb_{arm}", args.group_regex, held, args.val_groups)

    # Registration at the recipe's view, once, for both arms (the decode cache keys on the files, not the folder).
    recipe = with_window(Config().with_flat({"data.data": str(args.work / "pcb_search")}), BENCHMARK_RECIPE)
    register_pairs([make_dataset(recipe.data, s, check=False) for s in ("train", "val", "test")],
                   lambda line: print(line, file=sys.stderr))

    done = args.work / "search.out"
    if done.exists():  # a rerun reuses a finished arm
        search_s, search_out = json.loads((args.work / "search.json").read_text())["seconds"], done.read_text()
    else:
        search_s, search_out = run_arm("search", args.work / "pcb_search", args, "--num-samples", str(args.num_samples),
                                       "--max-epochs", str(args.max_epochs), "--budget", args.budget)
        (args.work / "search.json").write_text(json.dumps({"seconds": search_s}))
    epochs = max(epochs_trained(search_out), 1)
    if (args.work / "single.out").exists():
        single_s = json.loads((args.work / "single.json").read_text())["seconds"]
    else:
        single_s, _ = run_arm("single", args.work / "pcb_single", args, "--num-samples", "1",
                              "--max-epochs", str(epochs), "--grace-period", str(epochs))
        (args.work / "single.json").write_text(json.dumps({"seconds": single_s}))

    rows = {"search": (search_s, epochs, version_tags(args.work, "pcb_search")),
            "one run of the recipe": (single_s, epochs, version_tags(args.work, "pcb_single"))}
    trials = len([ln for ln in search_out.splitlines() if re.match(r"\| \d+ \|", ln)])
    print(f"\nheld-out boards {args.test_groups}; ranked and calibrated on {args.val_groups}; "
          f"search: {trials} trials, {epochs} epochs in all, budget {args.budget}\n")
    print("| arm | wall minutes | epochs | " + " | ".join(h for _, h in COLUMNS) + " | served threshold | trial |")
    print("|---|---|---|" + "---|" * len(COLUMNS) + "---|---|")
    for name, (seconds, n, tags) in rows.items():
        cells = [f"{float(tags[k]):.3f}" if k in tags else "-" for k, _ in COLUMNS]
        print(f"| {name} | {seconds / 60:.1f} | {n} | " + " | ".join(cells)
              + f" | {float(tags['served_threshold']):.3f} | {tags.get('trial', '-')} |")
    print("\nthe search's trials:\n" + "\n".join(ln for ln in search_out.splitlines() if ln.startswith("|")))
    if args.json:
        args.json.write_text(json.dumps({k: {"seconds": s, "epochs": n, "tags": t} for k, (s, n, t) in rows.items()},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
