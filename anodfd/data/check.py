"""`anodfd data check`: decode every listed file once and summarise the dataset."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from anodfd.data.cache import read_mask
from anodfd.data.layouts import (
    SPLITS,
    DatasetError,
    detect_layout,
    group_of,
    image_size,
    list_path,
    read_split,
)


@dataclass
class CheckReport:
    root: Path
    layout: str
    pairs: dict[str, int] = field(default_factory=dict)  # split -> pairs
    sizes: Counter = field(default_factory=Counter)  # (w, h) of current images -> count
    anomaly_fraction: dict[str, float] = field(default_factory=dict)  # split -> anomalous pixel fraction
    normal_pairs: dict[str, int] = field(default_factory=dict)  # split -> pairs with an empty mask
    groups: dict[str, Counter] = field(default_factory=dict)  # split -> group -> pairs (with --group-regex)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [f"dataset {self.root} (layout {self.layout})"]
        for split, n in self.pairs.items():
            frac = self.anomaly_fraction.get(split, float("nan"))
            lines.append(
                f"  {split:5s} {n:6d} pairs, {self.normal_pairs.get(split, 0)} normal, "
                f"anomalous pixels {100 * frac:.3f}%"
            )
        for split, counts in self.groups.items():
            lines.append(f"  {split:5s} groups: " + ", ".join(f"{g} ({n})" for g, n in sorted(counts.items())))
        common = ", ".join(f"{w}x{h} ({c})" for (w, h), c in self.sizes.most_common(5))
        more = f" and {len(self.sizes) - 5} more" if len(self.sizes) > 5 else ""
        lines.append(f"  current image sizes: {common}{more}")
        lines += [f"  note: {n}" for n in self.notes]
        shown = self.errors[:20]
        lines += [f"  error: {e}" for e in shown]
        if len(self.errors) > len(shown):
            lines.append(f"  ... and {len(self.errors) - len(shown)} more errors")
        lines.append("OK" if self.ok else f"FAILED: {len(self.errors)} problem(s)")
        return "\n".join(lines)


def check_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image that is whole (`image_size`: header and end marker) and decodes, or one
    `DatasetError` naming it. The decode is grey at an eighth of the size: it reads all the data for a fraction
    of a full decode's time."""
    size = image_size(path)
    if cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
        raise DatasetError(f"{path}: OpenCV could not decode this image; replace the file")
    return size


def check_dataset(root: str | Path, layout: str = "auto", val_fraction: float = 0.2,
                  allow_normal_only: bool = False, group_regex: str = "", val_groups: str = "") -> CheckReport:
    """Every listed file must exist, have a sane header and decode, and every split must hold anomalous pixels
    (unless ``allow_normal_only``: a split of normal pairs on purpose); every problem is collected, not just one.
    With ``group_regex``, pairs are counted per group and split, and a note warns when validation shares every
    one of its groups with train: it then measures only groups the model trained on."""
    root = Path(root).resolve()
    layout = detect_layout(root, layout)
    report = CheckReport(root=root, layout=layout)
    if not list_path(root, "val", layout).is_file():
        report.notes.append(f"no validation list: val is a deterministic {val_fraction:.0%} of train")
    for split in SPLITS:
        if split == "test" and not list_path(root, "test", layout).is_file():
            report.notes.append("no test list")
            continue
        try:
            pairs = read_split(root, split, layout, val_fraction, group_regex, val_groups)
            if group_regex:
                report.groups[split] = Counter(group_of(p, group_regex) for p in pairs)
        except DatasetError as e:
            report.errors.append(str(e))
            continue
        report.pairs[split] = len(pairs)
        anomalous = total = normal = 0
        for p in pairs:
            try:
                cur_size = check_image(p.cur)
                check_image(p.hist)
                if image_size(p.mask) != cur_size:
                    raise DatasetError(f"{p.mask}: mask size differs from its current image {p.cur}")
                m = read_mask(p.mask)
            except DatasetError as e:
                report.errors.append(str(e))
                continue
            report.sizes[cur_size] += 1
            positive = int(np.count_nonzero(m))
            anomalous += positive
            total += m.size
            normal += positive == 0
        report.anomaly_fraction[split] = anomalous / max(total, 1)
        report.normal_pairs[split] = normal
        if total and not anomalous and not allow_normal_only:
            report.errors.append(
                f"{split}: not one anomalous pixel in its {len(pairs)} masks. Masks are read as grey 0/255, class "
                "indices (any non-zero) or colour (any channel at half its range or more); if this split is normal "
                "on purpose, pass --allow-normal-only")
    if {"train", "val"} <= set(report.groups) and set(report.groups["val"]) <= set(report.groups["train"]):
        report.notes.append("warning: validation shares every group with train ("
                            f"{', '.join(sorted(report.groups['val']))}), so it measures only groups the model trained "
                            "on; hold whole groups out with --val-groups (or drop the validation list)")
    return report
