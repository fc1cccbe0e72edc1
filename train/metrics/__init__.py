"""Scoring: the one home of every number this project reports about a segmentation.

Two averages, on purpose (docs/metrics.md):

- Epoch table and `train evaluate`'s slice level: TP/FP/FN summed over every validation slice,
  then one score per channel (`confusion_counts` -> `scores_from_counts`, rule `UNDEFINED`).
  Integer counts add up exactly across batches and DDP ranks.
- Patient level (`patient_scores`): per patient, per class and per BraTS region, with the BraTS
  2020 rules (`BRATS`), then averaged over patients with `summarize`.

Modules: `counts` (the count metrics registry and both empty rules), `label_rule` (sigmoid
channels -> label map), `distance` (surfaces and HD95), `patient` (3D scores and their average).
Runtime dependencies: numpy and torch only.
"""

from __future__ import annotations

from shards_spec.labels import to_classes as labels_to_classes, to_regions as labels_to_regions

from .counts import (
    BRATS,
    COUNT_METRICS,
    EMPTY_RULES,
    PATIENT_KEYS,
    UNDEFINED,
    CountMetric,
    confusion_counts,
    label_masks,
    patient_counts,
    ratio,
    register_count_metric,
    scores_from_counts,
    scores_of,
)
from .distance import BRATS_MAX_HD95, hd95, surface
from .label_rule import THRESHOLD, expand_labels, probs_to_labels
from .patient import binary_scores, patient_scores, summarize, summarize_patients

__all__ = [
    "BRATS",
    "BRATS_MAX_HD95",
    "COUNT_METRICS",
    "CountMetric",
    "EMPTY_RULES",
    "PATIENT_KEYS",
    "THRESHOLD",
    "UNDEFINED",
    "binary_scores",
    "confusion_counts",
    "expand_labels",
    "hd95",
    "label_masks",
    "labels_to_classes",
    "labels_to_regions",
    "patient_counts",
    "patient_scores",
    "probs_to_labels",
    "ratio",
    "register_count_metric",
    "scores_from_counts",
    "scores_of",
    "summarize",
    "summarize_patients",
    "surface",
]
