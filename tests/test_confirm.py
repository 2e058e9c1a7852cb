"""`--confirm diff`: registered differencing confirms the network's regions, at every threshold, on every path."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from anodfd.config import Config, ConfigError
from anodfd.confirm import FLOOR, confirmed, evidence
from tests.test_align import one_pair_dataset, scene


def regions_with_evidence(binary: np.ndarray, proof: np.ndarray) -> np.ndarray:
    """The reference rule, one threshold at a time: 8-connected regions of ``binary`` holding a ``proof`` pixel."""
    _, labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)
    keep = np.unique(labels[binary & proof])
    return np.isin(labels, keep[keep > 0])


def test_confirmed_map_cut_at_any_threshold_is_the_region_rule():
    """One confirmed map serves every threshold: cut at t it keeps exactly the regions of probs >= t that hold
    evidence (so calibrating on confirmed maps calibrates what is served), and it never raises a probability."""
    rng = np.random.default_rng(0)
    probs = cv2.GaussianBlur(rng.random((120, 160)).astype(np.float32), (0, 0), 3)
    probs = (probs - probs.min()) / (probs.max() - probs.min())  # every level from 0 to 1, the floor included
    proof = rng.random(probs.shape) > 0.998
    out = confirmed(probs, proof)
    assert (out <= probs).all()
    dropped = 0
    for t in np.linspace(FLOOR, 0.95, 19):
        kept = regions_with_evidence(probs >= t, proof)
        np.testing.assert_array_equal(out >= t, kept)
        dropped += int((probs >= t).sum() - kept.sum())
    assert dropped > 1000  # the case is not trivial: whole regions go at many thresholds
    np.testing.assert_array_equal(out >= FLOOR / 2, out >= FLOOR)  # below the floor, cut as at the floor


def test_confirmed_by_hand():
    """Two blobs, evidence in the left one only: the right one goes to 0. The left blob's second peak joins the
    evidence only through a saddle at 0.3, so it is lowered to 0.3: above 0.3 it is a region without evidence."""
    probs = np.zeros((5, 11), np.float32)
    probs[2, 0:5] = [0.9, 0.8, 0.3, 0.7, 0.6]  # left blob: evidence at the 0.9 end
    probs[2, 8:10] = 0.95  # right blob, no evidence
    proof = np.zeros(probs.shape, bool)
    proof[2, 0] = True
    out = confirmed(probs, proof)
    np.testing.assert_allclose(out[2, :5], [0.9, 0.8, 0.3, 0.3, 0.3])
    assert not out[:, 5:].any()


def test_confirm_is_checked_and_travels_in_the_config():
    config = Config().with_flat({"data.confirm": "diff"})
    assert Config.from_dict(config.to_dict()).data.confirm == "diff"
    assert Config.from_dict({"data": {}}).data.confirm == "none"  # a checkpoint written before the option
    with pytest.raises(ConfigError, match=r"--confirm 'edges' \(data.confirm\)"):
        Config().with_flat({"data.confirm": "edges"})


def test_every_path_serves_the_confirmed_map(tmp_path):
    """Validation (`evaluate`), `predict` and the pyfunc all cut the same confirmed map: the network's map with the
    regions the registered difference does not touch removed. A pair that did not change gives no evidence, so
    nothing is detected, whatever the network says."""
    from types import SimpleNamespace

    import torch

    from anodfd.checkpoint import checkpoint_dict, save_checkpoint
    from anodfd.data.dataset import make_dataset
    from anodfd.evaluation import evaluate
    from anodfd.inference import pair_map
    from anodfd.predict import analyse
    from anodfd.serving import AnomalyMapModel

    current = scene(seed=5)
    history = current.copy()
    history[100:130, 150:190] = 255 - history[100:130, 150:190]  # one real change
    config, model = one_pair_dataset(tmp_path / "d", history, current, tmp_path / "cache", **{"data.confirm": "diff"})
    plain = pair_map(model, config.with_flat({"data.confirm": "none"}).data, history, current).probs
    served = pair_map(model, config.data, history, current).probs
    np.testing.assert_allclose(served, confirmed(plain, evidence(history, current)), atol=1e-6)
    threshold = float(np.quantile(plain, 0.5))  # half the pixels detected before confirming
    assert (served >= threshold).sum() < (plain >= threshold).sum()

    seen = []
    evaluate(model, make_dataset(config.data, "test"), torch.device("cpu"), config.data.window,
             on_pair=lambda i, probs, mask: seen.append(probs), confirm="diff")
    np.testing.assert_allclose(seen[0], served, atol=1e-5)

    ckpt = tmp_path / "c.pt"
    save_checkpoint(checkpoint_dict(model, None, 1, config, {"calibrated_threshold": threshold}, (0.0, 0.0)), ckpt)
    pyfunc = AnomalyMapModel()
    pyfunc.load_context(SimpleNamespace(artifacts={"checkpoint": str(ckpt)}))
    np.testing.assert_allclose(pyfunc.predict(None, {"history": history, "current": current}), served, atol=1e-5)

    unchanged = analyse(model, config.data, current, current, threshold)
    assert not unchanged.binary.any() and unchanged.boxes == []
    assert (analyse(model, config.with_flat({"data.confirm": "none"}).data, current, current, threshold).binary.any())
