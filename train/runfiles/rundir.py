"""The run folder: what `train run` writes and `train report` / `train evaluate` read.

    runs/NAME/config.json          the resolved options, how they were made, the data's digest
    runs/NAME/metrics.csv          one row per completed epoch (columns: `metric_columns`)
    runs/NAME/checkpoints/last.pt  every epoch (and at a mid-epoch stop); best.pt: best score
    runs/NAME/report/              pictures and report.md (`train report`)

metrics.csv columns are fixed per target: `epoch, train_loss, val_loss, mean_dice`, then each
registered count metric (`train.metrics.COUNT_METRICS`: dice, prec, recall, ...) per output
channel, then `lr, seconds`. The channel names are NEC/NET, ED, ET for `--target classes` and
WT, TC, ET for `--target regions`. Every file is written atomically; metrics.csv is rewritten
whole from the checkpoint's history when a run starts or resumes, so a crash between the
checkpoint and the CSV row cannot leave them out of step.

A folder is a run when its config.json reads as a run's, or it holds checkpoints/last.pt
(`is_run`). The run's own files (`own_files`: the ones above, `train report`'s pictures and
pages, `--logger tensorboard`'s event files, temporary checkpoint files) are all that
`train run --force` replaces; anything else in the folder (an `eval.json` the user put there)
stays. A new run goes only into a new or empty
folder or over a run; `train.fit` refuses any other, naming a few of its entries (`entries`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from shards_spec.checked_io import read_json
from shards_spec.errors import ToolError
from shards_spec.fileio import write_atomic
from shards_spec.labels import CLASS_NAMES, REGION_NAMES

from ..metrics import COUNT_METRICS

TENSORBOARD_DIR = "tensorboard"
"""`--logger tensorboard` writes its event files here, in the run folder."""

CONFIG = "config.json"
METRICS = "metrics.csv"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
REPORT = "report"
MAX_CONFIG_BYTES = 1 << 20
"""A run's config.json is a few KB; it is read no further than this."""
REPORT_FILES = ("report.md", "report.html", "loss.png", "scores.png", "lr.png", "slices.png")
"""What `train report` writes into RUN/report/ (tests/hardening ties this list to a real report)."""


class RunDirError(ToolError):
    """A run folder's file that cannot be read as this tool wrote it."""


def metric_columns(target: str) -> list[str]:
    """metrics.csv header: fixed order; see the module doc. Every run has the seed's per-class
    columns (NEC/NET, ED, ET, from the label map); a regions run adds WT and TC after them (its ET
    region is the ET class). `mean_dice` is the mean over the target's channels."""

    per_class = [f"{m.column}_{name}" for m in COUNT_METRICS.values() for name in CLASS_NAMES]
    regions = [f"{m.column}_{name}" for m in COUNT_METRICS.values() for name in REGION_NAMES if name not in CLASS_NAMES]
    return ["epoch", "train_loss", "val_loss", "mean_dice", *per_class, *(regions if target == "regions" else []),
            "lr", "seconds"]


