"""Find the pairs of a dataset on disk, in the layouts their owners use, and validate them cheaply.

Two layouts:
- ``paper``: the official AnoDFDNet layout. Split lists ``train.txt``, ``validation.txt``, ``test.txt`` at the
  root, each line ``cur,hist,gt`` with paths relative to the root, often written on Windows with backslashes.
- ``abl``: the common change-detection layout (LEVIR-CD, DeepPCB): ``A/`` history, ``B/`` current, ``label/``
  masks, and ``list/{train,val,test}.txt`` with one id a line.

Every problem is raised as one `DatasetError` that names the file (and line) and says how to fix it, before any
training starts. Validation reads list files and image headers only; nothing is decoded and nothing written.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

SPLITS = ("train", "val", "test")
NAMED_DATASETS = ("OL", "FB", "Diff")
LAYOUTS = ("auto", "paper", "abl")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SYNTH_HINT = "anodfd synth {name} --out {path}"

_PAPER_LISTS = {"train": "train.txt", "val": "validation.txt", "test": "test.txt"}
_ABL_LISTS = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}


class DatasetError(ValueError):
    """A dataset problem, phrased for the person who has to fix it."""


@dataclass(frozen=True)
class Pair:
    hist: Path
    cur: Path
    mask: Path

    @property
    def name(self) -> str:
        # paper layout: the pair's folder; abl layout: the file id
        return self.cur.parent.name if self.cur.stem == "cur" else self.cur.stem


def resolve_data_dir(dataset: str | None = None, data: str | None = None, data_root: str | None = None) -> Path:
    """The dataset folder for ``--dataset NAME`` (under the data root) or ``--data DIR`` (any folder)."""
    if (dataset is None) == (data is None):
        raise DatasetError("give exactly one of --dataset NAME (OL, FB, Diff) or --data DIR")
    if data is not None:
        path = Path(data).expanduser().resolve()
        if not path.is_dir():
            raise DatasetError(f"data folder {path} does not exist; pass the folder that holds the split lists")
        return path
    canonical = {n.lower(): n for n in NAMED_DATASETS}.get(dataset.lower())
    if canonical is None:
        raise DatasetError(
            f"unknown dataset {dataset!r}; named datasets are {', '.join(NAMED_DATASETS)}, "
            "or pass --data DIR for any folder in a supported layout"
        )
    if data_root:
        root, source = Path(data_root), "--data-root"
    elif os.environ.get("ANODFD_DATA_ROOT"):
        root, source = Path(os.environ["ANODFD_DATA_ROOT"]), "ANODFD_DATA_ROOT"
    else:
        root, source = Path("data"), "the default ./data"
    root = root.expanduser().resolve()
    path = root / canonical
    hint = SYNTH_HINT.format(name=canonical, path=path)
    if not root.is_dir():
        raise DatasetError(
            f"data root {root} (from {source}) does not exist; set --data-root or ANODFD_DATA_ROOT to the folder "
            f"holding {canonical}/, or make a synthetic stand-in: {hint}"
        )
    if not path.is_dir():
        raise DatasetError(
            f"dataset {canonical} not found: looked for {path} (data root from {source}); put the dataset there "
            f"or make a synthetic stand-in: {hint}"
        )
    return path


def detect_layout(root: Path, layout: str = "auto") -> str:
    root = Path(root)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout != "auto":
        return layout
    if (root / "train.txt").is_file():
        return "paper"
    if (root / "A").is_dir() and (root / "B").is_dir() and (root / "list").is_dir():
        return "abl"
    raise DatasetError(
        f"{root}: no dataset layout recognised; expected either train.txt (the paper's layout, lines "
        "'cur,hist,gt') or A/, B/, label/ and list/train.txt (change-detection layout)"
    )


def list_path(root: Path, split: str, layout: str) -> Path:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if layout == "paper":
        return Path(root) / _PAPER_LISTS[split]
    return Path(root) / "list" / _ABL_LISTS[split]


def read_split(root: Path, split: str, layout: str = "auto", val_fraction: float = 0.2, group_regex: str = "",
               val_groups: str = "") -> list[Pair]:
    """Pairs listed for a split, every listed file checked to exist. No image is opened here.

    Without a validation list, validation is a deterministic ``val_fraction`` of train (the paper's 8:2) and
    train is the rest, so the two never overlap. With ``group_regex`` (a pair's group, such as a board, part or site,
    is the regex's first group, or its whole match, on the pair's name: `group_of`), that share is cut as whole
    groups, so validation measures groups training never saw. ``val_groups`` (comma-separated) names the groups
    that validation holds: it takes every pair of them from the train and validation lists, and train keeps the rest.
    """
    root = Path(root).resolve()
    layout = detect_layout(root, layout)
    path = list_path(root, split, layout)
    if split in ("train", "val") and (val_groups or not list_path(root, "val", layout).is_file()):
        pool = _train_and_val(root, layout)
        val = set(_holdout(pool, val_fraction, group_regex, val_groups))
        return [p for p in pool if (p in val) == (split == "val")]
    if not path.is_file():
        raise DatasetError(f"{path}: split list for {split!r} not found; add it or choose another split")
    return _read_list(root, path, layout)


def held_out_groups(root: Path, layout: str = "auto", val_fraction: float = 0.2, group_regex: str = "") -> str | None:
    """With a validation list that shares every group with train: the groups (comma-separated) that validation
    cut by whole groups from both lists would hold, for ``--val-groups``. None when validation already holds out a
    group, or without ``group_regex``."""
    if not group_regex:
        return None
    root = Path(root).resolve()
    layout = detect_layout(root, layout)
    train = {group_of(p, group_regex) for p in read_split(root, "train", layout, val_fraction, group_regex)}
    val = {group_of(p, group_regex) for p in read_split(root, "val", layout, val_fraction, group_regex)}
    if not val <= train:
        return None
    held = _holdout(_train_and_val(root, layout), val_fraction, group_regex)
    return ",".join(sorted({group_of(p, group_regex) for p in held}))


def _train_and_val(root: Path, layout: str) -> list[Pair]:
    """The pairs of the train list and, where there is one, the validation list: what validation is cut from."""
    pool = _read_list(root, list_path(root, "train", layout), layout)
    if list_path(root, "val", layout).is_file():
        pool += _read_list(root, list_path(root, "val", layout), layout)
    return pool


def group_of(pair: Pair, regex: str) -> str:
    """``pair``'s group under ``regex``: its first group, or the whole match, searched in the pair's name."""
    m = re.search(regex, pair.name)
    if m is None:
        raise DatasetError(f"{pair.cur}: the pair's name {pair.name!r} does not match --group-regex {regex!r}; give a "
                           "regex that every pair's name matches (its first group names the pair's group)")
    return m.group(1) if m.groups() else m.group(0)


def _holdout(pairs: list[Pair], fraction: float, group_regex: str = "", val_groups: str = "") -> list[Pair]:
    """The validation pairs among ``pairs``: the groups ``val_groups`` names, or whole groups until ``fraction``, or
    (without groups) ``fraction`` of the pairs. Ordering by a hash of the name (a pair's or a group's) is
    deterministic and stays stable when pairs are added to the list."""
    if val_groups:
        wanted = {g.strip() for g in val_groups.split(",") if g.strip()}
        groups = {p: group_of(p, group_regex) for p in pairs}
        missing = sorted(wanted - set(groups.values()))
        if missing:
            raise DatasetError(f"--val-groups {val_groups!r}: no listed train or validation pair is in group(s) "
                               f"{', '.join(missing)}; the groups are {', '.join(sorted(set(groups.values())))}")
        if wanted >= set(groups.values()):
            raise DatasetError(f"--val-groups {val_groups!r} names every group: leave at least one for training")
        return [p for p in pairs if groups[p] in wanted]
    # Ordering by a hash of the name is deterministic and stays stable when pairs are added to the list.
    if not group_regex:
        n = max(1, round(len(pairs) * fraction)) if len(pairs) > 1 else 0
        return sorted(pairs, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())[:n]
    members: dict[str, list[Pair]] = {}
    for p in pairs:
        members.setdefault(group_of(p, group_regex), []).append(p)
    if len(members) < 2:
        raise DatasetError(f"--group-regex {group_regex!r} puts every pair in one group ({next(iter(members))!r}): "
                           "validation cannot hold out a group; fix the regex or drop it")
    held: list[Pair] = []
    for name in sorted(members, key=lambda g: hashlib.sha1(g.encode()).hexdigest())[:-1]:  # one stays for train
        if len(held) >= fraction * len(pairs):
            break
        held += members[name]
    return held


def _read_list(root: Path, path: Path, layout: str) -> list[Pair]:
    pairs = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path} line {lineno}"
        if layout == "paper":
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != 3 or not all(fields):
                raise DatasetError(
                    f"{where}: expected 3 comma-separated fields 'cur,hist,gt', got {len(fields)}: {line!r}; "
                    "fix the line or regenerate the list"
                )
            cur, hist, gt = (_listed_file(root, f, where) for f in fields)
        else:
            cur = _find_image(root / "B", line, where)
            hist = _find_image(root / "A", line, where)
            gt = _find_image(root / "label", line, where)
        pairs.append(Pair(hist=hist, cur=cur, mask=gt))
    if not pairs:
        raise DatasetError(f"{path}: the split is empty; list at least one pair in it")
    return pairs


def _listed_file(root: Path, field: str, where: str) -> Path:
    rel = field.replace("\\", "/")  # lists written on Windows use backslashes
    path = root / rel
    if not path.is_file():
        raise DatasetError(f"{where}: listed file {field!r} not found at {path}; fix the list or restore the file")
    return path


def _find_image(folder: Path, entry: str, where: str) -> Path:
    """The file of list entry ``entry`` in ``folder``: an id (``0001``) or, as LEVIR-CD, DSIFN and ChangeFormer
    lists write it, a file name (``test_77_0512_0256.png``). A named file is looked for as named first, then by
    its stem with every image extension (masks are often .png beside .jpg images)."""
    stem = entry
    candidates = []
    if Path(entry).suffix.lower() in IMAGE_EXTS:
        candidates.append(folder / entry)
        stem = entry[: -len(Path(entry).suffix)]
    candidates += [folder / f"{stem}{ext}" for ext in IMAGE_EXTS]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetError(
        f"{where}: no image for {entry!r} in {folder} (tried {', '.join(p.name for p in candidates[:3])}, ...); "
        "fix the list or restore the file"
    )


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, after a cheap check that the file is not truncated."""
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: not a readable image ({e}); replace the file") from None
    tail = _tail(path, 1024)
    # JPEG ends with the EOI marker, PNG with the IEND chunk: a file cut short lacks them.
    if (fmt == "JPEG" and b"\xff\xd9" not in tail) or (fmt == "PNG" and b"IEND" not in tail[-64:]):
        raise DatasetError(f"{path}: the {fmt} file is truncated (no end marker); replace the file")
    return size


def _tail(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read()


def validate_pairs(pairs: list[Pair]) -> dict[str, set[tuple[int, int]]]:
    """Check every image header; return the (width, height) sizes seen for hist, cur and mask.

    History and current may differ in size (real captures do; both get resized), the mask may not differ
    from its current image, since it is in current-image coordinates.
    """
    sizes: dict[str, set[tuple[int, int]]] = {"hist": set(), "cur": set(), "mask": set()}
    for p in pairs:
        hist, cur, mask = image_size(p.hist), image_size(p.cur), image_size(p.mask)
        if mask != cur:
            raise DatasetError(
                f"{p.mask}: mask is {mask[0]}x{mask[1]} but its current image {p.cur} is {cur[0]}x{cur[1]}; "
                "masks must be in current-image coordinates: fix or regenerate the mask"
            )
        sizes["hist"].add(hist)
        sizes["cur"].add(cur)
        sizes["mask"].add(mask)
    return sizes


def load_split(
    root: Path, split: str, layout: str = "auto", val_fraction: float = 0.2, check: bool = True,
    group_regex: str = "", val_groups: str = "",
) -> list[Pair]:
    """`read_split`, then (by default) `validate_pairs`: the up-front check before any compute is spent."""
    pairs = read_split(root, split, layout, val_fraction, group_regex, val_groups)
    if check:
        validate_pairs(pairs)
    return pairs


def available_splits(root: Path, layout: str = "auto") -> list[str]:
    layout = detect_layout(Path(root), layout)
    out = ["train", "val"]  # val always exists: listed, or held out of train
    if list_path(root, "test", layout).is_file():
        out.append("test")
    return out


def fingerprint(root: Path, layout: str = "auto") -> str:
    """A short hash of every split's pairs, by content: which files each split lists and the bytes in them.

    Identifies the data a model was scored on: a re-encoded image or a relabelled mask changes it, a copy of
    the dataset in another folder does not.
    """
    root = Path(root).resolve()
    layout = detect_layout(root, layout)
    h = hashlib.sha256()
    for split in available_splits(root, layout):
        for p in read_split(root, split, layout):
            for f in (p.hist, p.cur, p.mask):
                with open(f, "rb") as fh:
                    content = hashlib.file_digest(fh, "sha256").hexdigest()
                h.update(f"{split}|{f.relative_to(root).as_posix()}|{content}\n".encode())
    return h.hexdigest()[:16]


def boxes_path(pair: Pair) -> Path:
    """Where a pair's defect boxes are read from: ``boxes/<id>.txt`` beside ``label/`` in the A/B layout (as DeepPCB
    ships them), ``cur_boxes.txt`` in the pair's folder in the paper's."""
    if pair.cur.stem == "cur":
        return pair.cur.parent / "cur_boxes.txt"
    return pair.mask.parent.parent / "boxes" / f"{pair.mask.stem}.txt"


def read_boxes(pair: Pair) -> np.ndarray | None:
    """The pair's boxes as an (N, 5) int array ``x1 y1 x2 y2 class`` (inclusive pixels of the current image; class
    0 when a line gives none), or None when the pair has no boxes file. A line may separate its numbers by spaces
    or commas."""
    path = boxes_path(pair)
    if not path.is_file():
        return None
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            values = [int(float(v)) for v in fields]
        except ValueError:
            values = []
        if len(values) not in (4, 5) or values[2] < values[0] or values[3] < values[1]:
            raise DatasetError(f"{path} line {lineno}: expected 'x1 y1 x2 y2 [class]' with x2 >= x1 and y2 >= y1, got "
                               f"{line.strip()!r}; fix the line")
        rows.append(values + [0] * (5 - len(values)))
    return np.array(rows, np.int64).reshape(-1, 5)
