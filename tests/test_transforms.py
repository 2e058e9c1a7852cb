"""Pair augmentation: geometry stays aligned across history, current and mask; photometry and
misregistration are independent where they should be; randomness is reproducible and per-worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from anodfd.config import DataConfig
from anodfd.data.transforms import PAPER_OPS, PairTransform, build_transform

SIZE = 64
SQUARE = (slice(12, 16), slice(40, 44))  # off-centre and off-diagonal, so every flip moves it somewhere new

EXPECTED = {  # the paper's four options, written independently of albumentations
    "identity": lambda a: a,
    "vflip": lambda a: a[::-1],
    "hflip": lambda a: a[:, ::-1],
    "rot180": lambda a: a[::-1, ::-1],
}


def _images(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct random history and current; a bright square in current and the same square in the mask."""
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    cur = rng.integers(0, 80, (SIZE, SIZE, 3), dtype=np.uint8)
    cur[SQUARE] = 255
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[SQUARE] = 1
    return hist, cur, mask


def _centroid(weights: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(weights)
    return np.array([ys.mean(), xs.mean()])


def _bright_centroid(img: np.ndarray) -> np.ndarray:
    """Centre of the marked square: pixels clearly brighter than the dark background."""
    gray = img.astype(np.float32).mean(axis=2)
    return _centroid(gray > (gray.max() + np.median(gray)) / 2)


@pytest.mark.parametrize("op", list(PAPER_OPS))
def test_each_paper_op_hits_all_three_identically(op):
    hist, cur, mask = _images()
    h, c, m = PairTransform("paper", seed=0, paper_ops=(op,))(hist, cur, mask)
    np.testing.assert_array_equal(c, EXPECTED[op](cur))
    np.testing.assert_array_equal(h, EXPECTED[op](hist))
    np.testing.assert_array_equal(m, EXPECTED[op](mask))
    assert m[SQUARE].sum() == 0 or op == "identity"  # the square really moved for the three flips
    assert all(a.flags.c_contiguous for a in (h, c, m))


def test_paper_ops_are_equally_likely_and_shared():
    hist, cur, mask = _images()
    t = PairTransform("paper", seed=3)
    counts = dict.fromkeys(PAPER_OPS, 0)
    for _ in range(400):
        h, c, m = t(hist, cur, mask)
        matches = [op for op, f in EXPECTED.items() if np.array_equal(c, f(cur))]
        assert len(matches) == 1
        op = matches[0]
        np.testing.assert_array_equal(h, EXPECTED[op](hist))
        np.testing.assert_array_equal(m, EXPECTED[op](mask))
        counts[op] += 1
    # Binomial(400, 1/4): mean 100, sd 8.7; 70..130 is over 3 sd either way.
    assert all(70 <= n <= 130 for n in counts.values()), counts


def test_strong_keeps_current_and_mask_aligned():
    hist, cur, mask = _images()
    t = PairTransform("strong", seed=1)
    offsets = []
    for _ in range(150):
        h, c, m = t(hist, cur, mask)
        assert h.shape == hist.shape and c.shape == cur.shape and m.shape == mask.shape
        assert h.dtype == c.dtype == m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 1}
        assert 3 * 3 <= m.sum() <= 5 * 5  # the 4x4 square, scaled by at most 10% per side, nearest-sampled
        np.testing.assert_allclose(_bright_centroid(c), _centroid(m), atol=1.0)
        offsets.append(np.abs(_centroid(m) - _centroid(mask)).sum())
    # Scale and shift really act: a vacuous pass (everything left in place) would fail here.
    assert np.mean([o > 0.5 for o in offsets]) > 0.9


def test_strong_mask_stays_binary():
    rng = np.random.default_rng(5)
    hist, cur, _ = _images()
    mask = (rng.random((SIZE, SIZE)) < 0.3).astype(np.uint8)
    t = PairTransform("strong", misregister=0.05, seed=2)
    for _ in range(50):
        _, _, m = t(hist, cur, mask)
        assert set(np.unique(m)) <= {0, 1}


def test_strong_geometry_is_shared_by_history_and_current():
    _, cur, mask = _images()
    t = PairTransform("strong", seed=4, photometric=False)
    changed = 0
    for _ in range(50):
        h, c, _ = t(cur, cur, mask)  # same picture in, so same geometry means same picture out
        np.testing.assert_array_equal(h, c)
        changed += not np.array_equal(c, cur)
    assert changed >= 45


