"""The `anodfd` command: a thin face over the library. Each subcommand parses, validates, then calls one function."""

from __future__ import annotations

import argparse
import sys

from anodfd.config import ConfigError
from anodfd.data.layouts import LAYOUTS, DatasetError


def _synth(args: argparse.Namespace) -> int:
    from anodfd.data.synthetic import parse_size, synthesize

    try:
        size = parse_size(args.size) if args.size else None
    except ValueError as e:
        raise ConfigError(f"--size {args.size!r}: {e}") from None
    out = synthesize(args.kind, args.out, pairs=args.pairs, seed=args.seed, size=size, workers=args.workers)
    print(f"wrote {out} (contact sheet: {out / 'contact_sheet.png'})")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from anodfd.data.check import check_dataset
    from anodfd.data.layouts import resolve_data_dir

    root = resolve_data_dir(dataset=args.dataset, data=args.dir, data_root=args.data_root)
    report = check_dataset(root, args.layout)
    print(report.format())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anodfd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic stand-in for one of the paper's datasets")
    p.add_argument("kind", choices=["OL", "FB", "Diff"])
    p.add_argument("--out", required=True, help="output folder (the paper's layout)")
    p.add_argument("--pairs", type=int, default=None, help="total pairs (default: the paper's count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None, help="WxH for every pair, e.g. 512x384 (default: the paper's sizes)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=_synth)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="validate a dataset: every listed file exists and decodes")
    p.add_argument("dir", nargs="?", default=None, help="dataset folder (or use --dataset)")
    p.add_argument("--dataset", default=None, help="named dataset under the data root: OL, FB or Diff")
    p.add_argument("--data-root", default=None, help="folder holding named datasets (default $ANODFD_DATA_ROOT or ./data)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto")
    p.set_defaults(func=_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DatasetError, ConfigError) as e:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"anodfd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
