"""Segmentation metrics: dataset-level counts for the epoch table, patient-level 3D scores.

Two averages, on purpose:

- Epoch table (DESIGN "Metrics"): TP/FP/FN summed over every validation slice, then one Dice,
  precision and recall per channel (`confusion_counts` -> `scores_from_counts`). Integer counts
  add up exactly across batches and DDP ranks. A channel with no voxel in prediction or truth
  over the whole set is NaN (undefined, left out of the mean); otherwise a 0/0 ratio (nothing
  predicted, or no truth) is 0.
- Patient level (`patient_scores`): per patient, per class (NEC/NET, ED, ET) and per BraTS region
  (WT, TC, ET), with BraTS 2020 conventions: both empty -> Dice 1, HD95 0; exactly one empty ->
  Dice 0, HD95 373.13 mm (the diagonal of the 240 x 240 x 155 mm BraTS volume). Precision and
  recall follow the same rule (1 when both are empty, 0 for a 0/0 ratio when one is). Average
  patients with `summarize`.

HD95 is MONAI's `compute_hausdorff_distance(percentile=95)`: the surface of a mask is its voxels
with a face neighbour outside it (scipy's default binary erosion, the volume's outside counting
as background); from every surface voxel of one mask the Euclidean distance (mm, `spacing`) to
the nearest surface voxel of the other; the 95th percentile (linear interpolation) of each
direction; the larger of the two. Distances are exact (no scipy at run time): `torch.cdist`
between surface points, pruned by a growing search window (`_nearest_distances`); about a
second on one CPU core for a large BraTS whole tumour with a far-off false positive, less for
close surfaces.

Runtime dependencies: numpy and torch only.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from shards_spec.labels import CLASS_NAMES, REGION_NAMES, TARGETS
from shards_spec.labels import to_classes as labels_to_classes
from shards_spec.labels import to_regions as labels_to_regions

BRATS_MAX_HD95 = 373.13
"""HD95 (mm) BraTS 2020 assigns when exactly one of prediction and truth is empty."""

PATIENT_KEYS: tuple[str, ...] = (*CLASS_NAMES, *(r for r in REGION_NAMES if r not in CLASS_NAMES))
"""Keys of `patient_scores`: NEC/NET, ED, ET (class and region alike), WT, TC."""

_CDIST_CHUNK = 1 << 22  # distances per torch.cdist call: 32 MiB of float64
_BLOCK = 512  # source surface points searched together
_WINDOWS_MM = (4.0, 16.0, 64.0, float("inf"))  # search windows, see _nearest_distances
_CELL_MM = 8.0  # size of the cells that group source points into blocks

Array = np.ndarray | torch.Tensor


# ---------------------------------------------------------------- dataset-level counts


def confusion_counts(pred: Array, target: Array, channel_axis: int = -3) -> tuple[Array, Array, Array]:
    """TP, FP, FN per channel (int64), summed over every other axis.

    `pred` and `target` are binary masks of the same shape (anything non-zero is foreground):
    a batch (B, 3, H, W) or a slice (3, H, W) with the default `channel_axis=-3`, a volume
    (3, H, W, D) with `channel_axis=0`. Torch in, torch out (on the input's device, ready for an
    all-reduce); numpy in, numpy out.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    if pred.shape[channel_axis] != 3:  # catches a (3, H, W, D) volume passed without channel_axis=0
        raise ValueError(f"expected 3 channels on axis {channel_axis}, got shape {tuple(pred.shape)}")
    if isinstance(pred, torch.Tensor):
        p = pred.bool().movedim(channel_axis, 0)
        t = torch.as_tensor(target, device=pred.device).bool().movedim(channel_axis, 0)
        axes = tuple(range(1, p.ndim))
        tp, fp, fn = (m.sum(dim=axes, dtype=torch.int64) for m in (p & t, p & ~t, ~p & t))
        return tp, fp, fn
    p = np.moveaxis(np.asarray(pred).astype(bool), channel_axis, 0)
    t = np.moveaxis(np.asarray(target).astype(bool), channel_axis, 0)
    axes = tuple(range(1, p.ndim))
    tp, fp, fn = (np.sum(m, axis=axes, dtype=np.int64) for m in (p & t, p & ~t, ~p & t))
    return tp, fp, fn


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0."""
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def scores_from_counts(tp: Array, fp: Array, fn: Array) -> dict[str, np.ndarray]:
    """Dice, precision and recall per channel (float64 arrays) from summed counts.

    NaN for a channel with no voxel in prediction or truth; 0 for any other 0/0 ratio.
    """
    tp, fp, fn = (np.asarray(torch.as_tensor(c).cpu(), dtype=np.float64) for c in (tp, fp, fn))
    scores = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }
    undefined = (tp + fp + fn) == 0
    for values in scores.values():
        values[undefined] = np.nan
    return scores


# ---------------------------------------------------------------- label rules


def probs_to_labels(probs: Array, target: str, threshold: float = 0.5, channel_axis: int = 0) -> Array:
    """Three sigmoid channels -> uint8 label map 0..3 (0 bg, 1 NEC/NET, 2 ED, 3 ET).

    classes (NEC/NET, ED, ET): the argmax channel + 1 where its probability exceeds `threshold`.
    regions (WT, TC, ET): ET where p(ET) > t, else NEC/NET where p(TC) > t, else ED where
    p(WT) > t, else background (the nested BraTS regions, innermost first).
    Torch in, torch out; numpy in, numpy out.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if probs.shape[channel_axis] != 3:
        raise ValueError(f"probs need 3 channels on axis {channel_axis}, got shape {tuple(probs.shape)}")
    is_torch = isinstance(probs, torch.Tensor)
    p = probs.movedim(channel_axis, 0) if is_torch else np.moveaxis(np.asarray(probs), channel_axis, 0)
    where = torch.where if is_torch else np.where
    if target == "classes":
        best = p.argmax(0)
        top = p.max(0).values if is_torch else p.max(0)
        labels = where(top > threshold, best + 1, 0)
    else:
        labels = where(p[2] > threshold, 3, where(p[1] > threshold, 1, where(p[0] > threshold, 2, 0)))
    return labels.to(torch.uint8) if is_torch else labels.astype(np.uint8)


