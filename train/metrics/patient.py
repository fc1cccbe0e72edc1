"""Patient-level (3D) scores and their average over patients.

Per patient, per class (NEC/NET, ED, ET) and per BraTS region (WT, TC, ET), with the BraTS 2020
conventions: both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 373.13 mm.
Precision and recall follow the same rule (1 when both are empty, 0 for a 0/0 ratio when one
is). Patients are then averaged with `summarize` (mean, median, sample std, ignoring NaN).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .counts import BRATS, PATIENT_KEYS, label_masks, patient_counts, scores_of
from .distance import hd95


def binary_scores(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float]:
    """Every registered count score and HD95 of one binary mask pair, with the BraTS rules."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    counts = {"tp": int(np.count_nonzero(pred & truth)), "fp": int(np.count_nonzero(pred & ~truth)),
              "fn": int(np.count_nonzero(~pred & truth))}
    return {**scores_of(counts, BRATS), "hd95": hd95(pred, truth, spacing)}


def patient_scores(
    pred_labels: np.ndarray, true_labels: np.ndarray, spacing: Sequence[float] | None = (1.0, 1.0, 1.0)
) -> dict[str, dict[str, float]]:
    """Scores of one patient's label maps (H, W, D), keyed by `PATIENT_KEYS`.

    Each value holds every registered count score and, unless `spacing` is None, "hd95" (mm);
    ET is both a class and a region and appears once.
    """
    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"label maps differ in shape: {pred_labels.shape} vs {true_labels.shape}")
    if spacing is None:
        return {k: scores_of(c, BRATS) for k, c in patient_counts(pred_labels, true_labels).items()}
    pred_masks, truth_masks = label_masks(pred_labels), label_masks(true_labels)
    return {k: binary_scores(pred_masks[k], truth_masks[k], spacing) for k in PATIENT_KEYS}


def summarize(values: Iterable[float]) -> dict[str, float]:
    """Mean, median, sample standard deviation (ddof 1) and count, ignoring NaN."""
    array = np.asarray(list(values), dtype=np.float64)
    array = array[~np.isnan(array)]
    n = int(array.size)
    if n == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan"), "n": 0}
    std = float(np.std(array, ddof=1)) if n > 1 else float("nan")
    return {"mean": float(array.mean()), "median": float(np.median(array)), "std": std, "n": n}


def summarize_patients(per_patient: list[dict], metrics: Iterable[str]) -> dict:
    """{key: {metric: summarize(...)}} over patients, each holding {"scores": {key: {metric: v}}}."""
    metrics = list(metrics)
    return {key: {m: summarize(p["scores"][key][m] for p in per_patient) for m in metrics} for key in PATIENT_KEYS}


__all__ = ["binary_scores", "patient_scores", "summarize", "summarize_patients"]
