"""Scores from TP/FP/FN counts: the registry of count metrics and the two empty-mask rules.

Every score this project reports for a class or region (Dice, precision, recall, and whatever is
registered next) is a function of three integer counts. Counting first and scoring after is what
makes the numbers add up: counts sum exactly over batches, patients and DDP ranks, so a dataset
score is the score of summed counts, and a patient score the score of that patient's counts.

What a score is when there is nothing to score is a choice, named here once:

- `UNDEFINED` (dataset level, the epoch table): a channel with no voxel in prediction or truth
  over the whole set is NaN, left out of the mean (and said so).
- `BRATS` (patient level, BraTS 2020): prediction and truth both empty is a perfect 1.

Under both rules any other 0/0 ratio (nothing predicted, or no truth) is 0.

To add a metric, register it once (`register_count_metric`): it then appears in `metrics.csv`
(column `<column>_<channel>`), the epoch summary, `train evaluate`'s tables, JSON and CSV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from shards_spec.labels import CLASS_NAMES, REGION_NAMES, to_classes, to_regions

UNDEFINED = "undefined"
BRATS = "brats"
EMPTY_RULES = (UNDEFINED, BRATS)

PATIENT_KEYS: tuple[str, ...] = (*CLASS_NAMES, *(r for r in REGION_NAMES if r not in CLASS_NAMES))
"""Keys of a patient's scores: NEC/NET, ED, ET (class and region alike), WT, TC."""

Array = np.ndarray | torch.Tensor


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise (float64), 0 where den is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


@dataclass(frozen=True)
class CountMetric:
    """A score of (tp, fp, fn) float64 arrays; `column` is its metrics.csv prefix."""

    name: str
    column: str
    compute: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


COUNT_METRICS: dict[str, CountMetric] = {}


def register_count_metric(name: str, column: str, compute: Callable) -> CountMetric:
    """Add a score of counts to every table, log and file (see the module doc)."""
    if name in COUNT_METRICS or name == "hd95":
        raise ValueError(f"a metric named {name!r} is registered already")
    if any(m.column == column for m in COUNT_METRICS.values()):
        raise ValueError(f"metrics.csv column prefix {column!r} is taken")
    COUNT_METRICS[name] = CountMetric(name, column, compute)
    return COUNT_METRICS[name]


register_count_metric("dice", "dice", lambda tp, fp, fn: ratio(2 * tp, 2 * tp + fp + fn))
register_count_metric("precision", "prec", lambda tp, fp, fn: ratio(tp, tp + fp))
register_count_metric("recall", "recall", lambda tp, fp, fn: ratio(tp, tp + fn))


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


def scores_from_counts(tp: Array, fp: Array, fn: Array, empty: str = UNDEFINED) -> dict[str, np.ndarray]:
    """Every registered score per channel (float64 arrays) from counts, with the `empty` rule."""
    if empty not in EMPTY_RULES:
        raise ValueError(f"empty must be one of {list(EMPTY_RULES)}, got {empty!r}")
    tp, fp, fn = (np.asarray(torch.as_tensor(c).cpu(), dtype=np.float64) for c in (tp, fp, fn))
    nothing = (tp + fp + fn) == 0
    scores = {}
    for metric in COUNT_METRICS.values():
        values = np.array(metric.compute(tp, fp, fn), dtype=np.float64)
        values[nothing] = np.nan if empty == UNDEFINED else 1.0
        scores[metric.name] = values
    return scores


def label_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Binary masks of a 0..3 label map keyed by `PATIENT_KEYS` (classes, then WT and TC)."""
    masks = dict(zip(CLASS_NAMES, to_classes(labels)))
    masks.update({k: m for k, m in zip(REGION_NAMES, to_regions(labels)) if k not in masks})
    return {k: masks[k] for k in PATIENT_KEYS}


def patient_counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, int]]:
    """TP, FP, FN of every class and region (`PATIENT_KEYS`) of two label maps (any shape)."""
    counts = {}
    for expand, names in ((to_classes, CLASS_NAMES), (to_regions, REGION_NAMES)):
        tp, fp, fn = confusion_counts(expand(pred), expand(truth), channel_axis=0)
        counts.update({n: {"tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i])} for i, n in enumerate(names)})
    return {k: counts[k] for k in PATIENT_KEYS}


def scores_of(counts: dict[str, int], empty: str) -> dict[str, float]:
    """Every registered score of one {tp, fp, fn} dict, as plain floats."""
    scores = scores_from_counts(*(np.array([counts[k]]) for k in ("tp", "fp", "fn")), empty=empty)
    return {name: float(values[0]) for name, values in scores.items()}


__all__ = [
    "BRATS",
    "COUNT_METRICS",
    "CountMetric",
    "EMPTY_RULES",
    "PATIENT_KEYS",
    "UNDEFINED",
    "confusion_counts",
    "label_masks",
    "patient_counts",
    "ratio",
    "register_count_metric",
    "scores_from_counts",
    "scores_of",
]
