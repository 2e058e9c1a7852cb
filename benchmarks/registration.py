"""Registration (`--align ecc`) on real pairs: fallbacks to the identity and agreement under a known shift, per group.

    python benchmarks/registration.py --data ../shared/data/deeppcb

Every pair of an A/B layout (A = history, B = current) is registered twice: as given, and after its history was
warped by a seeded random homography (corners moved up to ``--shift`` of the side; `random_homography` drawn pair
by pair in file order from ``default_rng(--seed)``). A pair *agrees* when the shifted pair's homography equals the
known one composed with the pair's own registration as given, within ``--tolerance`` px at every image corner; a
fallback on either side counts as a miss. Pairs as shipped are themselves a few pixels off, so the truth is not the
identity. Rows are groups (``--group-regex`` on the id: DeepPCB's first five digits name the board) and all pairs;
the OpenCV version heads the table, since registration has differed between releases.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from anodfd.data.align import register
from anodfd.data.cache import read_rgb
from anodfd.data.shift import random_homography, shift_image


def corners_apart(a: np.ndarray, b: np.ndarray, w: int, h: int) -> float:
    """Largest distance in px between where ``a`` and ``b`` map the image's four corners."""
    corners = np.float64([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]])
    pa, pb = corners @ a.T, corners @ b.T
    return float(np.abs(pa[:, :2] / pa[:, 2:] - pb[:, :2] / pb[:, 2:]).max())


def measure(data: Path, shift: float, seed: int, group_regex: str, tolerance: float, limit: int | None,
            method: str = "ecc", every: int = 1) -> dict:
    ids = sorted(p.stem for p in (data / "A").iterdir() if p.is_file())[::every][:limit]
    if not ids:
        sys.exit(f"{data / 'A'}: no images; give --data an A/B folder (history in A/, current in B/)")
    rng = np.random.default_rng(seed)
    rows: dict[str, dict] = defaultdict(lambda: {"pairs": 0, "fallback_given": 0, "fallback_shifted": 0,
                                                 "agree": 0, "seconds": 0.0})
    failures = []
    for pair_id in tqdm(ids, desc=f"registering ({method}, OpenCV {cv2.__version__})", unit="pair"):
        hist = read_rgb(next((data / "A").glob(f"{pair_id}.*")))
        cur = read_rgb(next((data / "B").glob(f"{pair_id}.*")))
        h, w = cur.shape[:2]
        known = random_homography(w, h, shift, rng)
        given, shifted = register(hist, cur, method), register(shift_image(hist, known), cur, method)
        match = re.match(group_regex, pair_id)
        row = rows[match.group(1) if match else "(no group)"]
        row["pairs"] += 1
        row["seconds"] += given.seconds + shifted.seconds
        row["fallback_given"] += not given.ok
        row["fallback_shifted"] += not shifted.ok
        agree = given.ok and shifted.ok and corners_apart(shifted.matrix, known @ given.matrix, w, h) <= tolerance
        row["agree"] += agree
        for name, r in (("given", given), ("shifted", shifted)):
            if not r.ok:
                failures.append({"id": pair_id, "as": name, "reason": r.reason})
    total = {k: sum(r[k] for r in rows.values()) for k in ("pairs", "fallback_given", "fallback_shifted", "agree",
                                                           "seconds")}
    return {"opencv": cv2.__version__, "method": method, "shift": shift, "seed": seed, "tolerance_px": tolerance,
            "groups": dict(sorted(rows.items())), "all": total, "failures": failures}


def table(result: dict) -> str:
    lines = [f"OpenCV {result['opencv']}, {result['method']}, shift {result['shift']:.0%}, seed {result['seed']}",
             "", ("| group | pairs | fallbacks as given | fallbacks shifted | agree within "
             f"{result['tolerance_px']:g} px | s per registration |"), "|---|---|---|---|---|---|"]
    for name, r in [*result["groups"].items(), ("all", result["all"])]:
        lines.append(f"| {name} | {r['pairs']} | {r['fallback_given']} | {r['fallback_shifted']} | "
                     f"{r['agree'] / r['pairs']:.1%} | {r['seconds'] / (2 * r['pairs']):.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="an A/B layout: A/ history, B/ current")
    p.add_argument("--method", default="ecc", choices=["ecc", "features"])
    p.add_argument("--shift", type=float, default=0.02, help="corners moved up to this fraction of the side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-regex", default=r"^(\d{5})", help="the group is this regex's first group on the id")
    p.add_argument("--tolerance", type=float, default=1.0, help="px at every corner for two registrations to agree")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    p.add_argument("--every", type=int, default=1, help="only every Nth pair (a quick sample across groups)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()
    if not (args.data / "A").is_dir() or not (args.data / "B").is_dir():
        sys.exit(f"{args.data}: no A/ and B/ folders; give --data an A/B layout (history in A/, current in B/)")
    start = time.perf_counter()
    result = measure(args.data, args.shift, args.seed, args.group_regex, args.tolerance, args.limit, args.method,
                     args.every)
    print(table(result))
    print(f"\n{len(result['failures'])} fallbacks; {time.perf_counter() - start:.0f} s")
    for f in result["failures"]:
        print(f"  {f['id']} ({f['as']}): {f['reason']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