def test_photometric_draws_differ_between_history_and_current():
    _, cur, mask = _images()
    t = PairTransform("strong", seed=5)
    mean_gaps = []
    for _ in range(60):
        h, c, _ = t(cur, cur, mask)
        mean_gaps.append(abs(h.astype(np.float32).mean() - c.astype(np.float32).mean()))
        # Photometry must not move anything: the square is where the mask says, in both images.
        np.testing.assert_allclose(_bright_centroid(h), _bright_centroid(c), atol=1.0)
    gaps = np.array(mean_gaps)
    assert (gaps > 0.5).mean() > 0.7, gaps  # brightness/contrast/gamma drawn independently
    assert gaps.mean() > 2.0


def test_misregister_moves_history_only():
    hist, cur, mask = _images()
    hist = cur.copy()  # the square in history too, so we can see how far it moves
    f = 0.05
    t = PairTransform("none", misregister=f, seed=6)
    moves = []
    for _ in range(60):
        h, c, m = t(hist, cur, mask)
        np.testing.assert_array_equal(c, cur)
        np.testing.assert_array_equal(m, mask)
        moves.append(np.linalg.norm(_bright_centroid(h) - _centroid(mask)))
    moves = np.array(moves)
    # Bound: shift f*SIZE per axis, plus rotation 60*f degrees and scale 1 +- f about the centre.
    radius = np.linalg.norm(_centroid(mask) - (SIZE - 1) / 2)
    bound = np.sqrt(2) * f * SIZE + radius * (np.deg2rad(60 * f) + f) + 1
    assert moves.max() <= bound, (moves.max(), bound)
    assert (moves > 0.5).mean() > 0.8


def test_misregister_comes_after_the_shared_geometry():
    _, cur, mask = _images()
    t = PairTransform("paper", misregister=0.05, seed=7, paper_ops=("rot180",))
    for _ in range(20):
        h, c, m = t(cur.copy(), cur, mask)
        np.testing.assert_array_equal(c, cur[::-1, ::-1])
        np.testing.assert_array_equal(m, mask[::-1, ::-1])
        # History follows the flip (it lands near the flipped square), give or take the small misregistration.
        assert np.linalg.norm(_bright_centroid(h) - _centroid(m)) < 0.05 * SIZE * 3


def _run(t: PairTransform, n: int = 10) -> list[np.ndarray]:
    hist, cur, mask = _images()
    return [np.concatenate([a.ravel() for a in t(hist, cur, mask)]) for _ in range(n)]


def test_seed_reproduces_and_reseed_restarts():
    a = _run(PairTransform("strong", misregister=0.03, seed=11))
    b = _run(PairTransform("strong", misregister=0.03, seed=11))
    other = _run(PairTransform("strong", misregister=0.03, seed=12))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, other))
    t = PairTransform("strong", misregister=0.03, seed=12)
    _run(t, 3)
    t.reseed(11)
    assert all(np.array_equal(x, y) for x, y in zip(a, _run(t)))


class _SamePair(Dataset):
    """Every item is the same pair, so any difference between items comes from the transform."""

    def __init__(self, transform: PairTransform):
        self.transform = transform
        self.pair = _images()

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([a.ravel() for a in self.transform(*self.pair)]))


def _loader_items(seed: int) -> list[torch.Tensor]:
    # No worker_init_fn on purpose: the transform must notice it is in a new process and reseed itself.
    ds = _SamePair(PairTransform("strong", misregister=0.03, seed=0))
    loader = DataLoader(ds, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(seed))
    return [batch[0] for batch in loader]


def test_dataloader_workers_draw_independently_and_reproducibly():
    first = _loader_items(seed=1)
    # Items 0 and 1 are the first draws of worker 0 and worker 1: a copied stream would make them equal.
    assert not torch.equal(first[0], first[1])
    again = _loader_items(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], _loader_items(seed=2)[0])


