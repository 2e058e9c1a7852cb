import math

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from anodfd.metrics import ImageScores, PixelHistogram, format_row, image_scores, plot_roc

torch.set_num_threads(1)


def _hist(probs, target, bins: int = 1000) -> PixelHistogram:
    hist = PixelHistogram(bins)
    hist.update(torch.as_tensor(probs), torch.as_tensor(target))
    return hist


def _informative(n: int, seed: int, positive_rate: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Scores that separate the classes imperfectly (AUC about 0.85)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < positive_rate).astype(np.float32)
    probs = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * labels - 1.0)))
    return probs.astype(np.float32), labels


def test_small_case_by_hand():
    # 4 anomalous pixels, 6 normal ones, as a 1 x 1 x 2 x 5 map.
    probs = torch.tensor([0.9, 0.6, 0.5, 0.4, 0.2, 0.1, 0.7, 0.3, 0.55, 0.05]).view(1, 1, 2, 5)
    target = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float32).view(1, 1, 2, 5)
    hist = _hist(probs, target)
    # At 0.5: anomalies 0.9, 0.6, 0.5 found (0.5 >= 0.5), 0.4 missed; normals 0.7 and 0.55 flagged.
    assert hist.confusion(0.5) == (3, 2, 4, 1)
    m = hist.compute(0.5)
    assert m["precision"] == pytest.approx(3 / 5)  # 0.6
    assert m["recall"] == pytest.approx(3 / 4)  # 0.75
    assert m["oa"] == pytest.approx(7 / 10)  # 0.7
    assert m["f1"] == pytest.approx(6 / 9)  # 2*3 / (2*3 + 2 + 1) = 0.667 = harmonic mean of 0.6 and 0.75
    assert m["iou"] == pytest.approx(3 / 6)  # 3 / (3 + 2 + 1) = 0.5
    assert m["threshold"] == 0.5
    # At 0.6: 0.9, 0.6 found; 0.7 flagged.
    assert hist.confusion(0.6) == (2, 1, 5, 2)
    # AUC by counting pairs: of the 24 (anomaly, normal) pairs the anomaly scores higher in 19
    # (0.9 beats all 6 normals, 0.6 beats 5, 0.5 beats 4, 0.4 beats 4), no ties.
    assert m["auc"] == pytest.approx(19 / 24)


def test_merge_of_halves_equals_whole():
    probs, labels = _informative(20_000, seed=0)
    whole = _hist(probs, labels)
    first, second = _hist(probs[:7_000], labels[:7_000]), _hist(probs[7_000:], labels[7_000:])
    assert first.merge(second) is first
    assert torch.equal(first.state(), whole.state())
    assert int(whole.state().sum()) == 20_000
    assert first.compute() == whole.compute()


def test_state_round_trip_and_summed_states():
    probs, labels = _informative(5_000, seed=1)
    a, b = _hist(probs[:2_000], labels[:2_000]), _hist(probs[2_000:], labels[2_000:])
    state = a.state()
    assert state.dtype == torch.int64 and state.shape == (2, 1000)
    assert torch.equal(PixelHistogram.from_state(state).state(), state)
    # What all_reduce(SUM) does across workers: add the states.
    summed = PixelHistogram.from_state(a.state() + b.state())
    assert torch.equal(summed.state(), _hist(probs, labels).state())
    # state() is a copy: reducing it in place must not touch the histogram.
    state += 1
    assert not torch.equal(a.state(), state)


def test_threshold_exact_on_every_grid_point():
    bins = 1000
    grid = np.arange(bins) / bins
    # Every edge as float64 and float32, plus the neighbouring representable values on both sides.
    edges = [grid, np.nextafter(grid, -1), np.nextafter(grid, 2)]
    grid32 = grid.astype(np.float32)
    edges32 = [grid32, np.nextafter(grid32, np.float32(-1)), np.nextafter(grid32, np.float32(2))]
    for probs in (np.concatenate(edges), np.concatenate(edges32)):
        probs = probs[(probs >= 0) & (probs < 1)]
        hist = _hist(probs, np.ones_like(probs))
        for k in range(bins):
            tp, fp, tn, _ = hist.confusion(k / bins)
            assert tp == int((probs.astype(np.float64) >= k / bins).sum()), k
            assert fp == tn == 0