def default_out(variant: str, now: datetime | None = None) -> str:
    """runs/<variant>-<YYYYmmdd-HHMMSS>, with -2, -3, ... when that folder exists already."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{variant}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return str(candidate)


def checkpoint_path(run_dir: Path | str, name: str = LAST) -> Path:
    return Path(run_dir) / CHECKPOINTS / name


def write_config(run_dir: Path, record: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / CONFIG, json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_config(run_dir: Path | str) -> dict[str, Any]:
    """The resolved options of a run (`config.json`'s "config")."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunDirError("no config.json: not a train run folder", path)
    record = read_json(path, MAX_CONFIG_BYTES, RunDirError, "; a run's config.json holds its options")
    config = record.get("config") if isinstance(record, dict) else None
    if not isinstance(config, dict):
        raise RunDirError("is not a train run's config.json", path)
    return config


def is_run(run_dir: Path | str) -> bool:
    """Whether `run_dir` holds a run of this tool: a config.json that reads as a run's, or a
    checkpoints/last.pt (what `--resume` continues from; it holds the configuration too)."""
    if checkpoint_path(run_dir, LAST).is_file():
        return True
    try:
        read_config(run_dir)
    except RunDirError:
        return False
    return True


def entries(run_dir: Path | str) -> list[str]:
    """What a folder holds besides its lock file (`shards_spec.lock`), sorted, folders with '/'."""
    import os

    from shards_spec.lock import LOCK_NAME

    with os.scandir(run_dir) as found:
        return sorted(e.name + ("/" if e.is_dir() else "") for e in found if e.name != LOCK_NAME)


def own_files(run_dir: Path | str) -> list[Path]:
    """The files of a run that exist in `run_dir` (module docstring): what `--force` replaces."""
    from shards_spec.fileio import TMP_SUFFIX


    run_dir = Path(run_dir)
    checkpoints = run_dir / CHECKPOINTS
    files = [run_dir / METRICS, checkpoint_path(run_dir, LAST), checkpoint_path(run_dir, BEST),
             *(run_dir / REPORT / name for name in REPORT_FILES),
             *sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*")),
             *sorted(checkpoints.glob(".*.tmp-*")), *sorted(checkpoints.glob(f".*{TMP_SUFFIX}"))]
    return [f for f in files if f.is_file() or f.is_symlink()]


def remove_own_files(run_dir: Path | str) -> list[Path]:
    """Delete the run's own files but config.json (rewritten as the new run starts), so a run
    started again with `--force` neither resumes nor reports the old one; the user's stay."""
    removed = own_files(run_dir)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def metrics_text(columns: list[str], rows: list[dict]) -> str:
    """The whole metrics.csv; a column a row lacks (a metric registered later) is written nan."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c, math.nan)) for c in columns])
    return buffer.getvalue()


def write_metrics(run_dir: Path, columns: list[str], rows: list[dict]) -> None:
    write_atomic(Path(run_dir) / METRICS, metrics_text(columns, rows))


def append_metrics_row(run_dir: Path, columns: list[str], row: dict) -> None:
    with open(Path(run_dir) / METRICS, "a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerow([_cell(row.get(c, math.nan)) for c in columns])


def _parse_metrics(reader: Any, path: Path) -> tuple[list[str], list[dict[str, float]]]:
    try:
        columns = next(reader)
    except StopIteration:
        raise RunDirError("is empty (no header)", path) from None
    needed = {"epoch", "train_loss", "val_loss", "mean_dice", "lr"}
    if not needed <= set(columns) or not any(c.startswith("dice_") for c in columns):
        missing = sorted(needed - set(columns)) or ["dice_*"]
        raise RunDirError(f"header lacks {missing}: not a train run's metrics", path)
    rows = []
    for number, values in enumerate(reader, start=2):
        if not values:
            continue
        if len(values) != len(columns):
            raise RunDirError(f"line {number} has {len(values)} fields, the header {len(columns)}", path)
        try:
            rows.append({c: float(v) for c, v in zip(columns, values)})
        except ValueError:
            raise RunDirError(f"line {number} holds a value that is not a number", path) from None
    return columns, rows


def read_metrics(path: Path) -> tuple[list[str], list[dict[str, float]]]:
    """The header and rows of metrics.csv, values as floats (nan stays nan)."""
    if not path.is_file():
        raise RunDirError("no metrics.csv: not a run folder, or no epoch has finished yet", path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            columns, rows = _parse_metrics(csv.reader(fh), path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "it is not a CSV text file"
        raise RunDirError(f"cannot be read ({reason})", path) from None
    if not rows:
        raise RunDirError("holds no epoch yet", path)
    return columns, rows


__all__ = ["BEST", "CHECKPOINTS", "CONFIG", "LAST", "METRICS", "REPORT", "REPORT_FILES", "RunDirError",
           "append_metrics_row", "checkpoint_path", "default_out", "entries", "is_run",
           "metric_columns", "metrics_text", "own_files", "read_config", "read_metrics", "remove_own_files",
           "write_config", "write_metrics"]
