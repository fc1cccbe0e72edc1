"""`train report RUN_DIR`: pictures of a run and a markdown page embedding them, in RUN_DIR/report/.

    train report runs/v1

What it writes (matplotlib, Agg backend, so it runs without a display):

- `loss.png`    train and validation loss per epoch (metrics.csv), both the mean over slices of
                each slice's own loss, so the two curves compare;
- `scores.png`  Dice, precision and recall per output channel per epoch (NEC/NET, ED, ET with
                `--target classes`, WT, TC, ET with `--target regions`; the channel names are
                read from the metrics.csv header), with the validation mean Dice; these are
                the trainer's dataset-level numbers (TP/FP/FN summed over the validation slices);
- `lr.png`      the learning rate per epoch (log scale; ReduceLROnPlateau steps show);
- `slices.png`  validation slices of the best, median and worst patients by patient Dice (mean
                of the three classes, per patient on the shard grid), each on the slice with the
                most tumour: FLAIR (else T1ce, else the first channel) with the ground-truth
                contours (left) and the predicted ones (right) per class, using
                `checkpoints/best.pt` and the shards and validation split recorded in
                `config.json`; left out, with the reason in `report.md`, when the checkpoint or
                the shards cannot be read;
- `report.md`   the pictures, the final and best epochs' metrics table, and the patient-level
                numbers behind the slice choice, each with the average it is;
- `report.html` the same as one self-contained page (`train.reporting.html`: pictures inlined as
                base64 PNG), to open in a browser or send on.

Slices are shown as stored (first array axis to the right, second axis up); no reorientation.

Every file is drawn in memory first, then all are written together (`write_files`), so a full
disk leaves the previous report whole and is one line naming the file (`ReportError`).
`train run` calls `try_write(run_dir)` at the end of training: a report that cannot be written
is one warning line, never a failed training.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np

from shards_spec.errors import ToolError
from shards_spec.fileio import atomic_path, refusal

from ..apply import inference
from ..apply.evaluate import shard_grid_patients
from ..metrics import PATIENT_KEYS, summarize_patients
from ..runfiles.rundir import read_config, read_metrics
from .html import render_html
from .pictures import DISPLAY_CHANNELS, ShownSlice, plot_slices, png_bytes
from .tables import epoch_table, epochs_trained, number_text

REPORT_DIR = "report"
class ReportError(ToolError):
    """A run folder without what a report needs (metrics.csv)."""


def main(run_dir: Path | str, device: str = "auto", batch_size: int = 32, console: Any = None,
         storage_options: dict | None = None) -> Path:
    """Write RUN_DIR/report/ (see the module docstring); return the path of report.md.

    `storage_options` go to fsspec when the run's shards are a URL (they are not in config.json).
    Raises `ReportError` (one line naming the file) for a run folder it cannot read or a report
    it cannot write; a slice picture that cannot be drawn is a warning line and a note in the report."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    from rich.console import Console


    console = console or Console(stderr=True, soft_wrap=True)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError("is not a run folder (it does not exist)", run_dir)
    columns, rows = read_metrics(run_dir / "metrics.csv")
    names = [c.split("_", 1)[1] for c in columns if c.startswith("dice_")]

    pictures = {"loss.png": png_bytes(plot_loss(rows)), "scores.png": png_bytes(plot_scores(rows, names)),
                "lr.png": png_bytes(plot_lr(rows))}
    slices_note, patient_summary = None, None
    try:
        shown, patient_summary = choose_slices(run_dir, device, batch_size, console, storage_options)
        pictures["slices.png"] = png_bytes(plot_slices(shown))
    except ToolError as exc:
        slices_note = str(exc)
        console.print(f"warning: report: no slice pictures: {slices_note}", markup=False, highlight=False)
    out = run_dir / REPORT_DIR
    write_files(out, {**pictures,
                      "report.md": render_markdown(run_dir, rows, names, list(pictures), slices_note, patient_summary),
                      "report.html": render_html(run_dir, rows, names, pictures, slices_note, patient_summary)})
    console.print(f"report: {out / 'report.md'}, {out / 'report.html'} ({', '.join(pictures)})",
                  markup=False, highlight=False)
    return out / "report.md"