def test_probability_exactly_at_threshold_counts_positive():
    hist = _hist(torch.tensor([0.5, np.nextafter(0.5, 0)], dtype=torch.float64), torch.tensor([1.0, 0.0]))
    assert hist.confusion(0.5) == (1, 0, 1, 0)
    assert hist.compute(0.5)["f1"] == 1.0


def test_off_grid_threshold_is_rounded_and_reported():
    hist = _hist(torch.tensor([0.5003, 0.9]), torch.tensor([1.0, 1.0]))
    assert hist.compute(0.5004)["threshold"] == 0.5
    assert hist.confusion(0.5004) == (2, 0, 0, 0)  # 0.5003 counts: the threshold used is 0.5
    assert hist.compute(0.5006)["threshold"] == 0.501
    assert hist.confusion(0.5006) == (1, 0, 0, 1)


def test_out_of_range_probabilities_are_clamped_and_nan_rejected():
    hist = _hist(torch.tensor([-0.5, 1.0, 2.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert hist.neg[0] == 1 and hist.pos[-1] == 2
    # Threshold 1.0 predicts nothing positive: p == 1.0 shares the top bin [0.999, 1].
    assert hist.confusion(1.0) == (0, 0, 1, 2)
    with pytest.raises(ValueError, match="NaN"):
        hist.update(torch.tensor([float("nan")]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shape"):
        hist.update(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))


def test_empty_denominator_conventions():
    negatives = torch.zeros(100)
    # All negative, none predicted: nothing to find, nothing flagged -> a perfect score.
    perfect = _hist(torch.full((100,), 0.1), negatives).compute()
    assert [perfect[k] for k in ("precision", "recall", "oa", "f1", "iou")] == [1.0] * 5
    # All negative, some flagged: every flagged pixel is a false positive.
    flagged = _hist(torch.tensor([0.9] * 10 + [0.1] * 90), negatives).compute()
    assert [flagged[k] for k in ("precision", "recall", "f1", "iou")] == [0.0] * 4
    assert flagged["oa"] == pytest.approx(0.9)
    # Anomalies present, none predicted: 0/0 precision is 0.
    silent = _hist(torch.full((100,), 0.1), torch.tensor([1.0] * 5 + [0.0] * 95)).compute()
    assert [silent[k] for k in ("precision", "recall", "f1", "iou")] == [0.0] * 4
    # With one class only, AUC, EER and the ROC are undefined.
    for m in (perfect, flagged):
        assert math.isnan(m["auc"]) and math.isnan(m["eer"])
    assert np.isnan(_hist(torch.rand(10), torch.ones(10)).roc()[0]).all()


def test_auc_matches_sklearn():
    probs, labels = _informative(300_000, seed=2)
    hist = _hist(probs, labels)
    reference = roc_auc_score(labels, probs)
    assert 0.8 < reference < 0.95  # informative, not trivial
    assert hist.compute()["auc"] == pytest.approx(reference, abs=1e-3)
    fpr, tpr = hist.roc()
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()


def test_eer_matches_sklearn_roc():
    probs, labels = _informative(200_000, seed=3)
    fpr, tpr, _ = roc_curve(labels, probs)
    # Crossing of sklearn's exact ROC with FPR = 1 - TPR, interpolated the same way.
    gap = fpr + tpr - 1
    i = int(np.argmax(gap >= 0))
    reference = fpr[i - 1] + gap[i - 1] / (gap[i - 1] - gap[i]) * (fpr[i] - fpr[i - 1])
    assert 0.15 < reference < 0.35
    assert _hist(probs, labels).eer() == pytest.approx(reference, abs=2e-3)


def test_eer_perfect_and_random():
    rng = np.random.default_rng(4)
    labels = (rng.random(100_000) < 0.3).astype(np.float32)
    separated = np.where(labels == 1, rng.uniform(0.8, 1.0, labels.size), rng.uniform(0.0, 0.3, labels.size))
    perfect = _hist(separated, labels).compute()
    assert perfect["eer"] == 0.0 and perfect["auc"] == 1.0
    random = _hist(rng.random(labels.size), labels).compute()
    assert random["eer"] == pytest.approx(0.5, abs=0.01)
    assert random["auc"] == pytest.approx(0.5, abs=0.01)


def test_best_f1_threshold_constructed_case():
    # bins = 10: normals 100 at 0.05, 10 at 0.35, 2 at 0.65; anomalies 5 at 0.25, 20 at 0.45, 20 at 0.85.
    probs = np.array([0.05] * 100 + [0.35] * 10 + [0.65] * 2 + [0.25] * 5 + [0.45] * 20 + [0.85] * 20)
    labels = np.array([0.0] * 112 + [1.0] * 45)
    hist = _hist(probs, labels, bins=10)
    # By hand, F1 = 2tp / (2tp + fp + fn): t <= 0.2: 90/202; t = 0.3: 80/97; t = 0.4: tp 40, fp 2, fn 5
    # -> 80/87 = 0.920; t = 0.5, 0.6: 40/67; t = 0.7, 0.8: 40/65; t >= 0.9: 0.
    threshold, f1 = hist.best_f1_threshold()
    assert threshold == 0.4 and f1 == pytest.approx(80 / 87)
    # Brute force on the raw scores agrees.
    brute = [
        (2 * ((probs >= t) & (labels == 1)).sum()) / ((probs >= t).sum() + 45) for t in np.arange(11) / 10
    ]
    assert int(np.argmax(brute)) == 4 and max(brute) == pytest.approx(f1)
    # Classes separated by empty bins: F1 = 1 for t in 0.2 .. 0.8; the middle of the tie is chosen.
    separated = _hist(np.array([0.15] * 10 + [0.85] * 10), np.array([0.0] * 10 + [1.0] * 10), bins=10)
    assert separated.best_f1_threshold() == (0.5, 1.0)


def test_image_scores_top_fraction():
    ramp = (torch.arange(100, dtype=torch.float32) / 100).view(1, 1, 10, 10)
    assert image_scores(ramp).item() == pytest.approx(0.99)  # top 1% of 100 pixels = the max
    assert image_scores(ramp, topk_fraction=0.05).item() == pytest.approx(0.97)  # mean of 0.95 .. 0.99
    # One hot pixel among 400 weighs 1/4 (top 4 pixels), not 1 as a max would.
    hot = torch.zeros(2, 1, 20, 20)
    hot[0, 0, 3, 3] = 1.0
    assert image_scores(hot).tolist() == pytest.approx([0.25, 0.0])


def test_image_auroc_matches_sklearn():
    g = torch.Generator().manual_seed(5)
    n = 400
    labels = (torch.rand(n, generator=g) < 0.5).float()
    probs = torch.rand(n, 1, 16, 16, generator=g) * 0.6
    masks = torch.zeros(n, 1, 16, 16)
    for i in torch.nonzero(labels).flatten().tolist():
        masks[i, 0, 4:6, 4:6] = 1
        probs[i, 0, 4:6, 4:6] = torch.rand(2, 2, generator=g) * 0.6 + 0.3  # a faint, overlapping blob
    scores = ImageScores()
    for start in range(0, n, 64):  # in batches, as an evaluation loop would
        scores.update(probs[start : start + 64], masks[start : start + 64])
    reference = roc_auc_score(labels.numpy(), image_scores(probs).numpy())
    assert 0.6 < reference < 0.99
    assert scores.auroc() == pytest.approx(reference, abs=1e-2)
    # Gathering: the state round trip and a merge of halves give the same counts.
    half_a, half_b = ImageScores(), ImageScores()
    half_a.update(probs[:150], masks[:150])
    half_b.update(probs[150:], masks[150:])
    assert torch.equal(half_a.merge(half_b).state(), scores.state())
    assert ImageScores.from_state(scores.state()).auroc() == scores.auroc()


def test_plot_roc_writes_png(tmp_path):
    probs, labels = _informative(20_000, seed=6)
    hist = _hist(probs, labels)
    single = plot_roc(hist, tmp_path / "roc.png")
    weaker = _hist(np.clip(probs + np.random.default_rng(7).normal(0, 0.3, probs.size), 0, 1), labels)
    several = plot_roc({"AnoDFDNet": hist, "UNet": weaker}, tmp_path / "sub" / "baselines.png", title="OL")
    for path in (single, several):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_format_row():
    metrics = {
        "precision": 0.8123,
        "recall": 0.79,
        "oa": 0.9912,
        "f1": 0.8006,
        "iou": 0.6679,
        "auc": 0.987,
        "eer": 0.0549,
        "threshold": 0.5,
    }
    expected = "Pre 0.812 | Re 0.790 | OA 0.991 | F1 0.801 | IoU 0.668 | AUC 0.987 | EER 0.055"
    assert format_row(metrics) == expected
    assert format_row({"f1": 0.5, "iou": 1 / 3}) == "F1 0.500 | IoU 0.333"


# --- defect level ----------------------------------------------------------------------------------------


def _defect_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """(thresholded map, mask) pairs whose defect counts are written out by hand below."""
    # Pair 1: two defects and two specks (4 px mask regions, under the 16 px rule). One defect is found by a region
    # overlapping it; the other is missed. A 9 px predicted speck is dropped; a region on a mask speck alone is
    # neither a hit nor a false alarm; a region on nothing is a false alarm.
    mask, pred = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    mask[2:6, 2:6] = mask[30:34, 2:6] = 1  # defects, 16 px each
    mask[20:22, 20:22] = mask[10:12, 30:32] = 1  # specks
    pred[4:10, 4:10] = 1  # 36 px, overlaps the first defect
    pred[20:23, 20:23] = 1  # 9 px speck, dropped
    pred[8:13, 28:33] = 1  # 25 px on the second speck only: not counted
    pred[30:36, 30:36] = 1  # 36 px on nothing: a false alarm
    # Pair 2: fragments 2 px apart are one defect; two more 8 px apart are two. Three regions find all three.
    mask2, pred2 = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    mask2[0:4, 0:4] = mask2[0:4, 6:10] = 1
    mask2[20:24, 0:4] = mask2[20:24, 12:16] = 1
    pred2[0:5, 0:5] = pred2[20:25, 0:5] = 1
    pred2[20:24, 12:17] = 1
    # Pair 3: nothing to find, nothing flagged.
    empty = np.zeros((40, 40), np.uint8)
    return [(pred, mask), (pred2, mask2), (empty, empty)]


def test_defect_counts_match_hand_counted_cases():
    from anodfd.metrics import DefectCounts
    from anodfd.predict import regions

    cases = _defect_cases()
    counts = DefectCounts()
    for pred, mask in cases:
        counts.update(pred, mask)
    assert counts.counts == {"defects": 5, "found": 4, "detections": 5, "false_alarms": 1, "pairs": 3,
                             "pairs_with_defects": 2, "pairs_all_found": 1}
    m = counts.compute()
    assert m["defect_precision"] == pytest.approx(4 / 5) and m["defect_recall"] == pytest.approx(4 / 5)
    assert m["defect_f"] == pytest.approx(4 / 5)
    assert m["false_alarms_per_image"] == pytest.approx(1 / 3) and m["all_found"] == pytest.approx(1 / 2)
    # The detections are exactly `anodfd predict`'s boxes.
    pred, _ = cases[0]
    assert len(regions(pred, pred.astype(np.float32))) == 3

    # Counted per process and summed (as ranks are) gives the same as one pass.
    a, b = DefectCounts(), DefectCounts()
    a.update(*cases[0])
    for pred, mask in cases[1:]:
        b.update(pred, mask)
    merged = DefectCounts.from_state(a.state() + b.state())
    assert merged.counts == counts.counts and a.merge(b).counts == counts.counts

    only_empty = DefectCounts()
    only_empty.update(*cases[2])
    assert only_empty.compute() == {"defect_precision": 1.0, "defect_recall": 1.0, "defect_f": 1.0,
                                    "false_alarms_per_image": 0.0, "all_found": 1.0}
    with pytest.raises(ValueError, match="differ in size"):
        DefectCounts().update(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))


def test_defect_groups_left_out_of_regions_count_as_specks():
    """A caller that knows some mask groups are not defects (the derived masks' edge slivers) leaves them out of
    ``regions``: missing one costs no recall, a region on it alone is no false alarm, one on a defect still hits."""
    from anodfd.metrics import DefectCounts, defect_regions

    mask, pred = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    mask[2:6, 2:6] = 1  # a defect, found
    mask[30:32, 0:20] = 1  # 2x20 px sliver, flagged below
    mask[12:14, 20:40] = 1  # 2x20 px sliver, missed
    pred[0:8, 0:8] = 1
    pred[29:33, 0:10] = 1
    labels, defects = defect_regions(mask)
    assert len(defects) == 3
    plain, without = DefectCounts(), DefectCounts()
    plain.update(pred, mask)
    sliver = labels[30, 5]
    missed = labels[12, 25]
    without.update(pred, mask, regions=(labels, [d for d in defects if d not in (sliver, missed)]))
    assert plain.counts["defects"] == 3 and plain.counts["found"] == 2 and plain.counts["false_alarms"] == 0
    assert without.counts == {"defects": 1, "found": 1, "detections": 1, "false_alarms": 0, "pairs": 1,
                              "pairs_with_defects": 1, "pairs_all_found": 1}


def test_derived_mask_groups_are_sorted_by_what_the_registered_pair_shows():
    """`benchmarks/resolution.py --misses` on masks derived from boxes (DeepPCB's): a 2 px sliver along a track edge
    is binarisation noise, a spur as wide as a defect is a defect even on an edge, a blob is a defect, and a group
    where the registered pair no longer differs vanished with the misregistration that made it."""
    from conftest import load_benchmark

    from anodfd.metrics import defect_regions

    bench = load_benchmark("resolution")

    hist = np.zeros((80, 80), np.uint8)
    hist[:, 20:30] = 255  # a track
    cur = hist.copy()
    cur[:, 30:32] = 255  # its edge 2 px further along its whole length: binarisation noise
    cur[40:50, 30:38] = 255  # a spur 8 px out
    cur[50:58, 55:63] = 255  # copper on bare board
    mask = np.zeros_like(hist)
    mask[10:30] = cur[10:30] != hist[10:30]  # a box over the noise alone
    mask[40:50] = cur[40:50] != hist[40:50]
    mask[50:58] = cur[50:58] != hist[50:58]
    mask[65:75, 5:10] = 1  # a box whose difference registration removed
    truth, groups = defect_regions(mask)
    rgb = [np.repeat(x[..., None], 3, axis=2) for x in (hist, cur)]
    kinds = bench.sort_groups(truth, groups, *bench.edge_evidence(*rgb))
    assert len(groups) == 4
    assert kinds[truth[20, 30]] == "edge_sliver"
    assert kinds[truth[45, 35]] == "defect"
    assert kinds[truth[54, 58]] == "defect"
    assert kinds[truth[70, 7]] == "vanishes"


# --- defect level against boxes ---------------------------------------------------------------------------------


def test_box_counts_overlap_and_strict_rules_on_a_hand_counted_pair():
    """Three boxes: A is covered by a region that fills most of it (IoU 0.64), B is touched by a 4x6 region (IoU
    0.06), C gets only a 3 px speck (dropped, under 16 px); one region lies in no box."""
    from anodfd.metrics import BoxCounts

    binary = np.zeros((100, 100), np.uint8)
    binary[12:28, 12:28] = 1  # in A
    binary[60:66, 60:64] = 1  # in B
    binary[5:15, 85:95] = 1  # in no box
    binary[82, 42:45] = 1  # a speck in C
    boxes = np.array([[10, 10, 29, 29, 1], [60, 60, 79, 79, 2], [40, 80, 49, 89, 1]])
    counts = BoxCounts()
    counts.update(binary, boxes)
    m = counts.compute()
    assert (m["box_recall"], m["box_precision"]) == pytest.approx((2 / 3, 2 / 3))
    assert m["box_f"] == pytest.approx(2 / 3) and m["box_false_alarms_per_image"] == 1.0
    assert (m["box_recall_class_1"], m["box_recall_class_2"]) == (0.5, 1.0)
    assert (m["strict_recall"], m["strict_precision"]) == pytest.approx((1 / 3, 1 / 3))


def test_strict_rule_matches_one_to_one_and_the_overlap_rule_does_not():
    """One box split into two regions, each half of it (IoU 0.5 both): the overlap rule finds the box with no false
    alarm; DeepPCB's rule matches one region and counts the other as a false positive."""
    from anodfd.metrics import BoxCounts

    binary = np.zeros((40, 40), np.uint8)
    binary[0:10, 0:20] = 1
    binary[11:20, 0:20] = 1  # a row apart: two regions
    counts = BoxCounts()
    counts.update(binary, np.array([[0, 0, 19, 19, 3]]))
    m = counts.compute()
    assert (m["box_recall"], m["box_precision"], m["box_false_alarms_per_image"]) == (1.0, 1.0, 0.0)
    assert (m["strict_recall"], m["strict_precision"]) == (1.0, 0.5)
    # Counts merge across ranks exactly: two copies of a pair equal the pair counted twice.
    twice = BoxCounts()
    twice.update(binary, np.array([[0, 0, 19, 19, 3]]))
    twice.update(binary, np.array([[0, 0, 19, 19, 3]]))
    assert torch.equal(BoxCounts.from_state(counts.state()).merge(counts).state(), twice.state())


def test_boxes_are_read_beside_the_masks_and_bad_lines_are_named(tmp_path):
    from anodfd.data.layouts import DatasetError, read_boxes, read_split

    root = tmp_path / "pcb"
    for sub in ("A", "B", "label", "list", "boxes"):
        (root / sub).mkdir(parents=True)
    for sub in ("A", "B", "label"):
        cv2.imwrite(str(root / sub / f"p1.{'png' if sub == 'label' else 'jpg'}"), np.zeros((32, 32, 3), np.uint8))
    (root / "list" / "train.txt").write_text("p1\n")
    (root / "boxes" / "p1.txt").write_text("1 2 10 12 4\n3,4,8,9\n\n")
    (pair,) = read_split(root, "train")
    assert read_boxes(pair).tolist() == [[1, 2, 10, 12, 4], [3, 4, 8, 9, 0]]
    (root / "boxes" / "p1.txt").write_text("1 2 10 12 4\n9 9 3 3 1\n")
    with pytest.raises(DatasetError, match=r"p1\.txt line 2: expected 'x1 y1 x2 y2 \[class\]'"):
        read_boxes(pair)
    (root / "boxes" / "p1.txt").unlink()
    assert read_boxes(pair) is None


def test_generalization_folds_hold_out_whole_boards(tmp_path):
    """`benchmarks/generalization.py`: a fold's lists put every pair of a held-out board in test, the calibration
    board in val, and no board in two splits (its confirmed row is `anodfd.confirm`'s, tested in test_confirm.py)."""
    from conftest import load_benchmark

    bench = load_benchmark("generalization")
    src = tmp_path / "src"
    (src / "list").mkdir(parents=True)
    for sub in ("A", "B", "label", "boxes"):
        (src / sub).mkdir()
    names = [f"{board}{i:03d}" for board in ("00041", "13000", "20085") for i in range(3)]
    for name in names:
        for sub, ext in (("A", "jpg"), ("B", "jpg"), ("label", "png")):
            (src / sub / f"{name}.{ext}").write_bytes(b"")  # listed files must exist; none is opened
    (src / "list" / "train.txt").write_text("\n".join(names[:-2]) + "\n")
    (src / "list" / "val.txt").write_text("\n".join(names[-2:]) + "\n")
    bench.fold_dataset(src, tmp_path / "fold", r"^(\d{5})", {"20085"}, "00041")
    lists = {s: (tmp_path / "fold" / "list" / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert lists == {"train": names[3:6], "val": names[:3], "test": names[6:]}
    assert (tmp_path / "fold" / "boxes").resolve() == src / "boxes"

    # --train-masks boxes: the model learns from (and calibrates on) other masks, and is scored on the shipped ones
    (tmp_path / "taught" / "label").mkdir(parents=True)
    for name in names:
        (tmp_path / "taught" / "label" / f"{name}.png").write_bytes(b"")
    for held in ("20085", "13000"):  # a second fold replaces the first one's links
        bench.fold_dataset(src, tmp_path / "boxes", r"^(\d{5})", {held}, "00041", tmp_path / "taught")
        labels = {n: (tmp_path / "boxes" / "label" / f"{n}.png").resolve().parent.parent for n in names}
        assert labels == {n: src if n.startswith(held) else tmp_path / "taught" for n in names}


def test_generalization_reuses_a_run_only_for_the_fold_that_made_it(tmp_path):
    """A kept run is scored again only for the same held-out and calibration boards: a model scored on boards it
    trained on would pass for a held-out result."""
    from conftest import load_benchmark

    bench = load_benchmark("generalization")
    run, fold = tmp_path / "run-00041-44000", {"held": ["00041", "44000"], "calibrate": "13000"}
    bench.claim_run(run, fold)
    (run / "last.pt").write_bytes(b"")
    bench.claim_run(run, fold)  # the same fold again: reused
    with pytest.raises(SystemExit, match="not a run of this fold .held out 00041, 44000, threshold on 20085."):
        bench.claim_run(run, {**fold, "calibrate": "20085"})
    (run / "fold.json").unlink()  # a run from before runs recorded their fold
    with pytest.raises(SystemExit, match="remove it or pass another --work"):
        bench.claim_run(run, fold)


def test_outlined_draws_found_regions_at_the_higher_threshold():
    """`--sweep`'s found-low, drawn-high row: a region that reaches the pixel threshold is drawn at it; a faint region
    that never does is kept whole; nothing under the detection threshold is drawn."""
    from conftest import load_benchmark

    bench = load_benchmark("generalization")
    probs = np.zeros((8, 12), np.float32)
    probs[1:6, 1:6] = 0.3  # a wide outline at 0.3 ...
    probs[2:4, 2:4] = 0.8  # ... around a 2x2 core at 0.8
    probs[1:3, 8:11] = 0.2  # a faint region that never reaches 0.6
    probs[6, 9] = 0.05  # under the detection threshold
    out = bench.outlined(probs, 0.1, 0.6)
    expected = np.zeros_like(out)
    expected[2:4, 2:4] = True
    expected[1:3, 8:11] = True
    assert np.array_equal(out, expected)
    assert np.array_equal(bench.outlined(probs, 0.6, 0.6), probs >= 0.6)  # detecting at the pixel threshold or above


def test_defect_grid_serves_the_threshold_with_the_best_defect_f():
    """`--calibrate defect`: defect F at every grid threshold, counted by hand on one pair. Defect A at 0.9, defect B
    at 0.32 and an unchanged region at 0.6: every threshold up to 0.30 finds both with one false alarm (F 0.8), up to
    0.60 A and the false alarm (0.5), up to 0.90 A alone (0.667), above it nothing (0). Ties go to the higher
    threshold, which flags less; ranks add up through ``state``."""
    from anodfd.metrics import DEFECT_GRID, DefectGrid

    mask, probs = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.float32)
    mask[5:15, 5:15] = probs[5:15, 5:15] = 1
    probs[5:15, 5:15] = 0.9
    mask[30:40, 5:15] = 1
    probs[30:40, 5:15] = 0.32
    probs[40:50, 40:50] = 0.6
    grid = DefectGrid()
    grid.update(probs, mask)
    f = {t: grid.counts[t].compute()["defect_f"] for t in DEFECT_GRID}
    expected = {t: 0.8 if t <= 0.3 else 0.5 if t <= 0.6 else 2 / 3 if t <= 0.9 else 0.0 for t in DEFECT_GRID}
    assert f == pytest.approx(expected)
    assert grid.best() == (0.3, pytest.approx(0.8))

    # The same map over an unchanged pair, counted on another rank: its three regions are false alarms. Summed,
    # F is 0.5 up to 0.30 (2 found, 6 detections) and again above 0.60 (1 of 2 found, 1 of 2 detections true).
    other = DefectGrid()
    other.update(probs, np.zeros_like(mask))
    both = DefectGrid()
    both.update(probs, mask)
    both.update(probs, np.zeros_like(mask))
    merged = DefectGrid.from_state(grid.state() + other.state())
    assert {t: c.counts for t, c in merged.counts.items()} == {t: c.counts for t, c in both.counts.items()}
    assert merged.best() == (0.9, pytest.approx(0.5))
