"""`train evaluate`'s results shown and written: the terminal tables and headline, the JSON
(`--json`: everything, NaN as null) and the per-patient CSV (`--csv`: one row per patient and grid).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from shards_spec.fileio import write_atomic

from ..metrics import BRATS_MAX_HD95, PATIENT_KEYS
from ..metrics.lesionwise import LESION_MAX_HD95, LESION_METRICS
from .evaluate_checks import EvaluateError, check_outputs
from .evaluate_native import count_metric_names, native_metric_names


def write_outputs(results: dict, outputs: dict[str, Path], overwrite: bool, console: Any) -> None:
    """Write the `--json` and `--csv` outputs asked for (`outputs`: option -> path), each named on
    `console`; without `overwrite` they are checked once more first (`check_outputs`): another
    process may have written one meanwhile."""
    texts = {"--json": json.dumps(_clean(results), indent=1, allow_nan=False) + "\n", "--csv": patients_csv(results)}
    if not overwrite:
        check_outputs(outputs, {}, overwrite)
    for name, path in outputs.items():
        _write(path, texts[name])
        console.print(f"wrote {path}", highlight=False)


def print_tables(results: dict, console: Any) -> None:
    """The terminal summary: one table per level, each titled with its average (cells never
    wrapped: `shards_spec.cli.print_table`)."""
    from rich.table import Table

    from shards_spec.cli import print_table

    ck = results["checkpoint"]
    digest = results["manifest_digest"]
    console.print(f"{ck['path']}: {ck['model']} epoch {ck['epoch']}, channels {','.join(ck['channels'])}, target "
                  f"{ck['target']}; split {results['split']} of {results['shards']} "
                  f"({'the shards it was trained on' if digest['match'] else 'OTHER shards than it was trained on'})",
                  highlight=False)
    sl = results["slice_level"]
    table = Table(title=f"slice level: TP/FP/FN summed over {sl['slices']} slices (as in training), shard grid")
    table.add_column("channel")
    for m in count_metric_names():
        table.add_column(m, justify="right")
    for name in sl["channels"]:
        table.add_row(name, *(_fmt(sl[m][name]) for m in count_metric_names()))
    table.add_row("mean", _fmt(sl["mean_dice"]), *[""] * (len(count_metric_names()) - 1), end_section=True)
    print_table(console, table)
    if sl["undefined"]:
        console.print(f"{', '.join(sl['undefined'])}: no voxel in prediction or truth: NaN, left out of the mean")
    grid = results["shard_grid"]
    print_table(console, _patient_table(grid, count_metric_names(), f"patient level, shard grid: mean ± std (median) over "
                                                f"{grid['patients']} patients"))
    native = results.get("native_grid")
    if native:
        print_table(console, _patient_table(native, native_metric_names(), f"patient level, native grid (--src, headline): "
                                                             f"mean ± std (median) over {native['patients']} patients",
                                     native.get("lesion_wise")))
        if native.get("lesion_wise"):
            console.print("lesion-wise (BraTS 2023+, brats-evaluation's glioma rule): mean Dice / HD95 over matched "
                          f"lesions, {LESION_MAX_HD95:g} mm when none matched; lesions matched/FP/FN summed over "
                          "patients; patients with no lesion in either left out", highlight=False)
        cases = [f"{k} {c['both_empty']}/{c['truth_empty_pred_not']}/{c['pred_empty_truth_not']}"
                 for k, c in native["empty_cases"].items()
                 if c["both_empty"] or c["truth_empty_pred_not"] or c["pred_empty_truth_not"]]
        if cases:
            console.print("empty cases (both empty -> Dice 1, HD95 0 / truth empty, prediction not -> Dice 0, HD95 "
                          f"{BRATS_MAX_HD95} / prediction empty, truth not -> Dice 0, HD95 {BRATS_MAX_HD95}): "
                          + "; ".join(cases), highlight=False)
    console.print(results["headline"], highlight=False)


def headline(results: dict) -> str:
    """One line: the mean Dice over the BraTS regions WT, TC, ET, per patient then averaged, on the
    native grid when `--src` was given (the number comparable with published results), else on the
    shard grid, and said which; a `--src` that is not the shards' source (`check_source`) is named."""
    block = results.get("native_grid") or results["shard_grid"]
    grid = "native grid" if results.get("native_grid") else "shard grid (no --src)"
    if (block.get("source") or {}).get("match") is False:
        grid += " of a --src that is NOT the source the shards were built from"
    dice = {k: block["summary"][k]["dice"]["mean"] for k in ("WT", "TC", "ET")}
    mean = float(np.mean(list(dice.values())))
    inference = results.get("inference") or {}
    used = [f"{inference['models']} models" if inference.get("models", 1) > 1 else "",
            "mirroring TTA" if inference.get("tta") else "",
            f"ET below {inference['min_et_voxels']} voxels -> NEC/NET" if inference.get("min_et_voxels") else ""]
    used = [u for u in used if u]
    return (f"mean Dice over WT/TC/ET: {mean:.3f} (WT {dice['WT']:.3f}, TC {dice['TC']:.3f}, ET {dice['ET']:.3f}; "
            f"per patient on the {grid}, mean over {block['patients']} patients"
            + (f"; {', '.join(used)}" if used else "") + ")")


