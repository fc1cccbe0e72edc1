"""`train report` writes one self-contained report.html: parsed with the standard library's
`html.parser`, its epoch table holds metrics.csv's numbers (read here with `csv`), its patient
table the summary behind the slice choice, and every picture is an inlined PNG that decodes
(PIL) to the very image in report/; nothing is loaded from outside the file.
"""

from __future__ import annotations

import base64
import csv
import io
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.predict import make_shards, make_source
from train import fit
from train.reporting import report

torch.set_num_threads(1)


class Page(HTMLParser):
    """Tables (as lists of rows of cell texts, by class), images (alt, src), and every URL attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[tuple[str, str]] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append((attrs.get("alt", ""), attrs.get("src", "")))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from rich.console import Console

    root = tmp_path_factory.mktemp("html")
    shards = make_shards(make_source(root / "src", "brats2020", patients=4), root / "shards", size=32)
    out = root / "run"
    fit.run(dict(shards=str(shards), variant="v1", target="classes", stem=1, out=str(out), epochs=3, batch_size=8, workers=0, base=4, depth=2,
                 lr=0.01, seed=0, report=False), hooks=fit.Hooks(console=Console(quiet=True)))
    report.main(out, device="cpu", console=Console(quiet=True))
    return out


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def fmt(value: float, digits: int = 3) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


@pytest.mark.slow
def test_epoch_table_holds_metrics_csv(run_dir):
    page = parse(run_dir / "report" / "report.html")
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    header, *body = page.tables["epochs"]
    assert header[:5] == ["epoch", "", "train loss", "val loss", "mean Dice"]
    assert {"Dice NEC/NET", "Dice ED", "Dice ET", "precision ET", "recall ET"} <= set(header)
    last = rows[-1]
    best = max(rows, key=lambda r: -math.inf if math.isnan(r["mean_dice"]) else r["mean_dice"])
    expected = [(last, "last, best")] if best is last else [(last, "last"), (best, "best")]
    assert len(body) == len(expected)
    for cells, (row, label) in zip(body, expected):
        values = dict(zip(header, cells))
        assert values["epoch"] == str(int(row["epoch"])) and values[""] == label
        assert values["train loss"] == fmt(row["train_loss"], 4) and values["val loss"] == fmt(row["val_loss"], 4)
        assert values["mean Dice"] == fmt(row["mean_dice"])
        for name in ("NEC/NET", "ED", "ET"):
            assert values[f"Dice {name}"] == fmt(row[f"dice_{name}"])
            assert values[f"recall {name}"] == fmt(row[f"recall_{name}"])


def test_patient_table_is_the_summary_behind_the_slices(run_dir):
    from rich.console import Console

    page = parse(run_dir / "report" / "report.html")
    _, summary = report.choose_slices(run_dir, "cpu", 16, Console(quiet=True))
    header, *body = page.tables["patients"]
    assert header == ["Dice", "NEC/NET", "ED", "ET", "WT", "TC"]
    assert [cells[0] for cells in body] == ["Dice mean", "Dice median", "Dice std"]
    for cells, stat in zip(body, ("mean", "median", "std")):
        assert cells[1:] == [fmt(summary["summary"][k]["dice"][stat]) for k in header[1:]]


@pytest.mark.slow
def test_pictures_are_inlined_and_nothing_is_external(run_dir):
    folder = run_dir / "report"
    page = parse(folder / "report.html")
    assert [alt for alt, _ in page.images] == ["loss", "scores", "lr", "slices"]
    for alt, src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        data = base64.b64decode(src[len(prefix):], validate=True)
        assert data == (folder / f"{alt}.png").read_bytes()  # the very picture report/ holds
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert pixels.shape[0] > 100 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
    assert all(url.startswith("data:") for url in page.urls)  # no file, site or font next to it
    assert "script" not in page.tags and "link" not in page.tags
    assert (folder / "report.md").is_file() and not list(folder.glob(".*"))


def test_without_slices_the_page_says_why(tmp_path):
    """A run folder with metrics.csv only: curves inlined, the slices' absence explained."""
    from rich.console import Console

    columns = fit.metric_columns("classes")
    with open(tmp_path / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for epoch in (1, 2):
            writer.writerow([epoch if c == "epoch" else 0.1 * epoch for c in columns])
    report.main(tmp_path, console=Console(quiet=True))
    page = parse(tmp_path / "report" / "report.html")
    assert [alt for alt, _ in page.images] == ["loss", "scores", "lr"]
    assert "patients" not in page.tables
    assert "Not drawn:" in (tmp_path / "report" / "report.html").read_text()
