"""Registration of history onto current (`--align`): recovered homographies, fallbacks, out-of-frame pixels, the
cache, and the same registration in training data, eval, predict and the pyfunc."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from anodfd.config import Config, ConfigError
from anodfd.data.align import align_pair, implausible, register, warp_onto
from anodfd.data.shift import random_homography, shift_image

METHODS = ("ecc", "features")


def scene(h: int = 240, w: int = 320, seed: int = 0) -> np.ndarray:
    """A textured RGB image, rich enough in corners and gradients for either registration."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 120, np.uint8)
    for _ in range(80):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(4, 25)), colour, -1)
        else:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(5, 40)), y + int(rng.integers(5, 40))), colour, -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def corner_error(found: np.ndarray, true: np.ndarray, w: int, h: int) -> float:
    corners = np.float64([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]])

    def mapped(m: np.ndarray) -> np.ndarray:
        p = corners @ m.T
        return p[:, :2] / p[:, 2:]

    return float(np.abs(mapped(found) - mapped(true)).max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_known_homography_is_recovered_within_a_pixel(method, seed):
    """History = current warped by a random homography (corners moved up to 2% of the side, as `anodfd data
    shift` does): the registration finds it to within a pixel at every corner, and the registered history matches
    the current image away from the border."""
    current = scene(seed=seed)
    h, w = current.shape[:2]
    true = random_homography(w, h, 0.02, np.random.default_rng(seed))
    history = shift_image(current, true)
    aligned, result, _ = align_pair(history, current, method)
    assert result.ok, result.reason
    # ECC is sub-pixel; ORB keypoints sit on a pixel grid and carry about a pixel of error at the corners.
    assert corner_error(result.matrix, true, w, h) < (1.0 if method == "ecc" else 1.5)
    inner = (slice(12, h - 12), slice(12, w - 12))
    before = np.abs(history.astype(int) - current)[inner].mean()
    after = np.abs(aligned.astype(int) - current)[inner].mean()
    assert after < min(1.5, before / 5), (before, after)


@pytest.fixture(scope="module")
def full_size_image(tmp_path_factory) -> np.ndarray:
    """One current image of the OL stand-in at 2048x1536: the size registration works on a reduced copy of."""
    from anodfd.data.cache import read_rgb
    from anodfd.data.layouts import load_split
    from anodfd.synth import synthesize

    root = synthesize("OL", tmp_path_factory.mktemp("ol"), pairs=3, seed=0, size=(2048, 1536), workers=1,
                      progress=False)
    return read_rgb(load_split(root, "train")[0].cur)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_a_large_image_is_registered_within_a_fifth_of_a_pixel_under_uneven_light(full_size_image, method, seed):
    """At 2048x1536, with the history under another light (a slope and a lamp's hot spot, a black level, noise),
    the homography is right to within 0.2 px at every corner. A 256 px tile of a native-resolution model sees a
    part's edge shifted by a pixel as a change. Registration on the 640 px copy alone was off by 0.7 to 2 px here
    (ECC is pulled by the uneven light, ORB keypoints sit on the reduced copy's grid); the full-size pass fixes
    both."""
    current = full_size_image
    h, w = current.shape[:2]
    rng = np.random.default_rng(seed)
    true = random_homography(w, h, 0.02, rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h - 0.5, xx / w - 0.5
    light = 1 + 0.2 * xx - 0.1 * yy + 0.2 * np.exp(-((xx - 0.25) ** 2 + (yy + 0.2) ** 2) / 0.05)
    lit = shift_image(current, true).astype(np.float32) * light[..., None] - 10 + rng.normal(0, 3, current.shape)
    history = np.clip(lit, 0, 255).astype(np.uint8)
    result = register(history, current, method)
    assert result.ok, result.reason
    assert corner_error(result.matrix, true, w, h) < 0.2


def test_the_full_size_pass_corrects_a_first_estimate_that_settled_far_off(full_size_image):
    """ECC on the reduced copy can settle 20 px off at the corners (it did on one pair of the stand-in's holdout):
    the full-size pass measures again from its own correction until it is small. Two unrelated images give no
    correction at all, and neither does one whose patches disagree."""
    from anodfd.data.align import _refine

    current = full_size_image
    h, w = current.shape[:2]
    true = random_homography(w, h, 0.02, np.random.default_rng(3))
    history = shift_image(current, true)
    off = np.float64([[1.012, 0.004, -6], [-0.003, 0.99, 4], [0, 0, 1]])  # corners 15 to 25 px from the truth
    assert corner_error(true @ off, true, w, h) > 15
    assert corner_error(_refine(history, current, true @ off), true, w, h) < 0.2
    noise = np.random.default_rng(0).integers(0, 256, current.shape, dtype=np.uint8)
    assert np.array_equal(_refine(noise, current, np.eye(3)), np.eye(3))
    # Thirds of the image shifted three ways: each third's patches agree among themselves, but none has half the
    # votes, so no correction is believed (without that rule, the middle third's 5 px would be).
    torn = current.copy()
    for (a, b), shift in (((0, w // 3), 12), ((w // 3, 2 * w // 3), 5), ((2 * w // 3, w), -12)):
        torn[:, a:b] = np.roll(current, shift, axis=0)[:, a:b]
    assert np.array_equal(_refine(torn, current, np.eye(3)), np.eye(3))


@pytest.mark.parametrize("method", METHODS)
def test_identical_images_give_the_identity(method):
    image = scene(seed=5)
    aligned, result, _ = align_pair(image, image, method)
    assert result.ok
    assert np.abs(result.matrix - np.eye(3)).max() < 1e-3
    assert np.abs(aligned.astype(int) - image).max() <= 1


@pytest.mark.parametrize("method", METHODS)
def test_a_pure_noise_pair_falls_back_to_the_identity(method):
    rng = np.random.default_rng(0)
    history, current = (rng.integers(0, 256, (200, 260, 3), dtype=np.uint8) for _ in range(2))
    aligned, result, _ = align_pair(history, current, method)
    assert not result.ok and result.reason
    assert np.array_equal(result.matrix, np.eye(3))
    assert aligned is history  # scored unregistered, not warped by a guess


def test_implausible_homographies_are_refused():
    assert implausible(np.eye(3), 640, 480) == ""
    centre = np.float64([[1, 0, 320], [0, 1, 240], [0, 0, 1]])
    zoom = centre @ np.diag([1.28, 1.28, 1.0]) @ np.linalg.inv(centre)  # corners move 14%, within the limit
    assert "scale" in implausible(zoom, 640, 480)
    assert "corner" in implausible(np.float64([[1, 0, 200], [0, 1, 0], [0, 0, 1]]), 640, 480)
    assert "folds" in implausible(np.float64([[1, 0, 0], [0, 1, 0], [-0.01, 0, 1]]), 640, 480)


def test_pixels_from_outside_the_frame_are_taken_from_current():
    """History seen 12 px further right: registered, its first 12 columns have no history content. They are
    filled from the current image, so template differencing (the scoring of any change) finds nothing there;
    filling them with black, as a plain warp does, would flag the whole strip."""
    from anodfd.scoring import difference_map

    current = scene(seed=3)
    h, w = current.shape[:2]
    history = cv2.warpAffine(current, np.float64([[1, 0, 12], [0, 1, 0]]), (w, h), flags=cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REFLECT)  # history(x) = current(x + 12)
    shift = np.float64([[1, 0, -12], [0, 1, 0], [0, 0, 1]])  # so current pixel x sits at x - 12 in history
    aligned, filled = warp_onto(history, current, shift)
    assert np.array_equal(aligned[:, 12:], current[:, 12:])
    strip = (slice(None), slice(0, 12))
    assert filled[strip].all() and not filled[:, 12:].any()  # what relighting must then leave alone
    assert np.array_equal(aligned[strip], current[strip])
    assert difference_map(aligned, current).max() < 0.1
    black = cv2.warpPerspective(history, shift, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    assert difference_map(black, current)[strip].mean() > 0.2  # the failure the fill prevents


def write_pair(root: Path, name: str, history: np.ndarray, current: np.ndarray) -> None:
    mask = np.zeros(current.shape[:2], np.uint8)
    mask[40:60, 50:80] = 255
    for folder, img in (("A", history), ("B", current), ("label", mask)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / folder / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img)


def test_the_cache_registers_each_pair_once_and_remembers_failures(tmp_path):
    from anodfd.data.cache import PairCache, View
    from anodfd.data.layouts import Pair

    current = scene(seed=7)
    true = random_homography(320, 240, 0.02, np.random.default_rng(7))
    write_pair(tmp_path / "d", "shifted", shift_image(current, true), current)
    rng = np.random.default_rng(1)
    write_pair(tmp_path / "d", "noise", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
               rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    pairs = [Pair(*(tmp_path / "d" / folder / f"{name}.png" for folder in ("A", "B", "label")))
             for name in ("shifted", "noise")]
    view = View(0, 1.0, "ecc")
    cache = PairCache(tmp_path / "cache")
    assert cache.key(pairs[0], view) != cache.key(pairs[0], View(0, 1.0, "none"))
    for _ in range(2):
        arrays = [cache.get(p, view) for p in pairs]
    assert cache.stats["aligned"] == 2 and cache.stats["decoded"] == 2
    registered = arrays[0]
    assert np.abs(registered[20:-20, 20:-20, :3].astype(int) - current[20:-20, 20:-20]).mean() < 2.0
    # Another process: the registered arrays and the failure come from disk, nothing is registered again.
    other = PairCache(tmp_path / "cache")
    failures = {p.hist.stem: other.align_failure(p, view) for p in pairs}
    assert other.stats["aligned"] == 0 and other.stats["disk_hits"] == 2
    assert failures["shifted"] == "" and failures["noise"]



def test_ddp_workers_of_a_node_split_registration_through_the_disk_cache(tmp_path):
    """`register_pairs(share=(i, n))`, as each of a node's DDP workers calls it before the barrier: every pair is
    registered by exactly one worker, and the call after the barrier registers nothing, reads every pair from the
    node's disk cache and still counts the failure another worker met."""
    from anodfd.data.cache import PairCache, View
    from anodfd.data.dataset import PairDataset
    from anodfd.data.layouts import Pair
    from anodfd.evaluation import register_pairs

    current = scene(seed=3)
    names = []
    for i in range(4):
        true = random_homography(320, 240, 0.02, np.random.default_rng(i))
        write_pair(tmp_path / "d", f"shifted{i}", shift_image(current, true), current)
        names.append(f"shifted{i}")
    rng = np.random.default_rng(1)
    write_pair(tmp_path / "d", "noise", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
               rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    pairs = [Pair(*(tmp_path / "d" / folder / f"{name}.png" for folder in ("A", "B", "label")))
             for name in [*names, "noise"]]
    view = View(0, 1.0, "ecc")

    def worker() -> PairDataset:  # each worker process has its own in-memory cache over the shared folder
        return PairDataset(pairs, view, PairCache(tmp_path / "cache"))

    shares = [worker(), worker()]
    for i, ds in enumerate(shares):
        assert register_pairs([ds], share=(i, 2)) is None
    assert [ds.cache.stats["aligned"] for ds in shares] == [3, 2]  # 5 pairs, each registered once
    lines: list[str] = []
    after = worker()
    assert register_pairs([after], lines.append) == 1
    assert after.cache.stats["aligned"] == 0 and after.cache.stats["disk_hits"] == len(pairs)
    assert len(lines) == 1 and "noise.png" in lines[0]


def relit(image: np.ndarray, seed: int, black: float = 0.0) -> np.ndarray:
    """``image`` under another capture's light: exposure and white balance, a tilt across the frame, a hot spot,
    and a camera whose black level sits ``black`` grey levels higher."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = 1 + 0.25 * (xx / w - 0.5) + 0.3 * np.exp(-((xx - 0.3 * w) ** 2 + (yy - 0.6 * h) ** 2) / (2 * (0.3 * w) ** 2))
    gain = rng.uniform(0.8, 1.2) * (1 + rng.uniform(-0.05, 0.05, 3))
    return np.clip(image * field[..., None] * gain + black, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("side", [24, 64])
def test_relighting_cancels_the_capture_light_and_keeps_a_local_change(side):
    """`match_lighting`: history lit differently from current (gain, white balance, a tilt, a hot spot) differs from
    it by 10+ grey levels everywhere; relit, the normal area differs by under a quarter of that, while a stain on
    current keeps at least 80% of the difference it makes in a pair lit alike: a small one (24 px) and one as wide
    as 1.6 times the light's Gaussian (64 px of 320), which a plain ratio of local means fades to about 70%. A pair
    lit alike is left unchanged, and so is a binarised one (nothing but clipped pixels to fit on)."""
    from anodfd.data.align import match_lighting

    current = scene(seed=5)
    history = relit(current, seed=5)
    clean = current.copy()
    stain = (slice(100, 100 + side), slice(150, 150 + side))
    current[stain] = (current[stain] * 0.4).astype(np.uint8)
    normal = np.ones(current.shape[:2], bool)
    normal[90:110 + side, 140:160 + side] = False  # the stain and a margin, where the light's fit may bend
    before = np.abs(history.astype(int) - current)
    after = np.abs(match_lighting(history, current).astype(int) - current)
    assert before[normal].mean() > 10
    assert after[normal].mean() < 0.25 * before[normal].mean()
    assert after[stain].mean() > 0.8 * np.abs(clean.astype(int) - current)[stain].mean()
    assert np.array_equal(match_lighting(current, current), current)
    binary = np.where(history > 127, 255, 0).astype(np.uint8)  # every pixel clipped: no light to fit
    assert np.array_equal(match_lighting(binary, current), binary)


@pytest.mark.parametrize("seed", [3, 7])
def test_relighting_follows_a_lamps_hot_spot_and_keeps_a_large_stain(seed):
    """A lamp's hot spot on history alone (+20%, a Gaussian 0.12 of the width across, like the stand-ins' narrowest)
    and a stain over 40% of each side on current. The wide field alone follows the hot spot halfway: 1 normal pixel in
    100 stays 16+ grey levels off, which a network trained on native crops flags. With the narrow fit after it, that
    pixel is within 10, and the stain keeps 95% of its difference: the narrow field does not bend into it."""
    from anodfd.data.align import match_lighting

    current = scene(seed=seed)
    h, w = current.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = 1 + 0.2 * np.exp(-((xx - 0.6 * w) ** 2 + (yy - 0.4 * h) ** 2) / (2 * (0.12 * w) ** 2))
    history = np.clip(current * field[..., None], 0, 255).astype(np.uint8)
    clean = current.copy()
    stain = (slice(100, 228), slice(40, 168))
    current[stain] = (current[stain] * 0.4).astype(np.uint8)
    normal = np.ones((h, w), bool)
    normal[90:238, 30:178] = False
    after = np.abs(match_lighting(history, current).astype(int) - current)
    assert np.percentile(np.abs(history.astype(int) - current).max(axis=-1)[normal], 99) > 25
    assert np.percentile(after.max(axis=-1)[normal], 99) <= 10
    assert after[stain].mean() > 0.95 * np.abs(clean.astype(int) - current)[stain].mean()


@pytest.mark.parametrize("black", [-12, 20])
def test_relighting_cancels_a_black_level_offset(black):
    """Two cameras whose black levels differ: ``current = gain * history + offset``. A gain alone matches the local
    means but not the contrast, so bright parts stay too bright and dark ones too dark (1 normal pixel in 7 off by 9+
    grey levels, and the networks flag bright metal parts of such pairs). With the fitted offset, 99% of the normal
    pixels are within 8 grey levels, and the stain keeps its contrast. (The scene is dimmed so nothing clips.)"""
    from anodfd.data.align import match_lighting

    current = (scene(seed=5) * 0.6).astype(np.uint8)
    history = relit(current, seed=5, black=black)
    clean = current.copy()
    stain = (slice(100, 124), slice(150, 174))
    current[stain] = (current[stain] * 0.4).astype(np.uint8)
    normal = np.ones(current.shape[:2], bool)
    normal[90:134, 140:184] = False
    after = np.abs(match_lighting(history, current).astype(int) - current)
    assert np.percentile(after.max(axis=-1)[normal], 99) <= 8
    assert after[normal].mean() < 1.5
    assert after[stain].mean() > 0.8 * np.abs(clean.astype(int) - current)[stain].mean()


def test_relighting_leaves_the_pixels_filled_from_current_alone():
    """History seen 12 px further right and under another light. Registered, its first 12 columns have no history
    content and are filled from current; relit, they must still be current's, or the strip would carry the
    history's light back in: the networks flagged such strips along the borders of OL 2048 pairs."""
    from anodfd.data.align import prepare_history

    current = scene(seed=3)
    h, w = current.shape[:2]
    moved = cv2.warpAffine(current, np.float64([[1, 0, 12], [0, 1, 0]]), (w, h), flags=cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REFLECT)  # history(x) = current(x + 12)
    history = relit(moved, seed=3)
    out, registration = prepare_history(history, current, "ecc", relight=True)
    assert registration.ok and abs(registration.matrix[0, 2] + 12) < 1
    assert np.array_equal(out[:, :11], current[:, :11])
    before = np.abs(history.astype(int) - current)[:, 16:].mean()
    assert np.abs(out.astype(int) - current)[:, 16:].mean() < 0.25 * before  # and the rest is relit as before


def one_pair_dataset(root: Path, history: np.ndarray, current: np.ndarray, cache: Path, **view):
    """``history``/``current`` as the only pair of every split, a smoke config over it with ``view`` (256 px -> 64 px
    tiles at native size), and that config's network with weights nudged off their init (so maps are not flat)."""
    import torch

    from anodfd.config import PRESETS, with_window
    from anodfd.train.loop import build_training

    write_pair(root, "p", history, current)
    (root / "list").mkdir()
    for split in ("train", "val", "test"):
        (root / "list" / f"{split}.txt").write_text("p\n")
    config = with_window(Config().with_flat(PRESETS["smoke"]), {
        "data.data": str(root), "data.resize": 0, "data.crop": 64, "data.cache_dir": str(cache), **view})
    torch.manual_seed(0)
    model, _, _ = build_training(config, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return config, model


def test_relight_reaches_training_and_inference_alike(tmp_path):
    """With `--relight`, the decode cache (training and eval) and `pair_map` (predict, the pyfunc, score) both relight
    the history: one map from either path (1e-5), and a different one without `--relight`."""
    from anodfd.data.dataset import make_dataset
    from anodfd.inference import pair_map, resize_probs, sliding_probs

    current = scene(seed=12)
    history = relit(current, seed=12)
    config, model = one_pair_dataset(tmp_path / "d", history, current, tmp_path / "cache", **{"data.relight": True})
    h, c, _ = make_dataset(config.data, "test").arrays(0)
    evaluated = resize_probs(sliding_probs(model, h, c, 64)[None, None], 240, 320)[0, 0].numpy()
    inferred = pair_map(model, config.data, history, current).probs
    unlit = pair_map(model, config.with_flat({"data.relight": False}).data, history, current).probs
    np.testing.assert_allclose(inferred, evaluated, atol=1e-5)
    assert np.abs(unlit - inferred).max() > 1e-3


def test_align_is_part_of_the_config_and_checked():
    from anodfd.data.cache import PairCache, View
    from anodfd.data.layouts import Pair

    config = Config().with_flat({"data.align": "ecc", "data.relight": True})
    restored = Config.from_dict(config.to_dict()).data
    assert (restored.align, restored.relight) == ("ecc", True)
    with pytest.raises(ConfigError, match="data.align"):
        Config().with_flat({"data.align": "sift"})
    with pytest.raises(ConfigError, match="data.relight"):
        Config().with_flat({"data.relight": "yes"})
    # A relit pair is cached apart from the unlit one.
    pair = Pair(*(Path(__file__) for _ in range(3)))
    cache = PairCache(Path("unused"))
    assert cache.key(pair, View.of(restored)) != cache.key(pair, View(0, 1.0, "ecc", False))


@pytest.mark.parametrize("relight", [False, True])
def test_predict_eval_and_pyfunc_register_the_same_way(tmp_path, relight):
    """A shifted pair through `predict`, the eval dataset (decode cache) and the pyfunc gives one map (1e-5), and
    with `--align ecc` that map is close to the one the unshifted pair gets: the network sees a registered pair.
    The same with `--relight`; `predict`'s JSON says which were applied."""
    from types import SimpleNamespace

    from anodfd.checkpoint import checkpoint_dict, save_checkpoint
    from anodfd.data.dataset import make_dataset
    from anodfd.inference import pair_map, resize_probs, sliding_probs
    from anodfd.predict import predict_pairs
    from anodfd.serving import AnomalyMapModel

    current = scene(seed=11)
    history = shift_image(current, random_homography(320, 240, 0.02, np.random.default_rng(11)))
    root = tmp_path / "d"
    config, model = one_pair_dataset(root, history, current, tmp_path / "cache",
                                     **{"data.align": "ecc", "data.relight": relight})
    ckpt = tmp_path / "c.pt"
    save_checkpoint(checkpoint_dict(model, None, 1, config, {"calibrated_threshold": 0.5}, (0.0, 0.0)), ckpt)

    h, c, _ = make_dataset(config.data, "test").arrays(0)
    evaluated = resize_probs(sliding_probs(model, h, c, 64)[None, None], 240, 320)[0, 0].numpy()
    served_model = AnomalyMapModel()
    served_model.load_context(SimpleNamespace(artifacts={"checkpoint": str(ckpt)}))
    served = served_model.predict(None, {"history": history[None], "current": current[None]})[0]
    [prediction] = predict_pairs(model, config, [("p", root / "A" / "p.png", root / "B" / "p.png")], tmp_path / "o", 0.5)
    predicted = cv2.imread(str(prediction.map_path), cv2.IMREAD_GRAYSCALE) / 255.0
    assert evaluated.std() > 1e-3
    np.testing.assert_allclose(served, evaluated, atol=1e-5)
    np.testing.assert_allclose(predicted, evaluated, atol=0.5 / 255 + 1e-5)
    import json

    written = json.loads(prediction.json_path.read_text())
    assert written["align"]["ok"] is True and written["relight"] is relight

    inner = (slice(16, -16), slice(16, -16))
    aligned_pair = pair_map(model, config.data, current, current).probs
    unregistered = pair_map(model, config.with_flat({"data.align": "none"}).data,
                            history, current).probs
    assert np.abs(evaluated - aligned_pair)[inner].mean() < 0.25 * np.abs(unregistered - aligned_pair)[inner].mean()


def test_training_registers_every_pair_once_and_logs_failures(synth_ol, tmp_path):
    """`fit --align ecc` on a copy of the OL stand-in whose history images moved (corners up to 2%): every pair
    registers (align_failed 0 in each epoch's metrics), the registered pairs are cached before the first epoch,
    and resuming the run without registration is refused (the view changed)."""
    from anodfd.config import PRESETS
    from anodfd.data.layouts import load_split
    from anodfd.data.shift import shift_dataset
    from anodfd.train.loop import fit

    shifted = tmp_path / "OL-shifted"
    shift_dataset(synth_ol, shifted, 0.02, progress=False)
    config = Config().with_flat({**PRESETS["smoke"], "data.data": str(shifted), "data.resize": 64,
                                 "model.image_size": 64, "data.align": "ecc", "train.epochs": 1,
                                 "train.max_steps_per_epoch": 2, "data.cache_dir": str(tmp_path / "cache")})
    lines = []
    result = fit(config, tmp_path / "run", log=lines.append)
    assert [h["align_failed"] for h in result["history"]] == [0], lines
    assert not any("fell back" in line for line in lines)
    registered = sum(len(load_split(shifted, split)) for split in ("train", "val"))  # the test split untouched
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == registered
    with pytest.raises(ConfigError, match="align ecc"):
        fit(config.with_flat({"data.align": "none", "train.epochs": 2}), tmp_path / "run", log=lines.append)


def test_a_pair_that_supports_only_a_shift_gets_the_shift_not_the_identity():
    """Flat copper with two long edges (an L): enough for a translation, not for 8 homography parameters. The
    registration keeps the shift (within half a pixel at every corner) instead of folding or falling back, and the
    identity is among the starts, so an unmoved pair stays put."""
    current = np.full((200, 240, 3), 90, np.uint8)
    current[60:, 70:] = 200
    current = cv2.GaussianBlur(current, (5, 5), 0)
    true = np.float64([[1, 0, 5.5], [0, 1, -3.0], [0, 0, 1]])
    history = shift_image(current, true)
    result = register(history, current, "ecc")
    assert result.ok, result.reason
    assert corner_error(result.matrix, true, 240, 200) < 0.5
    assert corner_error(register(current, current, "ecc").matrix, np.eye(3), 240, 200) < 0.1


def test_eval_scores_against_boxes_when_the_dataset_has_them(tmp_path, capsys):
    """`anodfd eval` on an A/B dataset that ships boxes reports both box rules beside the mask-level defects; a bad
    box line fails in one line before any scoring, with nothing written."""
    import json

    from anodfd.checkpoint import checkpoint_dict, save_checkpoint
    from anodfd.cli import main as cli

    current = scene(seed=5)
    history = current.copy()
    current[100:140, 150:200] = (250, 30, 30)  # a stain the mask marks
    root = tmp_path / "d"
    config, model = one_pair_dataset(root, history, current, tmp_path / "cache")
    (root / "boxes").mkdir()
    (root / "boxes" / "p.txt").write_text("150 100 199 139 5\n10 10 20 20 1\n")
    ckpt = tmp_path / "c.pt"
    save_checkpoint(checkpoint_dict(model, None, 1, config, {"calibrated_threshold": 0.5}, (0.0, 0.0)), ckpt)
    out = tmp_path / "eval.json"
    assert cli(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--split", "test", "--json", str(out)]) == 0
    assert "test boxes (1 pairs, 2 boxes)" in capsys.readouterr().out
    boxes = json.loads(out.read_text())["boxes"]
    assert boxes["strict_recall"] <= boxes["box_recall"] and {"box_recall_class_1", "box_recall_class_5"} <= set(boxes)
    (root / "boxes" / "p.txt").write_text("150 100 199\n")
    out.unlink()
    assert cli(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--split", "test", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "p.txt line 1: expected 'x1 y1 x2 y2 [class]'" in err and "\n" not in err and not out.exists()


def test_masks_derived_from_boxes_on_the_registered_pair_drop_the_misregistration_slivers(tmp_path, capsys):
    """A binarised board whose test scan sits 2 px off its template, with one defect (a blob) in a box that also
    crosses a track: |template - test| inside the box (how DeepPCB's masks were made) marks the track's edges as
    well; `anodfd data boxmasks` registers first and marks the blob alone. Bad input writes nothing."""
    from anodfd.cli import main as cli

    rng = np.random.default_rng(3)
    template = np.zeros((200, 240), np.uint8)
    for _ in range(25):  # tracks and pads
        x, y = int(rng.integers(0, 220)), int(rng.integers(0, 180))
        cv2.rectangle(template, (x, y), (x + int(rng.integers(4, 60)), y + int(rng.integers(4, 30))), 255, -1)
    template[60:140, 100:108] = 255  # the track the box crosses
    test = np.roll(template, (2, 2), axis=(0, 1))
    test[70:90, 120:140] = 255 - test[70:90, 120:140]  # the defect
    blob = np.zeros_like(template, bool)
    blob[70:90, 120:140] = True
    root = tmp_path / "pcb"
    for sub, img in (("A", template), ("B", test), ("label", np.zeros_like(template))):
        (root / sub).mkdir(parents=True)
        cv2.imwrite(str(root / sub / "00001.png"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    (root / "list").mkdir()
    (root / "list" / "train.txt").write_text("00001\n")
    box = (95, 65, 145, 95)  # x1 y1 x2 y2: the blob and the track's edges
    unregistered = np.zeros_like(blob)
    inside = (slice(box[1], box[3] + 1), slice(box[0], box[2] + 1))
    unregistered[inside] = (np.abs(template.astype(int) - test) > 127)[inside]
    assert (unregistered & ~blob).sum() > 60, "the shipped rule marks the track's edges"

    assert cli(["data", "boxmasks", str(root), "--out", str(tmp_path / "none")]) == 2  # no boxes yet
    assert "no pair has a boxes file" in capsys.readouterr().err and not (tmp_path / "none").exists()
    (root / "boxes").mkdir()
    (root / "boxes" / "00001.txt").write_text(" ".join(map(str, box)) + " 4\n")
    assert cli(["data", "boxmasks", str(root), "--out", str(tmp_path / "derived")]) == 0
    assert "1 masks derived from 1 boxes" in capsys.readouterr().out
    derived = cv2.imread(str(tmp_path / "derived" / "label" / "00001.png"), cv2.IMREAD_GRAYSCALE) > 127
    assert (derived & blob).sum() >= 0.95 * blob.sum() and (derived & ~blob).sum() <= 10
    assert cv2.imread(str(root / "label" / "00001.png"), cv2.IMREAD_GRAYSCALE).max() == 0, "the source is untouched"
    assert cli(["data", "boxmasks", str(root), "--out", str(tmp_path / "derived")]) == 2  # never overwritten