def _patient_table(block: dict, metrics: Iterable[str], title: str, lesion_wise: dict | None = None) -> Any:
    from rich.table import Table

    metrics = list(metrics)
    table = Table(title=title)
    table.add_column("class / region")
    for m in metrics:
        table.add_column(m + (" (mm)" if m == "hd95" else ""), justify="right")
    if lesion_wise:
        for name in ("lesion dice", "lesion hd95 (mm)", "lesions TP/FP/FN"):
            table.add_column(name, justify="right")
    for key in PATIENT_KEYS:
        row = []
        for m in metrics:
            s = block["summary"][key][m]
            row.append(f"{_fmt(s['mean'])} ± {_fmt(s['std'])} ({_fmt(s['median'])})")
        if lesion_wise:
            row += _lesion_cells(lesion_wise, key)
        table.add_row(key, *row)
    return table


def _lesion_cells(lesion_wise: dict, key: str) -> list[str]:
    """Lesion-wise Dice, HD95 and lesion counts of a region (blank for the classes)."""
    if key not in lesion_wise["summary"]:
        return ["", "", ""]
    s, n = lesion_wise["summary"][key], lesion_wise["lesions"][key]
    cells = [f"{_fmt(s[m]['mean'])} ± {_fmt(s[m]['std'])} ({_fmt(s[m]['median'])})" for m in ("dice", "hd95")]
    return cells + [f"{n['tp']}/{n['fp']}/{n['fn']}"]


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def patients_csv(results: dict) -> str:
    """One row per patient and grid: dice_K, precision_K, recall_K, hd95_K (native only), voxels."""
    keys = list(PATIENT_KEYS)
    columns = ["patient", "grid"]
    for m in native_metric_names():
        columns += [f"{m}_{k}" for k in keys]
    columns += [f"truth_voxels_{k}" for k in keys] + [f"pred_voxels_{k}" for k in keys]
    native = results.get("native_grid") or {}
    lesion_columns = [(m, r) for m in LESION_METRICS for r in (native.get("lesion_wise") or {}).get("summary", {})]
    columns += [f"lesion_{m}_{r}" for m, r in lesion_columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for grid_name, block in (("shard", results["shard_grid"]), ("native", results.get("native_grid"))):
        if not block:
            continue
        for p in block["per_patient"]:
            row: list[Any] = [p["patient"], grid_name]
            for m in native_metric_names():
                row += [_cell(p["scores"][k].get(m)) for k in keys]
            row += [p["voxels"][k]["truth"] for k in keys] + [p["voxels"][k]["pred"] for k in keys]
            lesions = p.get("lesion_wise")
            row += [_cell(float(lesions[r][m])) if lesions else "" for m, r in lesion_columns]
            writer.writerow(row)
    return buffer.getvalue()


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else repr(float(value))


def _clean(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is strict."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write(path: Path, text: str) -> None:
    """Write one output atomically (`write_atomic`); a refused write is one line naming it."""
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise EvaluateError(f"cannot write ({exc.strerror or exc})", path) from None


__all__ = ["headline", "patients_csv", "print_tables", "write_outputs"]