# ---------------------------------------------------------------- patient-level (3D)


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with a face neighbour outside it (outside the array counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            index = [slice(1, -1)] * mask.ndim
            index[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
            interior &= padded[tuple(index)]
    return mask & ~interior


def _min_distances(source: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance from each source row to its nearest dest row (chunked cdist)."""
    if len(dest) == 0:
        return torch.full((len(source),), float("inf"), dtype=torch.float64)
    rows = max(1, _CDIST_CHUNK // len(dest))
    parts = [
        # differences, not the |a|^2 + |b|^2 - 2ab matrix product, so no digits are lost
        torch.cdist(source[i : i + rows], dest, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
        for i in range(0, len(source), rows)
    ]
    return torch.cat(parts)


def _nearest_distances(source: np.ndarray, dest: np.ndarray) -> np.ndarray:
    """Distance (mm) from each source point to the nearest dest point, in no particular order.

    Source points are grouped into spatially compact blocks (sorted by coarse cell). A block is
    compared only with the dest points inside its bounding box grown by w mm: a distance found
    <= w is exact, since every skipped point is further than w along one axis alone. Points
    left unresolved try a wider w, the last pass all of dest. Surfaces of a decent segmentation
    are a few mm apart, so most pairs are never computed.
    """
    cells = np.floor(source / _CELL_MM).astype(np.int64)
    src = torch.from_numpy(source[np.lexsort(cells.T[::-1])])
    dst = torch.from_numpy(dest)
    result = []
    for start in range(0, len(src), _BLOCK):
        block = src[start : start + _BLOCK]
        found = torch.full((len(block),), float("inf"), dtype=torch.float64)
        todo = torch.ones(len(block), dtype=torch.bool)
        for window in _WINDOWS_MM:
            points = block[todo]
            low, high = points.amin(dim=0) - window, points.amax(dim=0) + window
            near = ((dst >= low) & (dst <= high)).all(dim=1)
            found[todo] = _min_distances(points, dst[near])
            todo = found > window
            if not todo.any():
                break
        result.append(found)
    return torch.cat(result).numpy()


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (see module doc), BraTS empty rules."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}D mask")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return 0.0
    if has_pred != has_truth:
        return BRATS_MAX_HD95
    # Crop to the union's bounding box: nothing outside it is surface, and erosion gets cheaper.
    # The margin of 1 keeps "the array's outside is background" exactly as before the crop.
    union = np.argwhere(pred | truth)
    low = np.maximum(union.min(0) - 1, 0)
    high = union.max(0) + 2
    box = tuple(slice(a, b) for a, b in zip(low, high))
    scale = np.asarray(spacing, dtype=np.float64)
    points = [np.argwhere(surface(m[box])) * scale for m in (pred, truth)]
    forward = _nearest_distances(points[0], points[1])
    backward = _nearest_distances(points[1], points[0])
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def binary_scores(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
    """Dice, precision, recall and HD95 of one binary mask pair, with BraTS empty rules."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    tp = float(np.count_nonzero(pred & truth))
    n_pred, n_truth = float(np.count_nonzero(pred)), float(np.count_nonzero(truth))
    if n_pred == 0 and n_truth == 0:
        scores = {"dice": 1.0, "precision": 1.0, "recall": 1.0}
    else:
        scores = {
            "dice": 2 * tp / (n_pred + n_truth),
            "precision": tp / n_pred if n_pred else 0.0,
            "recall": tp / n_truth if n_truth else 0.0,
        }
    scores["hd95"] = hd95(pred, truth, spacing)
    return scores


def patient_scores(
    pred_labels: np.ndarray, true_labels: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, dict[str, float]]:
    """Scores of one patient's label maps (H, W, D), keyed by `PATIENT_KEYS`.

    Each value is {"dice", "precision", "recall", "hd95"}; ET is both a class and a region and
    appears once.
    """
    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"label maps differ in shape: {pred_labels.shape} vs {true_labels.shape}")
    masks = {}
    for names, expand in ((CLASS_NAMES, labels_to_classes), (REGION_NAMES, labels_to_regions)):
        for name, pred, truth in zip(names, expand(pred_labels), expand(true_labels)):
            masks[name] = (pred, truth)
    return {name: binary_scores(*masks[name], spacing=spacing) for name in PATIENT_KEYS}


def summarize(values: Iterable[float]) -> dict[str, float]:
    """Mean, median, sample standard deviation (ddof 1) and count, ignoring NaN."""
    array = np.asarray(list(values), dtype=np.float64)
    array = array[~np.isnan(array)]
    n = int(array.size)
    if n == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan"), "n": 0}
    std = float(np.std(array, ddof=1)) if n > 1 else float("nan")
    return {"mean": float(array.mean()), "median": float(np.median(array)), "std": std, "n": n}


__all__ = [
    "BRATS_MAX_HD95",
    "PATIENT_KEYS",
    "binary_scores",
    "confusion_counts",
    "hd95",
    "labels_to_classes",
    "labels_to_regions",
    "patient_scores",
    "probs_to_labels",
    "scores_from_counts",
    "summarize",
    "surface",
]