def test_build_transform():
    assert build_transform(DataConfig(augment="strong"), train=False) is None
    assert build_transform(DataConfig(augment="none", misregister=0.0), train=True) is None
    t = build_transform(DataConfig(augment="none", misregister=0.02), train=True, seed=0)
    assert isinstance(t, PairTransform) and t.augment == "none" and t.misregister == 0.02
    t = build_transform(DataConfig(augment="paper"), train=True, seed=0)
    assert isinstance(t, PairTransform) and t.augment == "paper"
    assert build_transform(DataConfig(augment="none", crop=64), train=True, seed=0) is not None  # crops alone
    assert build_transform(DataConfig(augment="none", crop=64), train=False) is None  # validation is tiled whole


def _coordinates(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """History and current whose pixels spell their own (row, column); a mask that is a function of them."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy, xx, (yy + xx) % 256], axis=2).astype(np.uint8)
    return img.copy(), img.copy(), ((yy // 7 + xx // 5) % 2).astype(np.uint8)


def test_crops_cut_the_same_window_from_history_current_and_mask():
    hist, cur, mask = _coordinates(100, 140)
    t = PairTransform("paper", crop=48, seed=0)
    corners = set()
    for _ in range(30):
        h, c, m = t(hist, cur, mask)
        assert h.shape == c.shape == (48, 48, 3) and m.shape == (48, 48)
        assert np.array_equal(h, c)
        # Undo the shared flip through the coordinates the pixels carry, then the mask must match them.
        rows, cols = h[..., 0].astype(int), h[..., 1].astype(int)
        assert np.array_equal(m, mask[rows, cols])
        corners.add((rows.min(), cols.min()))
    assert len(corners) > 20  # windows are drawn anywhere, not one fixed place


def test_crops_are_placed_on_anomalies_as_often_as_asked():
    hist, cur, _ = _coordinates(200, 200)
    mask = np.zeros((200, 200), np.uint8)
    mask[150:153, 20:23] = 1  # one 3x3 defect: an unbiased 32 px crop holds it about 3% of the time
    hit = {}
    for fraction in (0.0, 0.5, 1.0):
        t = PairTransform("none", crop=32, crop_pos_fraction=fraction, seed=1)
        hit[fraction] = np.mean([t(hist, cur, mask)[2].any() for _ in range(200)])
    assert hit[0.0] < 0.1 and 0.35 < hit[0.5] < 0.65 and hit[1.0] == 1.0, hit
    normal = np.zeros_like(mask)  # a pair without anomalies still gets crops
    assert PairTransform("none", crop=32, crop_pos_fraction=1.0, seed=1)(hist, cur, normal)[0].shape == (32, 32, 3)


def test_crops_placed_on_anomalies_choose_each_defect_equally_often():
    # A 60x60 stain beside a 3x3 crack: drawn by pixel, the crack would be in 9 of 3609 placed crops; a user with
    # defects a few pixels wide on large images needs it in about half of them.
    hist, cur, _ = _coordinates(250, 250)  # pixels carry their row and column (under 256, so uint8 holds them)
    mask = np.zeros((250, 250), np.uint8)
    mask[20:80, 20:80] = 1
    mask[220:223, 200:203] = 1
    t = PairTransform("none", crop=32, crop_pos_fraction=1.0, seed=2)
    crops = [t(hist, cur, mask) for _ in range(300)]
    on_crack = np.mean([(h[..., 0] >= 200).any() and m.any() for h, _c, m in crops])
    on_stain = np.mean([(h[..., 0] < 80).any() and m.any() for h, _c, m in crops])
    assert 0.4 < on_crack < 0.6 and 0.4 < on_stain < 0.6, (on_crack, on_stain)
    assert all(m.any() for _h, _c, m in crops)  # the window still holds a pixel of the defect it was placed on


def test_views_smaller_than_the_crop_are_padded_by_reflection():
    hist, cur, mask = _coordinates(40, 30)
    h, _c, m = PairTransform("none", crop=64, seed=0)(hist, cur, mask)
    assert h.shape == (64, 64, 3) and m.shape == (64, 64)
    rows, cols = h[..., 0].astype(int), h[..., 1].astype(int)
    assert rows.max() < 40 and cols.max() < 30 and np.array_equal(m, mask[rows, cols])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        PairTransform("flips")
    with pytest.raises(ValueError):
        PairTransform("paper", misregister=-0.1)
    with pytest.raises(ValueError):
        PairTransform("paper", paper_ops=("rot90",))
    hist, cur, mask = _images()
    with pytest.raises(ValueError):
        PairTransform("paper")(hist[:32], cur, mask)
