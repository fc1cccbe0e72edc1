"""`report.html`: the run report as one self-contained page (`train report` writes it beside report.md).

Everything is inside the file, so it opens in any browser, from a mail attachment or a shared
drive, with no folder next to it: the pictures `train report` drew (curves, the best / median /
worst validation patients' slices) inlined as base64 PNG `data:` URIs, the per-class table of the
last and best epochs (dataset-level validation numbers from metrics.csv) and, when the slices
were drawn, the patient-level Dice per class and region behind the slice choice. No script, no
external style sheet, font or image.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from ..metrics import PATIENT_KEYS
from .tables import epoch_table, epochs_trained

CAPTIONS = {
    "loss.png": "Loss: train (mean over the steps' slices) and validation (mean over slices) per epoch",
    "scores.png": "Validation Dice, precision and recall per output channel (TP/FP/FN summed over slices)",
    "lr.png": "Learning rate per epoch",
    "slices.png": "Best, median and worst validation patient by mean class Dice, each on its slice with the "
                  "most tumour: ground truth left, prediction right",
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; }
figure { margin: 1.5em 0; } img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
"""


def render_html(run_dir: Path, rows: list[dict], names: list[str], pictures: dict[str, bytes],
                slices_note: str | None, patient_summary: dict | None) -> str:
    """The page; `pictures` maps a report PNG's name to its bytes, in the order to show them."""

    columns, body = epoch_table(rows, names)
    parts = [f"<h1>Run report: {_e(run_dir.name)}</h1>",
             f"<p>{_e(epochs_trained(rows))}. Validation numbers per epoch are dataset-level: TP/FP/FN summed "
             "over every validation slice on the shard grid, then one score per channel (&ndash;: NaN, no voxel in prediction "
             "or truth, left out of the mean Dice).</p>",
             _table(["epoch", "", *columns], [(epoch, [label, *cells]) for epoch, label, cells in body], "epochs")]
    parts.append("<h2>Curves</h2>")
    parts += [_figure(name, data) for name, data in pictures.items() if name != "slices.png"]
    parts.append("<h2>Validation slices</h2>")
    if "slices.png" in pictures and patient_summary:
        parts.append(f"<p><code>checkpoints/best.pt</code> (epoch {patient_summary['checkpoint_epoch']}) on the "
                     f"{patient_summary['patients']} patient(s) of split <code>{_e(patient_summary['split'])}</code>, "
                     "Dice per patient on the shard grid (prediction and truth both empty: 1), over patients:</p>")
        summary = patient_summary["summary"]
        rows_ = [(stat, [_num(summary[k]["dice"][stat]) for k in PATIENT_KEYS]) for stat in ("mean", "median", "std")]
        parts.append(_table(["Dice", *PATIENT_KEYS], [(f"Dice {s}", cells) for s, cells in rows_], "patients"))
        parts.append(_figure("slices.png", pictures["slices.png"]))
    else:
        parts.append(f"<p>Not drawn: {_e(slices_note or 'no slice pictures')}</p>")
    parts.append("<p>For the headline numbers (patient level on the native grid, HD95) run <code>train evaluate "
                 "--checkpoint checkpoints/best.pt --shards SHARDS --src BRATS_DIR</code>.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Run report: {_e(run_dir.name)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def _table(header: list[str], body: list[tuple[str, list[str]]], css: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    lines = [f"<tr><th>{_e(label)}</th>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"
             for label, cells in body]
    return f"<table class=\"{css}\">\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(lines) + "\n</tbody></table>"


def _figure(name: str, data: bytes) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    caption = CAPTIONS.get(name, name)
    return (f"<figure><img alt=\"{_e(Path(name).stem)}\" src=\"data:image/png;base64,{encoded}\">"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _num(value: Any, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _e(text: Any) -> str:
    return html.escape(str(text))


__all__ = ["render_html"]
