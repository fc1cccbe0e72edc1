"""Lesion-wise Dice and HD95 per BraTS region (WT, TC, ET), as the official BraTS evaluation computes them.

Source: the `BraTS-evaluation` package (PyPI `brats-evaluation` 0.0.10, "the official
implementation of the evaluation metrics for the BraTS segmentation challenges"), which runs
`panoptica` (2.1.7) with its bundled glioma configuration `configs/config_gli.yaml`
(`brats-evaluate --config gli`), then `brats-parse-metrics seg` turns panoptica's results into
the leaderboard columns `lesionwise_dsc_mean_<region>` and `lesionwise_hd95_mean_<region>`.
Read from those packages' source; what they do, for one patient and one region:

1. Regions of the 0..3 label map (3 = ET): WT = {1, 2, 3}, TC = {1, 3}, ET = {3}.
2. Lesions are the connected components of the region's mask in the reference and in the
   prediction separately: 26-connectivity in 3D (connected-components-3d's default; scipy's
   4-connectivity for a 2D input, as panoptica). Nothing is dilated, no lesion is dropped for
   its size (the BraTS 2023 scripts dilated the reference and dropped lesions under 50 voxels;
   the package used since does neither, nor does this module).
3. Matching: one-to-one, maximum bipartite matching (scipy's `linear_sum_assignment`) on the
   cost 1 - Dice between every overlapping reference/prediction lesion pair (Dice >= 1e-6,
   i.e. any overlap); pairs that do not overlap cost 1 + 1e-6 and are never a match. Matched
   pairs are true positives (TP); reference lesions left over are false negatives (FN),
   predicted ones false positives (FP). Up to about 1,000 lesions on each side we solve the
   package's dense matrix as it does, so even a tie between equally good matchings is broken
   its way; beyond (a speckled prediction against a speckled reference: the package's matrix
   takes gigabytes) the same optimum is found from the overlapping pairs alone (`match`).
4. Per matched pair: Dice of the two lesions, and HD95 between them — the 95th percentile
   (linear interpolation) of the pooled surface distances of both directions (panoptica's
   `_hd95_from_pair`; not MONAI's larger-of-two-percentiles the 2020 numbers use), surfaces by
   face-connected erosion with the outside as background, distances in mm (`spacing`).
5. `dice` = mean Dice over TP pairs, `hd95` = mean HD95 over TP pairs (panoptica's `sq_dsc`,
   `sq_hd95`). With no TP: Dice 0 and HD95 "inf" when either side has a lesion (the gli
   config's zero-TP rules), NaN when neither has one (the patient is then left out of the mean
   over patients, as the package's pandas mean does). We report that "inf" as 373 mm, the
   penalty the package itself puts in its place for global and missing-case HD95 ("diameter
   of the cube in SRI space"); a mean over patients would otherwise be infinite.

FP and FN lesions are penalised in the official `seg` columns only through the zero-TP rule and
the detection counts reported beside them (`tp`, `fp`, `fn`, `f1` = panoptica's recognition
quality TP / (TP + (FP + FN) / 2)). The stricter average that counts every FP and FN lesion
with Dice 0 and HD95 373 mm — the BraTS 2023 rule, sum of TP Dice / (TP + FP + FN), which the
package's `brats-parse-metrics mets` computes when every lesion counts as large — is reported
as `dice_penalised` and `hd95_penalised`. Where the reference has no lesion that parser gives
NaN; here predicted lesions then score 0 and 373 mm (an FP is still penalised), and NaN remains
for "no lesion on either side".

Runtime dependencies: numpy, scipy (labelling and matching), torch (surface distances, shared
with the 2020 HD95 in `train.metrics.distance`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from shards_spec.labels import REGION_NAMES, to_regions

from .distance import _nearest_distances, surface
from .patient import summarize

LESION_MAX_HD95 = 373.0
"""HD95 (mm) the BraTS evaluation package puts where panoptica gives inf (no lesion matched)."""
MATCH_THRESHOLD = 1e-6
"""Smallest Dice of a lesion pair that may be matched (the gli config's `matching_threshold`)."""
MATCH_EPSILON = 1e-6
"""The package's matching costs a pair that may not match 1 + this (1 - Dice for one that may)."""
DENSE_MATCH_LIMIT = 1 << 20
"""Most reference x predicted lesions matched on the package's dense cost matrix (8 MiB of
float64): exactly its choice, ties included. Beyond, the sparse solve (see `match`)."""
LESION_METRICS = ("dice", "hd95", "tp", "fp", "fn", "f1", "dice_penalised", "hd95_penalised")
"""Keys of each region's scores; tp, fp, fn count lesions."""
_ALL_PAIRS_LIMIT = 1 << 14  # surface point pairs below which all distances are computed at once (<= 384 KiB)
AVERAGED = ("dice", "hd95", "f1", "dice_penalised", "hd95_penalised")
AVERAGE = ("lesion-wise, per patient and region (WT, TC, ET) as the official BraTS evaluation (brats-evaluation "
           "0.0.10, panoptica 2.1.7, glioma config) computes them: lesions = 26-connected components, one-to-one "
           "matching by maximum total Dice, dice/hd95 = mean over matched lesions (0 / 373 mm when none matched, "
           "NaN when neither side has a lesion), HD95 of a pair = 95th percentile of the pooled surface distances; "
           "*_penalised count every FP and FN lesion as Dice 0 / HD95 373 mm (the BraTS 2023 average); then "
           "mean/median/sample std over patients, NaN left out; tp/fp/fn = lesions summed over patients")


def lesionwise_scores(pred_labels: np.ndarray, true_labels: np.ndarray,
                      spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, dict[str, float]]:
    """Lesion-wise scores of one patient's 0..3 label maps, {region: {KEYS...}} for WT, TC, ET."""
    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"label maps differ in shape: {pred_labels.shape} vs {true_labels.shape}")
    if len(spacing) != pred_labels.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred_labels.ndim}D label map")
    return {name: region_scores(pred, truth, spacing)
            for name, pred, truth in zip(REGION_NAMES, to_regions(pred_labels), to_regions(true_labels))}