def try_write(run_dir: Path | str, device: str = "auto", batch_size: int = 32, console: Any = None,
              storage_options: dict | None = None) -> str | None:
    """`main` at the end of `train run`: the training is done and its checkpoints are written, so a
    report that cannot be made (a full disk, a plotting library failing) must not turn it into a
    failure. Returns None when the report is written, else the warning line it printed (stderr)."""
    try:
        main(run_dir, device=device, batch_size=batch_size, console=console, storage_options=storage_options)
        return None
    except Exception as exc:  # noqa: BLE001 - whatever failed, the training stands
        reason = str(exc) if isinstance(exc, ToolError) else f"{type(exc).__name__}: {_first_line(exc)}"
        line = (f"warning: the report was not written: {reason}; the training is complete "
                f"(`train report {run_dir}` tries again)")
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(line, markup=False, highlight=False)  # a warning: stderr
        return line


class ReportCallback:
    """`train run --report` (on by default): the report written when a run has trained to its end,
    as a trainer callback like the trackers (rank 0 only). A report that fails is a warning
    (`try_write`): a finished training never fails on its report."""

    def __init__(self, storage_options: dict | None = None) -> None:
        self.storage_options = storage_options

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        if result.trained and result.history:
            try_write(result.run_dir, console=trainer.console, storage_options=self.storage_options)


def write_files(out: Path, files: dict[str, bytes | str]) -> None:
    """Write every file into `out`, all or none: each goes to its temporary name, and the renames
    happen only once all are whole, so a full disk leaves the previous report as it was.
    Raises `ReportError` naming the file that could not be written."""
    try:
        with contextlib.ExitStack() as stack:
            temps = {name: stack.enter_context(atomic_path(out / name)) for name in files}
            for name, data in files.items():
                temps[name].write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as exc:
        raise ReportError(f"cannot be written ({refusal(exc)}); the previous report is unchanged",
                          exc.filename or out) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no detail"


# ---------------------------------------------------------------- metrics.csv and curves


def _epochs(rows: list[dict]) -> list[float]:
    return [r["epoch"] for r in rows]


