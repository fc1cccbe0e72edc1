"""Metrics: hand-computed counts and label rules; Dice and HD95 against MONAI and scipy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from monai.metrics import DiceMetric, compute_hausdorff_distance
from scipy import ndimage

from train import metrics
from train.metrics import (
    BRATS_MAX_HD95,
    PATIENT_KEYS,
    binary_scores,
    confusion_counts,
    distance,
    hd95,
    labels_to_classes,
    labels_to_regions,
    patient_scores,
    probs_to_labels,
    scores_from_counts,
    summarize,
    surface,
)

torch.set_num_threads(1)


def ellipsoids(shape, specs):
    """Union of axis-aligned ellipsoids (centre, radii): tumour-like blobs, not noise."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    out = np.zeros(shape, dtype=bool)
    for centre, radii in specs:
        out |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
    return out


def random_blobs(rng, shape, n):
    specs = []
    for _ in range(n):
        centre = [rng.uniform(0.2 * s, 0.8 * s) for s in shape]
        radii = [rng.uniform(1.5, 0.3 * s) for s in shape]
        specs.append((centre, radii))
    return ellipsoids(shape, specs)


def random_label_map(rng, shape):
    """A glioma-like label map: ED around a core of NEC/NET and ET, plus a stray blob."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[random_blobs(rng, shape, 2)] = 2
    labels[random_blobs(rng, shape, 1)] = 1
    labels[random_blobs(rng, shape, 2) & (labels > 0)] = 3
    return labels


def monai_hd95(pred, truth, spacing):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None],
            include_background=True, percentile=95, spacing=list(spacing),
        )
    return value.item()


def monai_dice(pred, truth):
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    return metric(torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None]).item()


# ---------------------------------------------------------------- counts


def test_confusion_counts_by_hand():
    pred = np.zeros((3, 2, 3), dtype=bool)
    target = np.zeros((3, 2, 3), dtype=bool)
    pred[0, 0, :] = True  # 3 predicted
    target[0, 0, :2] = True  # 2 true, both predicted: tp 2, fp 1, fn 0
    target[1, 1, 1] = True  # channel 1: only a miss
    pred[2, 1, 2] = True  # channel 2: only a false alarm
    tp, fp, fn = confusion_counts(pred, target)
    assert tp.tolist() == [2, 0, 0] and fp.tolist() == [1, 0, 1] and fn.tolist() == [0, 1, 0]
    assert tp.dtype == np.int64
    # a batch of two copies, as torch: counts double, stay int64 tensors
    tp_t, fp_t, fn_t = confusion_counts(torch.from_numpy(np.stack([pred, pred])),
                                        torch.from_numpy(np.stack([target, target])))
    assert tp_t.dtype == torch.int64
    assert tp_t.tolist() == [4, 0, 0] and fp_t.tolist() == [2, 0, 2] and fn_t.tolist() == [0, 2, 0]
    # a volume (3, H, W, D) with the channel first
    vol_p, vol_t = np.repeat(pred[..., None], 4, axis=-1), np.repeat(target[..., None], 4, axis=-1)
    assert confusion_counts(vol_p, vol_t, channel_axis=0)[0].tolist() == [8, 0, 0]
    with pytest.raises(ValueError, match="expected 3 channels on axis -3"):
        confusion_counts(vol_p, vol_t)


def test_scores_from_counts_by_hand():
    scores = scores_from_counts(np.array([2, 0, 0, 0]), np.array([1, 0, 1, 0]), np.array([0, 1, 0, 0]))
    assert np.allclose(scores["dice"][:3], [4 / 5, 0, 0])
    assert np.allclose(scores["precision"][:3], [2 / 3, 0, 0])  # nothing predicted in channel 1: 0
    assert np.allclose(scores["recall"][:3], [1, 0, 0])  # no truth in channel 2: 0
    assert all(math.isnan(v[3]) for v in scores.values())  # nothing anywhere: NaN
    torch_scores = scores_from_counts(*(torch.tensor(c) for c in ([2], [1], [0])))
    assert torch_scores["dice"].dtype == np.float64 and np.isclose(torch_scores["dice"][0], 0.8)


def test_single_sample_dice_from_counts_matches_monai():
    rng = np.random.default_rng(0)
    pred = np.stack([random_blobs(rng, (32, 32), 2) for _ in range(3)])
    truth = np.stack([random_blobs(rng, (32, 32), 2) for _ in range(3)])
    dice = scores_from_counts(*confusion_counts(pred, truth))["dice"]
    reference = DiceMetric(include_background=True, reduction="none")(
        torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])[0].numpy()
    assert np.allclose(dice, reference, atol=1e-6)


# ---------------------------------------------------------------- label rules


def test_probs_to_labels_classes_by_hand():
    # rows NEC/NET, ED, ET. Voxels: background; NEC/NET; ED; ET; NEC/NET although ED is the strongest
    # class (p(TC) = 0.6 + 0.2 > 0.5: the core is decided before the whole tumour); NEC/NET where no
    # class reaches 0.5 but the core does (0.4 + 0.3); ED where only the whole tumour does (0.2 + 0.2 + 0.2);
    # ET beside a stronger ED.
    probs = np.array([
        [0.1, 0.9, 0.2, 0.1, 0.6, 0.4, 0.2, 0.0],
        [0.2, 0.3, 0.8, 0.2, 0.7, 0.5, 0.2, 0.9],
        [0.1, 0.1, 0.3, 0.6, 0.2, 0.3, 0.2, 0.55],
    ])
    assert probs_to_labels(probs, "classes").tolist() == [0, 1, 2, 3, 1, 1, 2, 3]
    assert probs_to_labels(probs, "classes").dtype == np.uint8


def test_expand_labels_matches_the_numpy_expansion():
    labels = random_label_map(np.random.default_rng(2), (12, 12, 5))
    for target, expand in (("classes", labels_to_classes), ("regions", labels_to_regions)):
        got = metrics.expand_labels(torch.from_numpy(np.moveaxis(labels, -1, 0)), target)  # (5, 3, 12, 12)
        assert np.array_equal(np.moveaxis(got.numpy(), 0, -1), expand(labels))


def test_probs_to_labels_regions_by_hand():
    # rows WT, TC, ET; ET wins even where WT/TC are low, TC beats WT, WT alone is ED
    probs = np.array([
        [0.1, 0.9, 0.9, 0.9, 0.2, 0.6],
        [0.1, 0.2, 0.9, 0.9, 0.1, 0.7],
        [0.1, 0.1, 0.2, 0.9, 0.8, 0.4],
    ])
    assert probs_to_labels(probs, "regions").tolist() == [0, 2, 1, 3, 3, 1]


@pytest.mark.parametrize("target,expand", [("classes", labels_to_classes), ("regions", labels_to_regions)])
def test_probs_to_labels_inverts_the_expansion(target, expand):
    labels = random_label_map(np.random.default_rng(1), (24, 24, 8))
    probs = expand(labels).astype(np.float32) * 0.8 + 0.1
    assert np.array_equal(probs_to_labels(probs, target), labels)
    batch = torch.from_numpy(np.stack([probs, probs]))  # torch, (B, 3, ...) with channel_axis=1
    out = probs_to_labels(batch, target, channel_axis=1)
    assert out.dtype == torch.uint8 and np.array_equal(out[1].numpy(), labels)


def test_label_expansions():
    labels = np.array([0, 1, 2, 3])
    assert labels_to_classes(labels).astype(int).tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert labels_to_regions(labels).astype(int).tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="target must be one of"):
        probs_to_labels(np.zeros((3, 2)), "labels")


# ---------------------------------------------------------------- HD95 and patient scores


def test_surface_matches_scipy_erosion():
    rng = np.random.default_rng(2)
    mask = random_blobs(rng, (20, 18, 12), 3)
    mask[0, 5:9, 3:7] = True  # touches the border: the outside counts as background
    assert np.array_equal(surface(mask), mask & ~ndimage.binary_erosion(mask))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.2, 3.0)])
def test_hd95_matches_monai_on_blobs(seed, spacing):
    rng = np.random.default_rng(seed)
    shape = (40, 36, 24)
    truth = random_blobs(rng, shape, 2)
    pred = ndimage.binary_dilation(truth, iterations=int(rng.integers(0, 3))) ^ random_blobs(rng, shape, 1)
    assert pred.any() and truth.any()
    assert hd95(pred, truth, spacing) == pytest.approx(monai_hd95(pred, truth, spacing), rel=1e-5, abs=1e-5)


def test_hd95_far_false_positive_exercises_every_search_window():
    # pred surface lies < 4 mm (the blob), 4-16 and 16-64 mm (the middle blob), > 64 mm (far one)
    shape = (140, 64, 40)
    truth = ellipsoids(shape, [((30, 32, 20), (12, 10, 8))])
    pred = ellipsoids(shape, [((31, 31, 20), (11, 11, 8)), ((60, 32, 20), (4, 4, 4)), ((135, 5, 35), (3, 3, 3))])
    distances = distance._nearest_distances(np.argwhere(surface(pred)) * 1.0, np.argwhere(surface(truth)) * 1.0)
    assert all(np.any((distances > low) & (distances <= high)) for low, high in [(0, 4), (4, 16), (16, 64), (64, 1e9)])
    for spacing in [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5)]:
        assert hd95(pred, truth, spacing) == pytest.approx(monai_hd95(pred, truth, spacing), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 60), st.integers(1, 60),
    st.tuples(*[st.floats(0.3, 4.0)] * 3), st.integers(0, 2**32 - 1),
)
def test_pruned_nearest_distances_equal_brute_force(n_src, n_dst, spacing, seed):
    rng = np.random.default_rng(seed)
    scale = np.asarray(spacing)
    src = np.unique(rng.integers(0, 200, (n_src, 3)), axis=0) * scale
    dst = np.unique(rng.integers(0, 200, (n_dst, 3)), axis=0) * scale
    dst = dst[np.argsort(dst[:, 0], kind="stable")]
    got = np.sort(distance._nearest_distances(src, dst))
    expected = np.sort(np.sqrt(((src[:, None] - dst[None]) ** 2).sum(-1)).min(1))
    assert np.allclose(got, expected, rtol=0, atol=1e-9)


def test_empty_masks_follow_brats_not_monai():
    empty = np.zeros((10, 10, 6), dtype=bool)
    blob = ellipsoids(empty.shape, [((5, 5, 3), (2, 2, 2))])
    assert math.isnan(monai_hd95(empty, empty, (1, 1, 1)))  # MONAI: undefined
    assert hd95(empty, empty) == 0.0
    for pred, truth in [(blob, empty), (empty, blob)]:
        assert not math.isfinite(monai_hd95(pred, truth, (1, 1, 1)))  # MONAI: nan / inf
        assert hd95(pred, truth) == BRATS_MAX_HD95
    both_empty = binary_scores(empty, empty)
    assert both_empty == {"dice": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0}
    missed = binary_scores(empty, blob)
    assert missed == {"dice": 0.0, "precision": 0.0, "recall": 0.0, "hd95": BRATS_MAX_HD95}


@pytest.mark.parametrize("seed", range(2))
def test_patient_scores_match_monai(seed):
    rng = np.random.default_rng(10 + seed)
    shape, spacing = (40, 40, 20), (1.0, 1.0, 1.5)
    truth = random_label_map(rng, shape)
    pred = random_label_map(rng, shape)
    pred[truth == 3] = 3  # some overlap
    if seed == 1:
        pred[pred == 1] = 0  # NEC/NET predicted nowhere: the BraTS "one empty" rule
    scores = patient_scores(pred, truth, spacing)
    assert tuple(scores) == PATIENT_KEYS == ("NEC/NET", "ED", "ET", "WT", "TC")
    masks = dict(zip(("NEC/NET", "ED", "ET"), zip(labels_to_classes(pred), labels_to_classes(truth))))
    masks.update(zip(("WT", "TC"), zip(labels_to_regions(pred)[:2], labels_to_regions(truth)[:2])))
    for name, (p, t) in masks.items():
        got = scores[name]
        tp = np.count_nonzero(p & t)
        if p.any():
            assert got["precision"] == pytest.approx(tp / np.count_nonzero(p))
        if t.any():
            assert got["recall"] == pytest.approx(tp / np.count_nonzero(t))
        assert got["dice"] == pytest.approx(monai_dice(p, t), abs=1e-6)
        if p.any() and t.any():
            assert got["hd95"] == pytest.approx(monai_hd95(p, t, spacing), rel=1e-5)
        else:
            assert got["hd95"] == BRATS_MAX_HD95 and got["dice"] == 0.0
    if seed == 1:
        assert scores["NEC/NET"]["hd95"] == BRATS_MAX_HD95


def test_hd95_rejects_wrong_spacing():
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((3, 3, 3), bool), np.ones((3, 3, 3), bool), spacing=(1.0, 1.0))


def test_summarize_ignores_nan():
    out = summarize([1.0, float("nan"), 3.0, 2.0])
    assert out == {"mean": 2.0, "median": 2.0, "std": pytest.approx(1.0), "n": 3}
    assert summarize([float("nan")])["n"] == 0 and math.isnan(summarize([])["mean"])