def region_scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Lesion-wise scores of one binary region (see the module docstring, steps 2-5)."""
    from scipy import ndimage

    pred_cc, n_pred = lesions(pred)
    true_cc, n_true = lesions(truth)
    pairs = match(true_cc, n_true, pred_cc, n_pred)
    dice = [d for _, _, d in pairs]
    true_boxes, pred_boxes = ndimage.find_objects(true_cc), ndimage.find_objects(pred_cc)
    hd95 = []
    for t, p, _ in pairs:  # each pair within its two bounding boxes: work per pair grows with its box, not the volume
        box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop))
                    for a, b in zip(true_boxes[t - 1], pred_boxes[p - 1]))
        hd95.append(pair_hd95(true_cc[box] == t, pred_cc[box] == p, spacing))
    tp = len(pairs)
    fp, fn = n_pred - tp, n_true - tp
    scores = {"tp": tp, "fp": fp, "fn": fn}
    if n_pred + n_true == 0:
        return {**scores, "dice": math.nan, "hd95": math.nan, "f1": math.nan,
                "dice_penalised": math.nan, "hd95_penalised": math.nan}
    missed = fp + fn
    return {
        **scores,
        "dice": float(np.mean(dice)) if tp else 0.0,
        "hd95": float(np.mean(hd95)) if tp else LESION_MAX_HD95,
        "f1": tp / (tp + 0.5 * missed),
        "dice_penalised": float(np.sum(dice)) / (tp + missed),
        "hd95_penalised": (float(np.sum(hd95)) + LESION_MAX_HD95 * missed) / (tp + missed),
    }


def lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (int32 labels 1..n) and their number: full connectivity in 3D (26),
    face connectivity in 2D, as panoptica labels them."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if mask.ndim >= 3 else 1)
    labelled, count = ndimage.label(mask, structure=structure, output=np.int32)
    return labelled, int(count)


def match(true_cc: np.ndarray, n_true: int, pred_cc: np.ndarray, n_pred: int) -> list[tuple[int, int, float]]:
    """One-to-one matches (reference lesion, predicted lesion, Dice) maximising the total Dice.

    Overlapping pairs are found in one pass over the voxels inside both maps. Up to
    `DENSE_MATCH_LIMIT` lesion pairs the package's own dense solve follows; beyond, a sparse
    solve over the overlapping pairs alone, so a speckled prediction of thousands of lesions
    costs what its overlaps cost instead of an n_true x n_pred matrix (2 GiB at 16,384 each).
    """
    pair_ids, rows, cols, dice = _overlapping_pairs(true_cc, n_true, pred_cc, n_pred)
    if len(dice) == 0:
        chosen = np.zeros(0, dtype=np.int64)
    elif n_true * n_pred <= DENSE_MATCH_LIMIT:
        chosen = _dense_matching(pair_ids, dice, rows, cols, n_true, n_pred)
    else:
        chosen = _sparse_matching(rows, cols, dice)
    return [(int(r), int(c), float(d)) for r, c, d in zip(rows[chosen], cols[chosen], dice[chosen])]


def _overlapping_pairs(true_cc: np.ndarray, n_true: int, pred_cc: np.ndarray,
                      n_pred: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The lesion pairs that may match (overlap with Dice >= MATCH_THRESHOLD), sorted by
    (reference, prediction) label: (pair id, reference label, predicted label, Dice)."""
    both = (true_cc > 0) & (pred_cc > 0)
    pair_ids, overlap = np.unique(true_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both], return_counts=True)
    rows, cols = np.divmod(pair_ids, n_pred + 1)
    true_size = np.bincount(true_cc.ravel(), minlength=n_true + 1)
    pred_size = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    dice = 2.0 * overlap / (true_size[rows] + pred_size[cols])
    keep = dice >= MATCH_THRESHOLD
    return pair_ids[keep], rows[keep], cols[keep], dice[keep]


