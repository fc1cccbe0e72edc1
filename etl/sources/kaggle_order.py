"""The Kaggle export's image channel order: the default, and the check of an order against the data.

The export does not document its channel order (FLAIR,T1,T1ce,T2 and T1,T1ce,T2,FLAIR are both
claimed publicly), so the order is an option (`--kaggle-channel-order`) and
`check_kaggle_channel_order` scores all 24 assignments of names to the stored channels with facts
true of real MRI, in brain-relative ranks (so any per-volume scaling cancels): T1 and T1ce look
alike outside the tumour; CSF (the darkest T1 voxels) is bright on T2 and dark on FLAIR; edema is
bright on T2/FLAIR and dark on T1/T1ce; enhancing tumour is brighter on T1ce than on T1. When
another order scores clearly better than the chosen one, the volume gets a warning naming the
order the data suggest.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from shards_spec.errors import SourceError
from shards_spec.labels import CHANNELS

KAGGLE_CHANNEL_ORDER: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
"""The default order of the four channels of the export's `image` arrays (the more common public
claim); the one definition of it for the whole project."""
KAGGLE_ORDERS = {",".join(KAGGLE_CHANNEL_ORDER), ",".join(CHANNELS)}
"""The two orders claimed publicly: the default, and the order shards store (t1,t1ce,t2,flair)."""
ORDER_MARGIN = 0.25
"""How much better (in summed fact scores, each within [-1, 1]) another channel order must fit
the data before the chosen one is called contradicted."""
MIN_CLASS_VOXELS = 20
SAMPLE_VOXELS = 50_000


def parse_order(order: Sequence[str] | str) -> tuple[str, ...]:
    """A channel order as a tuple of the four names; any permutation of them is accepted."""
    names = order.split(",") if isinstance(order, str) else list(order)
    names = tuple(n.strip().lower() for n in names)
    if sorted(names) != sorted(CHANNELS):
        raise SourceError(
            f"kaggle channel order must name each of {', '.join(CHANNELS)} once, got {','.join(names)} "
            f"(public guesses: {' or '.join(sorted(KAGGLE_ORDERS))})"
        )
    return names


def _ecdf(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mid-rank of `values` within sorted `reference`, in [0, 1] (ties share their mean rank)."""
    lo = np.searchsorted(reference, values, side="left")
    hi = np.searchsorted(reference, values, side="right")
    return (lo + hi) / (2.0 * max(len(reference), 1))


def _strided(indices: np.ndarray, limit: int) -> np.ndarray:
    step = max(1, len(indices) // limit)
    return indices[::step]


def contrast_evidence(volume: np.ndarray, brain: np.ndarray, labels: np.ndarray | None) -> dict:
    """Brain-relative statistics of each stored channel that the order facts are scored on.

    Ranks are taken within the normal-appearing brain (brain minus tumour), so they do not
    depend on how a volume was scaled or shifted.
    """
    normal = brain if labels is None else brain & (labels == 0)
    where = _strided(np.flatnonzero(normal), SAMPLE_VOXELS)
    if len(where) < 4 * MIN_CLASS_VOXELS:
        return {}
    sample = np.unravel_index(where, normal.shape)  # coordinates: no copy of a strided volume
    values = [channel[sample] for channel in volume]
    reference = [np.sort(v) for v in values]
    ranks = np.stack([_ecdf(ref, v) for ref, v in zip(reference, values)])
    evidence = {"ranks": ranks}
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(ranks)
    evidence["corr"] = np.nan_to_num(corr)
    if labels is not None:
        for label, key in ((2, "ED"), (3, "ET")):
            where = _strided(np.flatnonzero(labels == label), SAMPLE_VOXELS // 4)
            if len(where) >= MIN_CLASS_VOXELS:
                voxels = np.unravel_index(where, labels.shape)
                evidence[key] = np.array([_ecdf(ref, ch[voxels]).mean() for ref, ch in zip(reference, volume)])
    return evidence


def order_facts(perm: Sequence[str], evidence: dict) -> dict[str, float]:
    """Each fact's score (roughly within [-1, 1], higher = fits) if the stored channels are `perm`."""
    if not evidence:
        return {}
    i = {name: perm.index(name) for name in CHANNELS}
    corr, ranks = evidence["corr"], evidence["ranks"]
    facts = {"T1 and T1ce look alike outside the tumour": float(corr[i["t1"], i["t1ce"]])}
    t1_like = (ranks[i["t1"]] + ranks[i["t1ce"]]) / 2
    csf = t1_like <= np.quantile(t1_like, 0.1)
    if np.count_nonzero(csf) >= MIN_CLASS_VOXELS:
        facts["CSF (darkest on T1) is bright on T2 and dark on FLAIR"] = float(
            ranks[i["t2"], csf].mean() - ranks[i["flair"], csf].mean()
        )
    if "ED" in evidence:
        ed = evidence["ED"]
        facts["edema is bright on T2/FLAIR and dark on T1/T1ce"] = float(
            (ed[i["t2"]] + ed[i["flair"]] - ed[i["t1"]] - ed[i["t1ce"]]) / 2
        )
    if "ET" in evidence:
        et = evidence["ET"]
        facts["enhancing tumour is brighter on T1ce than on T1"] = float(et[i["t1ce"]] - et[i["t1"]])
    return facts


def check_kaggle_channel_order(
    volume_by_channel: np.ndarray,
    labels: np.ndarray | None,
    order: Sequence[str] | str,
    *,
    brain: np.ndarray | None = None,
) -> str | None:
    """Warning text when the stored channels' contrast contradicts `order`, else None.

    `volume_by_channel` is (4, H, W, D) in stored order with the background at 0 (or pass
    `brain`); `labels` the 0..3 label map or None (then only the label-free facts count, and T1
    cannot be told from T1ce). Inconclusive data give None.
    """
    order = parse_order(order)
    volume = np.asarray(volume_by_channel)
    if volume.ndim != 4 or volume.shape[0] != 4:
        raise ValueError(f"expected a (4, H, W, D) volume, got shape {volume.shape}")
    if brain is None:
        brain = np.any(volume != 0, axis=0)
    evidence = contrast_evidence(volume, brain, labels)
    if not evidence:
        return None
    scores = {}
    for perm in itertools.permutations(CHANNELS):
        scores[perm] = sum(order_facts(perm, evidence).values())
    best = max(scores, key=lambda p: (scores[p], p == order))
    if scores[best] - scores[order] <= ORDER_MARGIN:
        return None
    chosen, suggested = order_facts(order, evidence), order_facts(best, evidence)
    reasons = "; ".join(
        f"{fact}: {chosen[fact]:+.2f} as assumed vs {suggested[fact]:+.2f}"
        for fact in chosen
        if suggested[fact] - chosen[fact] > 0.05
    )
    return (
        f"kaggle channel order {','.join(order)} is contradicted by the image contrast; the data "
        f"suggest {','.join(best)} (pass --kaggle-channel-order {','.join(best)}). Fit per fact "
        f"(1 = as in real MRI): {reasons}"
    )