def _epoch_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_loss(rows: list[dict]) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(_epochs(rows), [r["train_loss"] for r in rows], marker="o", label="train (mean per-slice loss, augmented)")
    ax.plot(_epochs(rows), [r["val_loss"] for r in rows], marker="o", label="validation (mean per-slice loss)")
    ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    _epoch_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_scores(rows: list[dict], names: list[str]) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, (prefix, title) in zip(axes, (("dice", "Dice"), ("prec", "precision"), ("recall", "recall"))):
        for name in names:
            key = f"{prefix}_{name}"
            if key in rows[0]:
                ax.plot(_epochs(rows), [r[key] for r in rows], marker="o", label=name)
        if prefix == "dice":
            ax.plot(_epochs(rows), [r["mean_dice"] for r in rows], color="black", linestyle="--", label="mean")
        ax.set(xlabel="epoch", title=f"validation {title} (TP/FP/FN summed over slices)", ylim=(-0.02, 1.02))
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_lr(rows: list[dict]) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    values = [r["lr"] for r in rows]
    ax.plot(_epochs(rows), values, marker="o", drawstyle="steps-post")
    if all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="learning rate", title="Learning rate (at each epoch's last step)")
    _epoch_axis(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- validation slices


def choose_slices(run_dir: Path, device: str, batch_size: int, console: Any,
                  storage_options: dict | None = None) -> tuple[list[ShownSlice], dict]:
    """Predict the validation patients on the shard grid with best.pt; pick best, median, worst."""
    from shards_spec.read import ShardStore


    config = read_config(run_dir)
    shards, split = config.get("shards"), config.get("val_split", "val")
    best = run_dir / "checkpoints" / "best.pt"
    loaded = inference.load_model(best, device)
    try:
        store = ShardStore(shards, cache_dir=config.get("cache_dir"), storage_options=storage_options)
        manifest = store.manifest
        manifest.require_split(split)
    except (ToolError, OSError) as exc:
        failure = network_failure(exc)
        if failure:
            raise ReportError(f"the shards in config.json cannot be reached ({failure})", shards) from None
        raise ReportError(f"the shards in config.json cannot be read ({exc})", shards) from None
    display = next((c for c in DISPLAY_CHANNELS if c in manifest.channels), manifest.channels[0])
    shown_index = manifest.channels.index(display)
    candidates = []  # (dice, patient, slice, image, truth, pred), one per patient
    per_patient = []
    for item in shard_grid_patients(loaded, store, split, batch_size, channels=list(manifest.channels)):
        patient, pred, scores = item.patient, item.pred, item.scores()
        per_patient.append({"patient": patient.patient, "scores": scores})
        dice = float(np.mean([scores[k]["dice"] for k in ("NEC/NET", "ED", "ET")]))
        tumour = (patient.mask > 0).sum(axis=(1, 2))
        s = int(np.argmax(tumour)) if tumour.any() else int(np.argmax((pred > 0).sum(axis=(1, 2))))
        candidates.append((dice, patient.patient, patient.slice_index[s],
                           patient.image[s, shown_index].astype(np.float32), patient.mask[s].copy(), pred[s].copy()))
    if not candidates:
        raise ReportError(f"split {split!r} holds no patient", shards)
    candidates.sort(key=lambda c: (-c[0], c[1]))
    picks = [("best", 0), ("median", len(candidates) // 2), ("worst", len(candidates) - 1)]
    seen, shown = set(), []
    for role, i in picks:
        if i in seen:
            continue
        seen.add(i)
        dice, pid, s, image, truth, pred = candidates[i]
        shown.append(ShownSlice(role, pid, dice, s, image, truth, pred, display))
    summary = {"split": split, "patients": len(per_patient), "checkpoint_epoch": loaded.epoch,
               "summary": summarize_patients(per_patient, ("dice",))}
    return shown, summary


def network_failure(exc: BaseException) -> str | None:
    """The connection failure behind a read of a URL, when there is one ("connection refused
    [ECONNREFUSED]"): fsspec's http reader reports a server that is gone as a missing file."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionError) and cause.errno:
            return f"{os.strerror(cause.errno).lower()} [{errno.errorcode.get(cause.errno, cause.errno)}]"
        if isinstance(cause, socket.gaierror):
            return f"host name not resolved ({cause.strerror})"
        if isinstance(cause, TimeoutError):
            return "timed out"
        cause = cause.__cause__ or cause.__context__
    return None


# ---------------------------------------------------------------- output


def md_text(text: object) -> str:
    """`text` shown literally in Markdown: the characters that start emphasis, code, links, HTML,
    entities, tables or a heading's closing `#` are backslash-escaped (a folder named `*x*` or
    `<img ...>` is neither emphasis nor HTML), line breaks become spaces."""
    flat = " ".join(str(text).splitlines())
    return re.sub(r"([\\`*_{}\[\]<>&#|!~$])", r"\\\1", flat)


def render_markdown(run_dir: Path, rows: list[dict], names: list[str], pictures: list[str], slices_note: str | None,
                    patient_summary: dict | None) -> str:
    columns, body = epoch_table(rows, names)
    lines = [f"# Run report: {md_text(run_dir.name)}", "",
             f"{epochs_trained(rows)}. Validation numbers per epoch are dataset-level: TP/FP/FN summed over every "
             "validation slice on the shard grid, then one score per channel (–: NaN, no voxel in prediction or "
             "truth, left out of the mean Dice).", "",
             "| epoch | | " + " | ".join(columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    lines += [f"| {epoch} | {label} | " + " | ".join(cells) + " |" for epoch, label, cells in body]
    lines += ["", "## Curves", "", "![loss](loss.png)", "", "![scores](scores.png)", "", "![learning rate](lr.png)", ""]
    lines += ["## Validation slices", ""]
    if "slices.png" in pictures and patient_summary:
        summary = patient_summary["summary"]
        lines += [f"`checkpoints/best.pt` (epoch {patient_summary['checkpoint_epoch']}) on the "
                  f"{patient_summary['patients']} patient(s) of split `{patient_summary['split']}`, per patient on "
                  "the shard grid (labels by the checkpoint's rule; prediction and truth both empty: Dice 1), "
                  "averaged over patients:", "",
                  "| | " + " | ".join(PATIENT_KEYS) + " |", "|---|" + "---:|" * len(PATIENT_KEYS),
                  "| Dice mean | " + " | ".join(number_text(summary[k]["dice"]["mean"]) for k in PATIENT_KEYS) + " |",
                  "| Dice median | " + " | ".join(number_text(summary[k]["dice"]["median"]) for k in PATIENT_KEYS) + " |",
                  "| Dice std | " + " | ".join(number_text(summary[k]["dice"]["std"]) for k in PATIENT_KEYS) + " |",
                  "", "Best, median and worst patient by mean class Dice, each on its slice with the most tumour: "
                  "ground truth left, prediction right.", "", "![validation slices](slices.png)", ""]
    else:
        lines += [f"Not drawn: {md_text(slices_note)}", ""]
    lines += ["For the headline numbers (patient level on the native grid, HD95) run "
              "`train evaluate --checkpoint checkpoints/best.pt --shards SHARDS --src BRATS_DIR`.", ""]
    return "\n".join(lines)


__all__ = ["ReportCallback", "ReportError", "epochs_trained", "main", "md_text", "read_metrics", "render_markdown", "try_write",
           "write_files"]