def _dense_matching(pair_ids: np.ndarray, dice: np.ndarray, rows: np.ndarray, cols: np.ndarray, n_true: int,
                    n_pred: int) -> np.ndarray:
    """Indices of the matched pairs, computed as the package does (panoptica's MaxBipartiteMatching):
    `linear_sum_assignment` on 1 - Dice, 1 + 1e-6 for pairs that may not match, those costing < 1
    kept. Where several matchings have the same total Dice, this picks the package's."""
    from scipy.optimize import linear_sum_assignment

    cost = np.full((n_true, n_pred), 1.0 + MATCH_EPSILON)
    cost[rows - 1, cols - 1] = 1.0 - dice
    true_index, pred_index = linear_sum_assignment(cost)
    kept = cost[true_index, pred_index] < 1.0
    return np.searchsorted(pair_ids, (true_index[kept] + 1) * (n_pred + 1) + pred_index[kept] + 1)


def _sparse_matching(rows: np.ndarray, cols: np.ndarray, dice: np.ndarray) -> np.ndarray:
    """Indices of the pairs (rows[k], cols[k]) of a one-to-one matching maximising sum(Dice + 1e-6).

    That is the dense solve's optimum: it assigns min(n_true, n_pred) pairs at a total cost of
    k (1 + 1e-6) - sum over kept pairs of (Dice + 1e-6), least when that sum is largest. Sparse
    LAPJVsp (`min_weight_full_bipartite_matching`) needs a matching that covers every node, so
    each lesion gets a partner meaning "unmatched" (weight 2), and each pair a mirror edge
    between the two partners (weight 2 - 1e-6) that frees them when the pair matches: matching a
    pair then costs (2 - Dice) + (2 - 1e-6) instead of 2 + 2, i.e. Dice + 1e-6 less. Weights stay
    > 0, as that function requires. Only lesions with a pair take part. Where several matchings
    have the same total Dice, the one picked may differ from the dense solve's (same Dice, counts
    and F1; the HD95 of the tied pairs may differ).
    """
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    true_ids, row = np.unique(rows, return_inverse=True)
    pred_ids, col = np.unique(cols, return_inverse=True)
    n, m, pairs = len(true_ids), len(pred_ids), len(dice)
    # rows of the graph: n reference lesions, then m partners of predicted lesions;
    # columns: m predicted lesions, then n partners of reference lesions
    graph_rows = np.concatenate([row, n + col, np.arange(n), n + np.arange(m)])
    graph_cols = np.concatenate([col, m + row, m + np.arange(n), np.arange(m)])
    weights = np.concatenate([2.0 - dice, np.full(pairs, 2.0 - MATCH_EPSILON), np.full(n + m, 2.0)])
    graph = coo_array((weights, (graph_rows, graph_cols)), shape=(n + m, n + m)).tocsr()
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    partner = np.full(n, -1, dtype=np.int64)
    real = (matched_rows < n) & (matched_cols < m)
    partner[matched_rows[real]] = matched_cols[real]
    return np.flatnonzero(partner[row] == col)


def pair_hd95(truth: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile of the pooled surface distances (mm) of two overlapping lesions.

    Pass the masks cropped to the pair (`region_scores` does): the work is proportional to what
    is passed, and the surface treats the array's outside as background, as an uncropped volume's
    empty neighbourhood would be.
    """
    scale = np.asarray(spacing, dtype=np.float64)
    points = [np.argwhere(surface(m)) * scale for m in (truth, pred)]
    if len(points[0]) * len(points[1]) <= _ALL_PAIRS_LIMIT:  # small lesions: one matrix, both directions
        difference = points[0][:, None, :] - points[1][None, :, :]
        distances = np.sqrt(np.einsum("ijk,ijk->ij", difference, difference))
        pooled = np.concatenate([distances.min(axis=1), distances.min(axis=0)])
    else:
        pooled = np.concatenate([_nearest_distances(points[0], points[1]), _nearest_distances(points[1], points[0])])
    return float(np.percentile(pooled, 95))


def summarize_lesionwise(per_patient: list[dict[str, dict[str, float]]]) -> dict:
    """Patients' `lesionwise_scores` averaged (mean, median, std, ignoring NaN) and lesions summed."""

    regions = list(per_patient[0]) if per_patient else list(REGION_NAMES)
    return {
        "average": AVERAGE,
        "summary": {r: {m: summarize(p[r][m] for p in per_patient) for m in AVERAGED} for r in regions},
        "lesions": {r: {c: int(sum(p[r][c] for p in per_patient)) for c in ("tp", "fp", "fn")} for r in regions},
    }


__all__ = ["AVERAGE", "LESION_MAX_HD95", "LESION_METRICS", "MATCH_THRESHOLD", "lesionwise_scores", "region_scores",
           "summarize_lesionwise"]
