"""`train evaluate`'s level 3, the headline: patient-level scores on the native grid (`--src`).

Each patient of the split is predicted from its source volumes exactly as `train predict` does
(`train.apply.inference.predict_volume`) and scored against its original segmentation
(`train.metrics.patient_scores`; with `--lesion-wise` also `train.metrics.lesionwise`); the
scores are averaged over patients and the empty cases counted (see `train.apply.evaluate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shards_spec.progress import Progress

from ..metrics import (
    BRATS_MAX_HD95,
    COUNT_METRICS,
    PATIENT_KEYS,
    label_masks,
    patient_scores,
    summarize_patients,
)
from ..metrics.lesionwise import lesionwise_scores, summarize_lesionwise
from . import inference
from .evaluate_checks import EvaluateError, scan_src, warn

AVERAGE = ("per patient on the native grid (predicted from the source volumes exactly as `train predict`, "
           "scored against the original segmentation), then mean/median/sample std over patients; "
           f"BraTS 2020 rule: both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 "
           f"{BRATS_MAX_HD95} mm; HD95 in mm as MONAI computes it")
"""What the native grid's figures average (its block's "average")."""
EMPTY_CASES = ("both_empty", "truth_empty_pred_not", "pred_empty_truth_not")


def count_metric_names() -> tuple[str, ...]:
    """The registered count scores (dice, precision, recall, ...), read when used so that a metric
    registered after import is included."""
    return tuple(COUNT_METRICS)


def native_metric_names() -> tuple[str, ...]:
    return (*count_metric_names(), "hd95")


def native_grid(loaded: inference.LoadedModel, manifest: Any, split: str, src: Path, batch_size: int,
                console: Any, lesion_wise: bool = False, scan: Any = None, warn_console: Any = None) -> dict:
    """Patient-level scores on the native grid from the source volumes (level 3, the headline).
    `scan`: `src` already scanned (`scan_src`); warnings go to `warn_console` (default `console`)."""
    warn_console = warn_console or console
    scan = scan if scan is not None else scan_src(src)
    by_id = {ref.id: ref for ref in scan.patients}
    wanted = manifest.patients_of(split)
    missing = _missing_patients(wanted, by_id, scan, split, src, warn_console)
    layout_options = _layout_options(manifest, scan)
    empty = {k: dict.fromkeys(EMPTY_CASES, 0) for k in PATIENT_KEYS}
    per_patient, warnings = [], []
    present = [p for p in wanted if p in by_id]
    with Progress(console, f"patients of {split} (native grid, --src)", len(present)) as advance:
        for pid in present:
            expected = manifest.content["patients"][pid].get("source_shape")
            record, warning = _score_patient(loaded, by_id[pid], expected, layout_options, batch_size, lesion_wise)
            if warning is not None:
                warnings.append(warning)
            _count_empty_cases(empty, record["voxels"])
            per_patient.append(record)
            advance()
    for line in warnings:
        warn(warn_console, line)
    return {
        "average": AVERAGE,
        "src": str(src),
        "layout": scan.layout,
        "patients": len(per_patient),
        "missing": missing,
        "warnings": warnings,
        "empty_cases": empty,
        "summary": summarize_patients(per_patient, native_metric_names()),
        "lesion_wise": summarize_lesionwise([p["lesion_wise"] for p in per_patient]) if lesion_wise else None,
        "per_patient": per_patient,
    }


def _missing_patients(wanted: list[str], by_id: dict, scan: Any, split: str, src: Path, warn_console: Any) -> list[str]:
    """The patients of the split that `--src` lacks (said in one warning line, with the scan's
    reasons when it names them); refused when it lacks them all."""
    missing = [p for p in wanted if p not in by_id]
    if len(missing) == len(wanted):
        raise EvaluateError(f"--src: none of the {len(wanted)} patient(s) of split {split!r} is in this "
                            f"{scan.layout} source (first: {wanted[0] if wanted else '-'})", src)
    if missing:
        reasons = [str(p) for p in scan.problems if any(m in str(p) for m in missing)]
        warn(warn_console, f"{len(missing)} of {len(wanted)} patient(s) of {split!r} not found (or unreadable) in "
                           f"--src, left out: {', '.join(missing[:5])}" + (f" ... ({'; '.join(reasons[:2])})" if reasons else ""))
    return missing


def _layout_options(manifest: Any, scan: Any) -> dict:
    """The layout's own options as the ETL recorded them (e.g. the Kaggle channel order), else its defaults."""
    from etl.sources import SOURCES

    layout = SOURCES.get(scan.layout)
    return layout.resolve_options(manifest.content.get("source") or {}) if layout is not None else {}


def _score_patient(loaded: inference.LoadedModel, ref: Any, expected_shape: list[int] | None, layout_options: dict,
                   batch_size: int, lesion_wise: bool) -> tuple[dict, str | None]:
    """One patient predicted from its source volumes and scored: its per-patient record, and a
    warning when its shape is not the one the shards recorded (another copy of the data?)."""
    from etl.sources import load_patient

    volume = load_patient(ref, channels=loaded.channels, require_labels=True, **layout_options)
    warning = None
    if expected_shape is not None and list(volume.shape) != list(expected_shape):
        warning = (f"{ref.id}: source shape {'x'.join(map(str, volume.shape))} differs from the "
                   f"shards' record {'x'.join(map(str, expected_shape))} (another copy of the data?)")
    prediction = inference.predict_volume(loaded, volume.volume, volume.brain, batch_size=batch_size)
    record = {"patient": ref.id, "shape": list(volume.shape), "spacing": [float(s) for s in volume.spacing],
              "scores": patient_scores(prediction.labels, volume.labels, volume.spacing),
              "voxels": _voxel_counts(prediction.labels, volume.labels)}
    if lesion_wise:
        record["lesion_wise"] = lesionwise_scores(prediction.labels, volume.labels, volume.spacing)
    return record, warning


def _voxel_counts(pred: Any, truth: Any) -> dict[str, dict[str, int]]:
    """Voxels of each class and region (PATIENT_KEYS) in the truth and in the prediction."""
    pred_masks, truth_masks = label_masks(pred), label_masks(truth)
    return {key: {"truth": int(truth_masks[key].sum()), "pred": int(pred_masks[key].sum())} for key in PATIENT_KEYS}


def _count_empty_cases(empty: dict[str, dict[str, int]], voxels: dict[str, dict[str, int]]) -> None:
    """Add one patient's empty cases per class and region (the BraTS 2020 rule scores them apart)."""
    for key, n in voxels.items():
        if n["pred"] == 0 and n["truth"] == 0:
            empty[key]["both_empty"] += 1
        elif n["truth"] == 0:
            empty[key]["truth_empty_pred_not"] += 1
        elif n["pred"] == 0:
            empty[key]["pred_empty_truth_not"] += 1


__all__ = ["AVERAGE", "count_metric_names", "native_grid", "native_metric_names"]
