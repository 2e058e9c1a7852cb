"""`anodfd score` (Ray Data, an actor pool) against `anodfd predict` (one process) on the same pairs, in one run.

    python benchmarks/bench_score.py --checkpoint runs/resolution/deeppcb/crop-align-ecc/best.pt \\
        --hist ../shared/data/deeppcb/A --cur ../shared/data/deeppcb/B --pairs 200 --repeats 3
    python benchmarks/bench_score.py --checkpoint CKPT --data data/OL-2048-200 --pairs 200 --repeats 3

Each repeat runs both commands as a user would, as fresh processes writing into fresh folders, alternating which
goes first; the wall time includes starting the process, loading the model and (for `score`) starting Ray. It
reports pairs per second as the median and range over the repeats, and checks that both wrote the same maps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--hist", help="folder of history images")
    p.add_argument("--cur", help="folder of current images (same file names)")
    p.add_argument("--data", help="instead of --hist/--cur: a dataset in the paper's layout (pair folders with "
                                  "hist.* and cur.*)")
    p.add_argument("--pairs", type=int, default=200, help="the first N pairs by file name")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench_score.json")
    args = p.parse_args(argv)
    if not args.data and not (args.hist and args.cur):
        p.error("give --hist and --cur, or --data")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if args.data:  # pair folders -> (name, history, current)
        found = [(d.name + c.suffix, next(d.glob("hist.*")), c) for d in sorted(Path(args.data).iterdir())
                 for c in d.glob("cur.*")]
    else:
        found = [(f.name, Path(args.hist) / f.name, f) for f in sorted(Path(args.cur).iterdir())
                 if (Path(args.hist) / f.name).is_file()]
    found = found[:args.pairs]
    names = [n for n, _, _ in found]
    times: dict[str, list[float]] = {"predict": [], "score": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "A").mkdir()
        (tmp / "B").mkdir()
        for name, hist, cur in found:  # the chosen pairs only, as symlinks
            (tmp / "A" / name).symlink_to(hist.resolve())
            (tmp / "B" / name).symlink_to(cur.resolve())
        model = ["--checkpoint", args.checkpoint, "--hist", str(tmp / "A"), "--cur", str(tmp / "B")]
        for r in range(args.repeats):
            for cmd in (("predict", "score") if r % 2 == 0 else ("score", "predict")):
                seconds = run([sys.executable, "-m", "anodfd", cmd, *model, "--out", str(tmp / f"{cmd}{r}")])
                times[cmd].append(seconds)
                print(f"repeat {r + 1}: {cmd} {len(names)} pairs in {seconds:.1f} s "
                      f"({len(names) / seconds:.2f} pairs/s)", flush=True)
        worst = max(
            int(np.abs(cv2.imread(str(tmp / "predict0" / f"{Path(n).stem}_map.png"), cv2.IMREAD_GRAYSCALE).astype(int)
                       - cv2.imread(str(tmp / "score0" / f"{Path(n).stem}_map.png"), cv2.IMREAD_GRAYSCALE)).max())
            for n in names)

    rate = {k: [len(names) / t for t in v] for k, v in times.items()}
    speedups = [p / s for p, s in zip(times["predict"], times["score"])]
    report = {
        "pairs": len(names), "checkpoint": args.checkpoint, "repeats": args.repeats, "seconds": times,
        "pairs_per_s": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in rate.items()},
        "speedup": {"median": statistics.median(speedups), "min": min(speedups), "max": max(speedups)},
        "max_map_difference_8bit": worst,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for k, v in report["pairs_per_s"].items():
        print(f"{k:8s} {v['median']:.2f} pairs/s (range {v['min']:.2f}-{v['max']:.2f})")
    s = report["speedup"]
    print(f"score / predict: {s['median']:.2f}x (range {s['min']:.2f}-{s['max']:.2f}); maps differ by at most "
          f"{worst} of 255; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
