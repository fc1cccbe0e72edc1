"""`etl synth --out` into a folder that already holds something: add only what stays consistent.

A synthetic patient i is a function of (seed, i, layout, shape) alone, so a dataset can grow: the
same layout, shape and seed with more patients rewrites patients 1..N byte for byte, adds the
new ones and rewrites the CSVs to list all of them. Anything else would mix two datasets (a
build would then take them as one), so it is refused, as is a folder `etl synth` did not make.
The marker file says what a folder was made with; it is written before the first patient, and
records the patients known to be complete (`complete`, set by `record_complete` once the last
file is written), so a run that was interrupted (a kill, a full disk) is finished by repeating it.
"""

from __future__ import annotations

import json
from pathlib import Path

from shards_spec.checked_io import read_json, refuse_broken_link
from shards_spec.errors import ToolError
from shards_spec.fileio import refusal, write_atomic

MARKER = ".etl-synth.json"
MAX_MARKER_BYTES = 1 << 16
"""The marker holds four small values."""


def prepare(out: Path, *, layout: str, shape: tuple[int, int, int], seed: int, patients: int,
            profile: str = "default") -> tuple[int, int]:
    """Check `out` for a synthetic dataset of `patients` patients; (patients to write, already there).

    Raises ToolError naming `out` when it holds files `etl synth` did not write, or a dataset
    made with another layout, shape, seed or profile. Writes the marker for the run that follows
    (a `default` profile is not recorded, so folders made before profiles existed still match)."""
    made = {"layout": layout, "shape": list(shape), "seed": seed, "profile": profile}
    before = _existing(out)
    if before is not None:
        old = {k: before.get(k, "default" if k == "profile" else None) for k in made}
        if old != made:
            shown = ", ".join(f"{k} {_text(old[k])}" for k in made if old[k] != made[k])
            raise ToolError(f"holds a synthetic dataset made with {shown}; etl synth adds patients to it only "
                            "with the same --layout, --shape, --seed and --profile (or choose another --out)", out)
    recorded = int(before.get("patients", 0)) if before else 0
    complete = before.get("complete", recorded) if before else 0  # a marker without it: an older, whole run
    had = complete if isinstance(complete, int) and 0 <= complete <= recorded else 0
    total = max(recorded, patients)
    if profile == "default":
        del made["profile"]
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_marker(out, {"tool": "etl synth", **made, "patients": total, "complete": had})
    except OSError as exc:  # a full disk: the marker is the old one or the new one, whole
        raise ToolError(f"cannot be written ({refusal(exc)})", exc.filename or out) from None
    return total, had


def record_complete(out: Path, patients: int) -> None:
    """After the last file of a run: the marker (if `prepare` wrote one for `patients` patients)
    says they are all there, so the same command then finds nothing to add."""
    try:
        recorded = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return
    if isinstance(recorded, dict) and recorded.get("patients") == patients and recorded.get("complete") != patients:
        _write_marker(out, {**recorded, "complete": patients})


def _write_marker(out: Path, record: dict) -> None:
    write_atomic(out / MARKER, json.dumps(record, sort_keys=True) + "\n")


def _existing(out: Path) -> dict | None:
    """What a previous `etl synth` recorded in `out`; None for a missing or empty folder."""
    refuse_broken_link(out)
    if out.exists() and not out.is_dir():
        raise ToolError("exists and is not a folder", out)
    if not out.exists() or not any(out.iterdir()):
        return None
    if not (out / MARKER).exists():
        raise ToolError("is not empty and was not made by etl synth; choose a new or empty folder", out)
    try:
        recorded = read_json(out / MARKER, MAX_MARKER_BYTES, ToolError)
    except ToolError:
        raise ToolError(f"holds an unreadable {MARKER}; choose a new or empty folder", out) from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("patients"), int):
        raise ToolError(f"holds an unreadable {MARKER}; choose a new or empty folder", out)
    return recorded


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
