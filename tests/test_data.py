"""Layouts, bad input, the decode cache and the dataset, on small datasets written by hand."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anodfd.cli import main as cli
from anodfd.data.cache import PairCache, decode_mask, read_mask
from anodfd.data.check import check_dataset
from anodfd.data.dataset import PairDataset, normalize
from anodfd.data.layouts import (
    DatasetError,
    detect_layout,
    fingerprint,
    load_split,
    read_split,
    resolve_data_dir,
)


def _write_pair(root: Path, hist: str, cur: str, gt: str, size=(96, 64), seed=0, mask_scale=255) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = mask_scale
    for rel, arr in ((hist, img), (cur, img), (gt, mask)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), arr)


def make_paper(root: Path, n=(6, 2, 2), size=(96, 64)) -> Path:
    """The official layout: one folder per pair, Windows-style lists with backslashes."""
    for split, count in zip(("train", "validation", "test"), n):
        lines = []
        for i in range(count):
            d = f"oil_leak_{split}_{i}"
            _write_pair(root, f"{d}/hist.jpg", f"{d}/cur.jpg", f"{d}/cur_gt.png", size, seed=i)
            lines.append(f"{d}\\cur.jpg,{d}\\hist.jpg,{d}\\cur_gt.png  ")
        if count:
            (root / f"{split}.txt").write_text("\r\n".join(lines) + "\r\n\r\n")
    return root


def make_abl(root: Path, ids=("a1", "a2", "a3", "a4", "a5"), mask_ext=".png", mask_scale=255) -> Path:
    """The change-detection layout: A/ B/ label/ list/, no validation list."""
    for i, name in enumerate(ids):
        _write_pair(root, f"A/{name}.jpg", f"B/{name}.jpg", f"label/{name}{mask_ext}", seed=i, mask_scale=mask_scale)
    (root / "list").mkdir()
    (root / "list" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


# --- layouts -------------------------------------------------------------------------------------------


def test_paper_layout_backslash_lists(tmp_path):
    root = make_paper(tmp_path / "OL")
    assert detect_layout(root) == "paper"
    train = load_split(root, "train")
    assert len(train) == 6 and len(load_split(root, "val")) == 2 and len(load_split(root, "test")) == 2
    assert train[0].cur == root / "oil_leak_train_0" / "cur.jpg"
    assert train[0].hist.name == "hist.jpg" and train[0].mask.name == "cur_gt.png"
    assert train[0].name == "oil_leak_train_0"


def test_forward_slashes_work_too(tmp_path):
    root = make_paper(tmp_path / "d")
    text = (root / "train.txt").read_text().replace("\\", "/")
    (root / "train.txt").write_text(text)
    assert len(read_split(root, "train")) == 6


@pytest.mark.parametrize("entries", [("a1", "a2"), ("a1.jpg", "a2.jpg"), ("a1.png", "a2.JPG")])
def test_abl_lists_with_ids_or_file_names(tmp_path, entries):
    """LEVIR-CD-style lists name files with their extension; the mask is a .png beside .jpg images either way."""
    root = make_abl(tmp_path / "d", ("a1", "a2"))
    for split in ("train", "val"):  # with a val list, train is the whole list (no hold-out)
        (root / "list" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    pairs = read_split(root, "train")
    assert [(p.hist.name, p.cur.name, p.mask.name) for p in pairs] == [("a1.jpg", "a1.jpg", "a1.png"),
                                                                       ("a2.jpg", "a2.jpg", "a2.png")]
    (root / "list" / "train.txt").write_text("a3.png\n")
    with pytest.raises(DatasetError, match=r"train.txt line 1: no image for 'a3.png' in "):
        read_split(root, "train")


def test_abl_layout_and_deterministic_holdout(tmp_path):
    ids = tuple(f"{i:04d}" for i in range(10))
    root = make_abl(tmp_path / "pcb", ids)
    assert detect_layout(root) == "abl"
    train, val = read_split(root, "train"), read_split(root, "val")
    assert len(val) == 2 and len(train) == 8  # the paper's 8:2
    assert not {p.name for p in train} & {p.name for p in val}
    assert [p.name for p in read_split(root, "val")] == [p.name for p in val]  # same every time
    assert train[0].hist.parent.name == "A" and train[0].cur.parent.name == "B"


@pytest.mark.parametrize("ext,scale", [(".png", 255), (".png", 1), (".jpg", 255)])
def test_masks_png_jpg_01_0255(tmp_path, ext, scale):
    root = make_abl(tmp_path / "d", ("x1", "x2"), mask_ext=ext, mask_scale=scale)
    pair = read_split(root, "train")[0]
    m = decode_mask(pair.mask, 32)
    assert set(np.unique(m)) == {0, 1}
    assert abs(m.mean() - 1 / 16) < 0.02  # the quarter-by-quarter square of the original


def test_rgb_mask_is_read_as_binary(tmp_path):
    path = tmp_path / "m.png"
    m = np.zeros((40, 40, 3), np.uint8)
    m[10:30, 10:30] = 255
    cv2.imwrite(str(path), m)
    assert set(np.unique(decode_mask(path, 40))) == {0, 1}


def test_named_dataset_resolution(tmp_path, monkeypatch):
    make_paper(tmp_path / "root" / "OL")
    assert resolve_data_dir("OL", data_root=str(tmp_path / "root")) == tmp_path / "root" / "OL"
    monkeypatch.setenv("ANODFD_DATA_ROOT", str(tmp_path / "root"))
    assert resolve_data_dir("ol") == tmp_path / "root" / "OL"  # case-insensitive
    assert resolve_data_dir(data=str(tmp_path / "root" / "OL")) == tmp_path / "root" / "OL"


def test_fingerprint_changes_with_the_lists(tmp_path):
    root = make_paper(tmp_path / "d")
    before = fingerprint(root)
    assert fingerprint(root) == before
    (root / "test.txt").write_text((root / "test.txt").read_text().splitlines()[0])
    assert fingerprint(root) != before


# --- bad input: one clear error naming the file (and line) and the fix, nothing written --------------------


def _error(fn, *args, **kw) -> str:
    with pytest.raises(DatasetError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_missing_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("ANODFD_DATA_ROOT", raising=False)
    msg = _error(resolve_data_dir, "OL", data_root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in msg and "anodfd synth OL --out" in msg


def test_missing_named_dataset(tmp_path):
    (tmp_path / "root").mkdir()
    msg = _error(resolve_data_dir, "FB", data_root=str(tmp_path / "root"))
    assert str(tmp_path / "root" / "FB") in msg and "anodfd synth FB" in msg


def test_unknown_dataset_name():
    msg = _error(resolve_data_dir, "Oil")
    assert "'Oil'" in msg and "OL, FB, Diff" in msg and "--data" in msg


def test_missing_split_list(tmp_path):
    root = make_paper(tmp_path / "d", n=(6, 2, 0))
    msg = _error(load_split, root, "test")
    assert str(root / "test.txt") in msg and "not found" in msg


def test_line_without_three_fields(tmp_path):
    root = make_paper(tmp_path / "d")
    lines = (root / "train.txt").read_text().splitlines()
    lines[2] = "oil_leak_train_2\\cur.jpg,oil_leak_train_2\\hist.jpg"
    (root / "train.txt").write_text("\n".join(lines))
    msg = _error(load_split, root, "train")
    assert f"{root / 'train.txt'} line 3" in msg and "3 comma-separated fields" in msg


def test_listed_file_missing(tmp_path):
    root = make_paper(tmp_path / "d")
    (root / "oil_leak_train_4" / "hist.jpg").unlink()
    msg = _error(load_split, root, "train")
    assert f"{root / 'train.txt'} line 5" in msg and "oil_leak_train_4\\\\hist.jpg" in msg
    assert str(root / "oil_leak_train_4" / "hist.jpg") in msg


def test_abl_missing_id(tmp_path):
    root = make_abl(tmp_path / "d")
    (root / "B" / "a3.jpg").unlink()
    msg = _error(load_split, root, "train")
    assert "line 3" in msg and "'a3'" in msg and str(root / "B") in msg


def test_truncated_image(tmp_path):
    root = make_paper(tmp_path / "d")
    f = root / "oil_leak_train_1" / "cur.jpg"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msg = _error(load_split, root, "train")
    assert str(f) in msg and "truncated" in msg


def test_unreadable_image(tmp_path):
    root = make_paper(tmp_path / "d")
    f = root / "oil_leak_train_1" / "hist.jpg"
    f.write_text("not an image")
    msg = _error(load_split, root, "train")
    assert str(f) in msg and "not a readable image" in msg


def test_mask_size_differs(tmp_path):
    root = make_paper(tmp_path / "d")
    f = root / "oil_leak_train_0" / "cur_gt.png"
    cv2.imwrite(str(f), np.zeros((10, 10), np.uint8))
    msg = _error(load_split, root, "train")
    assert str(f) in msg and "current-image coordinates" in msg


def test_hist_and_cur_sizes_may_differ(tmp_path):
    root = make_paper(tmp_path / "d")
    f = root / "oil_leak_train_0" / "hist.jpg"
    cv2.imwrite(str(f), np.zeros((50, 70, 3), np.uint8))
    assert len(load_split(root, "train")) == 6


def test_empty_split(tmp_path):
    root = make_paper(tmp_path / "d")
    (root / "validation.txt").write_text("\n  \n")
    msg = _error(load_split, root, "val")
    assert str(root / "validation.txt") in msg and "empty" in msg


def test_no_layout(tmp_path):
    msg = _error(detect_layout, tmp_path)
    assert str(tmp_path) in msg and "train.txt" in msg


def test_bad_input_writes_nothing(tmp_path, monkeypatch):
    root = make_paper(tmp_path / "d")
    (root / "oil_leak_train_4" / "hist.jpg").unlink()
    monkeypatch.setenv("ANODFD_CACHE_DIR", str(tmp_path / "cache"))
    before = sorted(p for p in tmp_path.rglob("*"))
    assert cli(["data", "check", str(root)]) == 1
    assert sorted(p for p in tmp_path.rglob("*")) == before


# --- data check ------------------------------------------------------------------------------------------


def test_data_check_reports_and_exit_status(tmp_path, capsys):
    root = make_paper(tmp_path / "d")
    assert cli(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train      6 pairs" in out and "96x64 (10)" in out and "OK" in out
    assert "6.250%" in out  # the square is (64/4 * 96/4) / (64 * 96) = 1/16 of every mask
    f = root / "oil_leak_test_1" / "cur.jpg"
    f.write_bytes(f.read_bytes()[:300])
    report = check_dataset(root)
    assert not report.ok and any(str(f) in e for e in report.errors)
    assert cli(["data", "check", str(root)]) == 1


def test_data_check_refuses_a_split_without_anomalies_unless_allowed(tmp_path, capsys):
    root = make_paper(tmp_path / "d")
    for mask in root.glob("oil_leak_test_*/cur_gt.png"):
        cv2.imwrite(str(mask), np.zeros((64, 96), np.uint8))
    assert cli(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "test       2 pairs, 2 normal, anomalous pixels 0.000%" in out
    assert "error: test: not one anomalous pixel in its 2 masks" in out and "--allow-normal-only" in out
    assert cli(["data", "check", str(root), "--allow-normal-only"]) == 0
    assert "train      6 pairs, 0 normal, anomalous pixels 6.250%" in capsys.readouterr().out


@pytest.mark.parametrize("convention", ["grey 0/255", "grey 0/1", "class indices", "red on black", "colour per class",
                                        "grey as RGB", "16-bit", "JPEG 0/255"])
def test_every_mask_convention_keeps_its_labels(tmp_path, convention):
    """Masks as datasets ship them: every one keeps its anomalous pixels, at native size and at training size."""
    from anodfd.data.cache import read_mask

    one, two = (slice(8, 24), slice(8, 32)), (slice(28, 40), slice(40, 56))
    expected = np.zeros((48, 64), np.uint8)
    expected[one] = expected[two] = 1
    grey = np.zeros((48, 64), np.uint8)
    colour = np.zeros((48, 64, 3), np.uint8)  # BGR, as OpenCV writes it
    if convention in ("grey 0/255", "JPEG 0/255"):
        grey[one] = grey[two] = 255
        mask = grey
    elif convention == "grey 0/1":
        grey[one] = grey[two] = 1
        mask = grey
    elif convention == "class indices":
        grey[one], grey[two] = 1, 2
        mask = grey
    elif convention == "red on black":
        colour[one] = colour[two] = (0, 0, 255)
        mask = colour
    elif convention == "colour per class":
        colour[one], colour[two] = (0, 0, 200), (0, 180, 0)
        mask = colour
    elif convention == "grey as RGB":
        colour[one] = colour[two] = (255, 255, 255)
        mask = colour
    else:
        mask = grey.astype(np.uint16)
        mask[one] = mask[two] = 65535
    path = tmp_path / ("m.jpg" if convention.startswith("JPEG") else "m.png")
    assert cv2.imwrite(str(path), mask)
    got = read_mask(path)
    wrong = np.count_nonzero(got != expected)
    assert wrong <= (40 if convention.startswith("JPEG") else 0), wrong  # JPEG blurs the edges a little
    assert abs(decode_mask(path, 32).mean() - expected.mean()) < 0.01


def test_cli_unknown_dataset_is_one_line(tmp_path, capsys):
    assert cli(["data", "check", "--dataset", "XX", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anodfd: error:") and "\n" not in err


# --- decoding and the cache ------------------------------------------------------------------------------


VIEWS = {"squashed": {"data.resize": 64}, "scaled and tiled": {"data.resize": 0, "data.scale": 0.25, "data.crop": 64}}


@pytest.mark.parametrize("view", VIEWS.values(), ids=VIEWS.keys())
def test_predict_eval_and_pyfunc_see_the_same_pixels(tmp_path, view):
    """One preprocessing path: a large JPEG pair gives the same map through `predict`, the eval dataset and the
    pyfunc fed the decoded arrays, to 1e-5 (a decode at reduced size in training alone was 1.6 grey levels off),
    for a model that squashes pairs and one that scales them (512x384 -> 128x96) and slides 64 px tiles."""
    from types import SimpleNamespace

    from anodfd.checkpoint import checkpoint_dict, save_checkpoint
    from anodfd.config import PRESETS, Config, with_window
    from anodfd.data.dataset import make_dataset
    from anodfd.inference import resize_probs, sliding_probs
    from anodfd.predict import predict_pairs
    from anodfd.serving import AnomalyMapModel
    from anodfd.train.loop import build_training

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:384, 0:512]
    smooth = np.stack([(xx / 2) % 256, (yy / 1.5) % 256, (xx + yy) / 4 % 256], -1)
    hist = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    cur = hist.copy()
    cur[100:160, 200:300] = 255 - cur[100:160, 200:300]
    mask = np.zeros((384, 512), np.uint8)
    mask[100:160, 200:300] = 255
    root = tmp_path / "d"
    for split in ("train", "validation", "test"):
        (root / "p").mkdir(parents=True, exist_ok=True)
        (root / f"{split}.txt").write_text("p\\cur.jpg,p\\hist.jpg,p\\cur_gt.png\n")
    for name, img in (("hist.jpg", hist), ("cur.jpg", cur)):
        cv2.imwrite(str(root / "p" / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    cv2.imwrite(str(root / "p" / "cur_gt.png"), mask)

    config = with_window(Config().with_flat(PRESETS["smoke"]), {"data.data": str(root), **view,
                                                                "data.cache_dir": str(tmp_path / "cache")})
    model, _, _ = build_training(config, torch.device("cpu"))
    with torch.no_grad():  # a fresh model answers about 0.5 everywhere, whatever it sees; make it sensitive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = tmp_path / "c.pt"
    save_checkpoint(checkpoint_dict(model, None, 1, config, {"calibrated_threshold": 0.5}, (0.0, 0.0)), ckpt)

    predict_pairs(model, config, [("p", root / "p" / "hist.jpg", root / "p" / "cur.jpg")], tmp_path / "out", 0.5)
    predicted = cv2.imread(str(tmp_path / "out" / "p_map.png"), cv2.IMREAD_GRAYSCALE) / 255.0  # 8-bit PNG

    h, c, _ = make_dataset(config.data, "test").arrays(0)
    evaluated = resize_probs(sliding_probs(model, h, c, config.data.window)[None, None], 384, 512)[0, 0].numpy()

    served_model = AnomalyMapModel()
    served_model.load_context(SimpleNamespace(artifacts={"checkpoint": str(ckpt)}))
    decoded = [cv2.cvtColor(cv2.imread(str(root / "p" / n)), cv2.COLOR_BGR2RGB) for n in ("hist.jpg", "cur.jpg")]
    served = served_model.predict(None, {"history": decoded[0][None], "current": decoded[1][None]})[0]

    assert evaluated.std() > 1e-3  # a map with structure, not a constant any decoding would reproduce
    np.testing.assert_allclose(served, evaluated, atol=1e-5)
    np.testing.assert_allclose(predicted, evaluated, atol=0.5 / 255 + 1e-5)  # the PNG holds the map rounded


def test_second_epoch_decodes_nothing(tmp_path):
    root = make_paper(tmp_path / "d")
    pairs = load_split(root, "train")
    cache = PairCache(tmp_path / "cache")
    ds = PairDataset(pairs, 32, cache)
    first = [ds[i] for i in range(len(ds))]
    assert cache.stats["decoded"] == 6
    second = [ds[i] for i in range(len(ds))]
    assert cache.stats["decoded"] == 6 and cache.stats["memory_hits"] == 6
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # A new process (a fresh cache object) reads the disk cache: still no decoding.
    other = PairCache(tmp_path / "cache")
    third = [PairDataset(pairs, 32, other)[i] for i in range(len(ds))]
    assert other.stats == {"decoded": 0, "disk_hits": 6, "memory_hits": 0, "aligned": 0, "pruned": 0}
    assert all(torch.equal(x, y) for a, b in zip(first, third) for x, y in zip(a, b))


def test_cache_key_follows_file_identity_and_size(tmp_path):
    root = make_paper(tmp_path / "d")
    pair = load_split(root, "train")[0]
    cache = PairCache(tmp_path / "cache")
    assert cache.key(pair, 32) != cache.key(pair, 64)
    before = cache.key(pair, 32)
    _write_pair(root, "oil_leak_train_0/hist.jpg", "oil_leak_train_0/cur.jpg", "oil_leak_train_0/cur_gt.png", seed=9)
    os.utime(pair.cur, ns=(1, 1))  # rewritten files get a new identity even within one mtime tick
    assert cache.key(pair, 32) != before


def test_disk_cache_keeps_under_its_cap_by_dropping_the_least_recently_used(tmp_path, capsys):
    """A cap that holds three and a half entries, five pairs decoded: the cache stays under the cap, the pairs gone are the
    least recently used ones (a pair read again from disk counts as used, across processes' caches), the removal
    is reported on stderr, and a pair whose entry went is decoded again to the same array."""
    root = make_paper(tmp_path / "d")
    pairs = load_split(root, "train")[:5]
    first = PairCache(tmp_path / "cache", disk_bytes=0)  # no cap: learn one entry's size
    entry = first.get(pairs[0], 32).nbytes + 128  # + the .npy header
    for p in pairs[1:3]:
        first.get(p, 32)
    assert first.stats["pruned"] == 0
    reader = PairCache(tmp_path / "cache")
    reader.get(pairs[0], 32)  # pair 0 read from disk: now more recent than pairs 1 and 2
    assert reader.stats["disk_hits"] == 1
    capped = PairCache(tmp_path / "cache", disk_bytes=int(3.5 * entry))
    for p in pairs[3:]:
        capped.get(p, 32)
    on_disk = {path.stem for path in (tmp_path / "cache").glob("??/*.npy")}
    # Pair 3 made four entries: pruned to 80% of the cap (two), the two least recently used went; pair 4 fits.
    assert on_disk == {capped.key(p, 32) for p in (pairs[0], pairs[3], pairs[4])}
    assert sum(path.stat().st_size for path in (tmp_path / "cache").glob("??/*.npy")) <= 3.5 * entry
    assert capped.stats["pruned"] == 2
    assert "removed the 2 least recently used entries" in capsys.readouterr().err
    again = PairCache(tmp_path / "cache", disk_bytes=0)
    assert np.array_equal(again.get(pairs[1], 32), first.get(pairs[1], 32)) and again.stats["decoded"] == 1


@pytest.mark.parametrize("value", ["lots", "-5", "nan"])
def test_a_bad_cache_cap_is_refused_by_name(monkeypatch, tmp_path, capsys, value):
    """One line naming the variable and the fix, from the library and from the CLI, before anything is decoded."""
    from anodfd.config import ConfigError

    monkeypatch.setenv("ANODFD_CACHE_MAX_GB", value)
    with pytest.raises(ConfigError, match="ANODFD_CACHE_MAX_GB.*e.g. 50, or 0 for no cap"):
        PairCache(tmp_path / "cache")
    root = make_paper(tmp_path / "d")
    assert cli(["train", "--data", str(root), "--preset", "smoke", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert "ANODFD_CACHE_MAX_GB" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("*.pt"))


def test_views_keep_the_aspect_ratio_and_are_cached_apart(tmp_path):
    """`--resize 0 --scale S` keeps a 96x64 pair's shape (mask included, still binary), and each view is its own
    cache entry: a scale-0.5 model never reads a native-size decode."""
    from anodfd.data.cache import View

    root = make_paper(tmp_path / "d")
    pair = load_split(root, "train")[0]
    cache = PairCache(tmp_path / "cache")
    views = [View(32), View(0, 1.0), View(0, 0.5), View(0, 1.5)]
    assert len({cache.key(pair, v) for v in views}) == len(views)
    native = read_mask(pair.mask)
    for view, shape in zip(views, [(32, 32), (64, 96), (32, 48), (96, 144)]):
        arr = cache.get(pair, view)
        assert arr.shape == (*shape, 7) and set(np.unique(arr[..., 6])) <= {0, 1}, view
        assert abs(arr[..., 6].mean() - native.mean()) < 0.02, view  # the anomalous share survives the scaling
    assert np.array_equal(cache.get(pair, View(0, 1.0))[..., 6], native)  # native view: the mask as stored
    assert cache.stats["decoded"] == len(views)


def test_dataset_tensors(tmp_path):
    root = make_paper(tmp_path / "d")
    ds = PairDataset(load_split(root, "train"), 32, PairCache(tmp_path / "cache"))
    hist, cur, mask = ds[0]
    assert hist.shape == cur.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    assert hist.dtype == cur.dtype == mask.dtype == torch.uint8
    assert set(mask.unique().tolist()) == {0, 1}
    x = normalize(hist)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    h, _c, m = next(iter(loader))
    assert h.shape == (4, 3, 32, 32) and m.shape == (4, 1, 32, 32)


def test_copied_dataset_gets_fresh_cache_entries(tmp_path):
    root = make_paper(tmp_path / "d")
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    cache = PairCache(tmp_path / "cache")
    assert cache.key(load_split(root, "train")[0], 32) != cache.key(load_split(copy, "train")[0], 32)


def test_fingerprint_follows_content_not_sizes(tmp_path):
    """A relabelled mask of the same byte size is other data; a copy of the folder elsewhere is the same data."""
    root = make_paper(tmp_path / "d")
    before = fingerprint(root)
    mask = read_split(root, "test")[0].mask
    data = bytearray(mask.read_bytes())
    data[-1] ^= 0xFF
    copy = shutil.copytree(root, tmp_path / "copy")
    mask.write_bytes(bytes(data))
    assert fingerprint(root) != before
    assert fingerprint(copy) == before


# --- anodfd data shift -------------------------------------------------------------------------------------


def test_data_shift_moves_history_images_only_and_deterministically(tmp_path, capsys):
    import json

    from anodfd.data.shift import shift_image

    src = make_paper(tmp_path / "src", size=(96, 64))
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    out = tmp_path / "shifted"
    argv = ["data", "shift", str(src), "--homography", "0.05", "--seed", "3", "--splits", "test"]
    assert cli([*argv, "--out", str(out)]) == 0
    assert "2 history images shifted" in capsys.readouterr().out
    warps = json.loads((out / "shift.json").read_text())["warps"]
    tests, trains = load_split(src, "test"), load_split(src, "train")
    assert set(warps) == {p.hist.relative_to(src).as_posix() for p in tests}

    corners = np.float32([[0, 0], [96, 0], [96, 64], [0, 64]])
    for p in tests:
        rel = p.hist.relative_to(src)
        matrix = np.array(warps[rel.as_posix()])
        moved = cv2.perspectiveTransform(corners[None], matrix)[0]
        assert (np.abs(moved - corners) <= np.float32([96, 64]) * 0.05 + 1e-3).all()
        assert np.abs(moved - corners).max() > 0.5
        original = cv2.imread(str(p.hist)).astype(int)
        got = cv2.imread(str(out / rel)).astype(int)
        expected = shift_image(cv2.imread(str(p.hist)), matrix).astype(int)
        assert np.abs(got - expected).mean() < 12 and np.abs(got - original).mean() > 30  # the warp, saved as JPEG
        for f in (p.cur, p.mask):  # untouched, and linked rather than copied
            assert (out / f.relative_to(src)).read_bytes() == f.read_bytes()
            assert os.stat(out / f.relative_to(src)).st_ino == os.stat(f).st_ino
    for p in trains:  # a split not chosen keeps its history images
        assert (out / p.hist.relative_to(src)).read_bytes() == p.hist.read_bytes()
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # the source is never written
    assert check_dataset(out).ok

    # The same seed writes the same bytes; another seed moves the images differently.
    assert cli([*argv, "--out", str(tmp_path / "again")]) == 0
    assert cli([*argv[:-4], "--seed", "4", "--splits", "test", "--out", str(tmp_path / "other")]) == 0
    for p in tests:
        rel = p.hist.relative_to(src)
        assert (tmp_path / "again" / rel).read_bytes() == (out / rel).read_bytes()
        assert (tmp_path / "other" / rel).read_bytes() != (out / rel).read_bytes()

    # Nothing already written is overwritten, and a shift out of range is refused before anything is written.
    capsys.readouterr()
    stamp = (out / "shift.json").read_bytes()
    assert cli([*argv, "--out", str(out)]) == 2
    assert "already exists; pass a new --out folder" in capsys.readouterr().err
    assert (out / "shift.json").read_bytes() == stamp
    assert cli(["data", "shift", str(src), "--homography", "0.5", "--out", str(tmp_path / "far")]) == 2
    assert "--homography 0.5" in capsys.readouterr().err and not (tmp_path / "far").exists()


# --- groups (boards, parts, sites) ------------------------------------------------------------------------


def board_ids(boards=("00041", "13000", "20085", "44000"), per=5) -> tuple[str, ...]:
    """DeepPCB-style ids: the first five digits name the board."""
    return tuple(f"{b}{i:03d}" for b in boards for i in range(per))


def test_group_of_takes_the_first_group_or_the_whole_match_and_names_a_pair_that_does_not_match(tmp_path):
    from anodfd.data.layouts import group_of

    root = make_abl(tmp_path / "pcb", board_ids(per=1) + ("oddone",))
    pairs = {p.name: p for p in read_split(root, "train") + read_split(root, "val")}
    assert group_of(pairs["13000000"], r"^(\d{5})") == "13000"
    assert group_of(pairs["13000000"], r"^\d{2}") == "13"  # no group: the whole match
    with pytest.raises(DatasetError, match=r"oddone\.jpg: the pair's name 'oddone' does not match --group-regex"):
        group_of(pairs["oddone"], r"^(\d{5})")


def test_validation_cut_from_train_holds_out_whole_groups(tmp_path):
    root = make_abl(tmp_path / "pcb", board_ids())
    board = r"^(\d{5})"
    train, val = (read_split(root, s, group_regex=board) for s in ("train", "val"))
    train_boards, val_boards = ({p.name[:5] for p in x} for x in (train, val))
    assert val_boards and not train_boards & val_boards, "no board on both sides"
    assert len(train) + len(val) == 20 and 4 <= len(val) <= 10  # whole boards, at least the 20% asked for
    assert [p.name for p in read_split(root, "val", group_regex=board)] == [p.name for p in val]  # same every time
    # Without groups the same data splits pair by pair, and every board lands on both sides.
    plain_val = {p.name[:5] for p in read_split(root, "val")}
    assert plain_val & {p.name[:5] for p in read_split(root, "train")}


def test_val_groups_take_those_groups_from_the_train_and_validation_lists(tmp_path):
    root = make_abl(tmp_path / "pcb", board_ids())
    (root / "list" / "val.txt").write_text("\n".join(board_ids(per=5)[::5]) + "\n")  # one pair of each board
    (root / "list" / "train.txt").write_text("\n".join(i for i in board_ids() if i not in board_ids()[::5]) + "\n")
    kw = {"group_regex": r"^(\d{5})", "val_groups": "13000, 44000"}
    val, train = read_split(root, "val", **kw), read_split(root, "train", **kw)
    assert sorted(p.name for p in val) == sorted(i for i in board_ids() if i[:5] in {"13000", "44000"})
    assert {p.name[:5] for p in train} == {"00041", "20085"} and len(train) == 10
    with pytest.raises(DatasetError, match="group.s. 99999; the groups are 00041, 13000, 20085, 44000"):
        read_split(root, "val", group_regex=r"^(\d{5})", val_groups="99999")
    with pytest.raises(DatasetError, match="names every group"):
        read_split(root, "val", group_regex=r"^(\d{5})", val_groups="00041,13000,20085,44000")


def test_data_check_counts_pairs_per_group_and_warns_when_validation_shares_every_group(tmp_path, capsys):
    root = make_abl(tmp_path / "pcb", board_ids())
    (root / "list" / "val.txt").write_text("\n".join(board_ids()[::5]) + "\n")
    (root / "list" / "train.txt").write_text("\n".join(i for i in board_ids() if i not in board_ids()[::5]) + "\n")
    assert cli(["data", "check", str(root), "--group-regex", r"^(\d{5})"]) == 0
    out = capsys.readouterr().out
    assert "train groups: 00041 (4), 13000 (4), 20085 (4), 44000 (4)" in out
    assert "val   groups: 00041 (1), 13000 (1), 20085 (1), 44000 (1)" in out
    assert "warning: validation shares every group with train" in out
    assert cli(["data", "check", str(root), "--group-regex", r"^(\d{5})", "--val-groups", "20085"]) == 0
    out = capsys.readouterr().out
    assert "val   groups: 20085 (5)" in out and "warning" not in out
    # Bad group options are one line each, before any file is read.
    assert cli(["data", "check", str(root), "--val-groups", "20085"]) == 2
    assert cli(["data", "check", str(root), "--group-regex", "^(\\d{5}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "needs --group-regex" in err[0] and "must be a Python regular expression" in err[1]


def test_train_and_the_search_take_the_group_options_into_the_config(tmp_path):
    from anodfd.cli import build_parser, config_from_args

    root = make_abl(tmp_path / "pcb", board_ids())
    args = build_parser().parse_args(["train", "--data", str(root), "--group-regex", r"^(\d{5})", "--val-groups",
                                      "13000"])
    config = config_from_args(args)
    assert (config.data.group_regex, config.data.val_groups) == (r"^(\d{5})", "13000")
    from anodfd.data.dataset import make_dataset

    assert {p.name[:5] for p in make_dataset(config.data, "val").pairs} == {"13000"}
    search = load_search()
    parsed = search.parse_args(["--data", str(root), "--group-regex", r"^(\d{5})", "--val-groups", "13000"])
    assert (parsed.group_regex, parsed.val_groups) == (r"^(\d{5})", "13000")


def load_search():
    from tune import search

    return search
