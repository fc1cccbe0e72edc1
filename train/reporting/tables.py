"""The per-epoch table of a run, as report.md and report.html both show it."""

from __future__ import annotations

import math


def epoch_table(rows: list[dict], names: list[str]) -> tuple[list[str], list[tuple[str, str, list[str]]]]:
    """The last and best epochs' per-class numbers, for report.md and report.html alike:
    (column titles, [(epoch, "last" / "best" / "last, best", formatted cells)])."""
    best = max(rows, key=lambda r: -math.inf if math.isnan(r["mean_dice"]) else r["mean_dice"])
    last = rows[-1]
    columns = ["train loss", "val loss", "mean Dice", *(f"Dice {n}" for n in names),
               *(f"precision {n}" for n in names), *(f"recall {n}" for n in names)]
    body = []
    for label, row in (("last", last), ("best", best)) if best is not last else (("last, best", last),):
        cells = [number_text(row["train_loss"], 4), number_text(row["val_loss"], 4), number_text(row["mean_dice"])]
        for prefix in ("dice", "prec", "recall"):
            cells += [number_text(row.get(f"{prefix}_{n}", math.nan)) for n in names]
        body.append((epoch_text(row["epoch"]), label, cells))
    return columns, body


def epoch_text(epoch: float) -> str:
    """An epoch as metrics.csv counts it: "5", or "4.301" for a time-budget stop inside epoch 5."""
    return str(int(epoch)) if float(epoch).is_integer() else f"{epoch:g}"


def epochs_trained(rows: list[dict]) -> str:
    """What the report's heading says of the run's length: the last row's epoch, and how the
    fractional rows (time-budget stops inside an epoch) came about."""
    last = rows[-1]["epoch"]
    text = f"{epoch_text(last)} epoch(s) trained"
    if math.isfinite(last) and not float(last).is_integer():
        text += f" (stopped by the time budget inside epoch {math.floor(last) + 1})"
    resumed = sum(1 for r in rows[:-1] if math.isfinite(r["epoch"]) and not float(r["epoch"]).is_integer())
    if resumed:
        text += f"; {resumed} row(s) below the last are time-budget stops inside an epoch that was resumed"
    return text


def number_text(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


__all__ = ["epoch_table", "epoch_text", "epochs_trained", "number_text"]
