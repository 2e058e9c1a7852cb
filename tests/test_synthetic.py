"""The synthetic stand-ins: the paper's layout, determinism, masks that match the anomalies, nuisance."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from anodfd.synth import FB_SIZE_RANGE, KINDS, _split_counts, parse_size, synthesize

SIZE = (96, 64)
PREFIX = {"OL": "oil_leak", "FB": "foreign_body", "Diff": "diff"}
LISTS = ("train.txt", "validation.txt", "test.txt")


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pairs(root: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(folder, cur, hist, mask) for every listed pair."""
    out = []
    for name in LISTS:
        for line in (root / name).read_text().splitlines():
            cur, hist, gt = (root / f.replace("\\", "/") for f in line.split(","))
            out.append((cur.parent.name, cv2.imread(str(cur)), cv2.imread(str(hist)),
                        cv2.imread(str(gt), cv2.IMREAD_UNCHANGED)))
    return out


@pytest.fixture(scope="module")
def ol40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize("OL", tmp_path_factory.mktemp("ol40"), pairs=40, seed=1, size=SIZE, workers=2,
                      progress=False)


@pytest.mark.parametrize("kind, counts", [("OL", (7, 2, 1)), ("FB", (6, 2, 2)), ("Diff", (6, 2, 2))])
def test_layout_and_split_lists(tmp_path: Path, kind: str, counts: tuple[int, int, int]) -> None:
    root = synthesize(kind, tmp_path / kind, pairs=10, seed=0, size=SIZE, workers=1, progress=False)
    assert root == tmp_path / kind
    folder = re.compile(rf"{PREFIX[kind]}_(train|test)_\d+")
    seen = []
    for name, count in zip(LISTS, counts):
        lines = (root / name).read_text().splitlines()
        assert len(lines) == count, name
        for line in lines:
            fields = line.split(",")
            assert len(fields) == 3 and "/" not in line
            dirs = {f.split("\\")[0] for f in fields}
            assert len(dirs) == 1  # cur, hist and gt of one pair share its folder
            d = dirs.pop()
            assert folder.fullmatch(d)
            assert ("_test_" in d) == (name == "test.txt")  # validation pairs come from the train folders
            assert [f.split("\\")[1] for f in fields] == ["cur.jpg", "hist.jpg", "cur_gt.png"]
            for f in fields:
                assert (root / f.replace("\\", "/")).is_file()
            seen.append(d)
    assert len(seen) == len(set(seen)) == 10  # every pair listed exactly once
    for _, cur, hist, mask in _pairs(root):
        assert cur.shape == hist.shape == (SIZE[1], SIZE[0], 3)
    sheet = cv2.imread(str(root / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[1] == 3 * 256
    readme = (root / "README.txt").read_text()
    assert "SYNTHETIC" in readme and kind in readme and "seed: 0" in readme and "96x64" in readme


def test_split_counts_follow_the_paper() -> None:
    # defaults: the paper's train+val / test counts, train+val cut 8:2
    assert _split_counts("OL", None) == (1020, 255, 153)
    assert _split_counts("FB", None) == (144, 36, 39)
    assert _split_counts("Diff", None) == (319, 80, 101)
    # small totals still get one validation and one test pair from 3 pairs on
    assert _split_counts("OL", 3) == (1, 1, 1)
    assert sum(_split_counts("Diff", 1)) == 1
    assert _split_counts("Diff", 100) == (64, 16, 20)
    assert _split_counts("OL", 76, test_pairs=16) == (48, 12, 16)  # make demo's: the rest still cut 8:2
    assert _split_counts("OL", None, test_pairs=100) == (1062, 266, 100)


def test_same_seed_same_bytes_and_worker_count_does_not_matter(tmp_path: Path) -> None:
    a = _all_bytes(synthesize("Diff", tmp_path / "a", pairs=6, seed=3, size=SIZE, workers=1, progress=False))
    b = _all_bytes(synthesize("Diff", tmp_path / "b", pairs=6, seed=3, size=SIZE, workers=2, progress=False))
    c = _all_bytes(synthesize("Diff", tmp_path / "c", pairs=6, seed=4, size=SIZE, workers=2, progress=False))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in images)  # another seed draws other scenes for every pair


def test_masks_are_binary_single_channel_and_sized_like_cur(ol40: Path) -> None:
    for name, cur, hist, mask in _pairs(ol40):
        assert mask.ndim == 2 and mask.dtype == np.uint8, name
        assert mask.shape == cur.shape[:2] == hist.shape[:2], name
        assert set(np.unique(mask)) <= {0, 255}, name


def test_about_a_fifth_of_pairs_are_normal(ol40: Path) -> None:
    normal = sum(1 for *_, mask in _pairs(ol40) if not mask.any())
    assert 2 <= normal <= 16


def test_normal_pairs_differ_only_by_nuisance(ol40: Path) -> None:
    normal = [(cur, hist) for _, cur, hist, mask in _pairs(ol40) if not mask.any()]
    assert normal
    for cur, hist in normal:
        cur, hist = cur.astype(np.float32), hist.astype(np.float32)
        assert np.abs(cur - hist).mean() > 1.0  # illumination, noise, JPEG and viewpoint always differ ...
        # ... but it is the same place: the two images stay strongly correlated
        assert np.corrcoef(cur.mean(2).ravel(), hist.mean(2).ravel())[0, 1] > 0.6


def test_anomalies_are_where_the_mask_says(ol40: Path) -> None:
    ratios = []
    for _, cur, hist, mask in _pairs(ol40):
        inside = mask > 0
        if inside.sum() < 10:
            continue
        diff = np.abs(cur.astype(np.float32) - hist.astype(np.float32)).mean(2)
        ratios.append(diff[inside].mean() / diff[~inside].mean())
    assert len(ratios) >= 10
    assert np.median(ratios) > 2.0
    assert np.mean(np.array(ratios) > 1.2) >= 0.8


def test_anomalies_are_a_realistic_size(ol40: Path) -> None:
    fractions = [(mask > 0).mean() for *_, mask in _pairs(ol40) if mask.any()]
    assert max(fractions) < 0.15  # never the whole picture
    assert 0.002 < np.median(fractions) < 0.05


def test_small_anomalies_are_a_few_pixels_across_and_still_visible(tmp_path: Path) -> None:
    # The stand-ins' anomalies start at 0.1% of the image's area, about 64 px across at 2048x1536: the pieces
    # under 1% of the side the benchmarks counted were fragments of larger stains. --small-anomalies draws them
    # a few pixels across, still marked only where they visibly differ.
    width = 1024
    root = synthesize("OL", tmp_path, pairs=16, seed=2, size=(width, 768), workers=2, progress=False, small=True)
    sides, ratios = [], []
    for name, cur, hist, mask in _pairs(root):
        if not mask.any():
            continue
        assert (mask > 0).sum() >= 16, name  # at least one defect large enough to be detected
        n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
        sides += [max(stats[i, cv2.CC_STAT_WIDTH], stats[i, cv2.CC_STAT_HEIGHT]) for i in range(1, n)]
        diff = np.abs(cur.astype(np.float32) - hist.astype(np.float32)).mean(2)
        ratios.append(diff[mask > 0].mean() / diff[mask == 0].mean())
    assert len(ratios) >= 8
    assert max(sides) < 0.08 * width and np.median(sides) < 0.02 * width, sorted(sides)
    assert np.median(ratios) > 2.0
    assert "small only" in (root / "README.txt").read_text()


def test_fb_sizes_vary_within_the_papers_range(tmp_path: Path) -> None:
    root = synthesize("FB", tmp_path, pairs=3, seed=0, workers=2, progress=False)
    (w_min, h_min), (w_max, h_max) = FB_SIZE_RANGE
    sizes = set()
    for name, cur, hist, mask in _pairs(root):
        h, w = cur.shape[:2]
        assert w_min <= w <= w_max and h_min <= h <= h_max, name
        assert hist.shape == cur.shape and mask.shape == (h, w)
        sizes.add((w, h))
    assert len(sizes) >= 2


def test_parse_size() -> None:
    assert parse_size("512x384") == (512, 384)
    assert parse_size(" 64X48 ") == (64, 48)
    for bad in ("512", "512x", "x384", "axb", "0x10", "10x0", "-5x4", "12x34x5", "512*384", ""):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT|positive"):
            parse_size(bad)


@pytest.mark.parametrize("kwargs", [{"kind": "XX"}, {"size": (8, 8)}, {"pairs": 0}, {"seed": -1}])
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict) -> None:
    args = {"kind": "OL", "out": tmp_path, "pairs": 3, "size": SIZE, "workers": 1, "progress": False} | kwargs
    with pytest.raises(ValueError):
        synthesize(**args)


def test_kinds() -> None:
    assert KINDS == ("OL", "FB", "Diff")
