"""`train report`: pictures and report.md of a run, written by `train run` at its end and by the CLI.

Each PNG must exist, carry the PNG signature and decode with matplotlib; report.md embeds them
with the metrics table; the slice picture shows the best, median and worst validation patients.
"""

from __future__ import annotations

import csv

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from tests.helpers.predict import make_shards, make_source, manifest_of, run_cli
from train import fit
from train.reporting import report

torch.set_num_threads(1)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVES = ("loss.png", "scores.png", "lr.png")


def quiet_console():
    from rich.console import Console

    return Console(quiet=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`train run` with its report on (the trainer calls train.reporting.report.main at the end): 5 patients,
    3 of them in val, so the slice picture has a best, a median and a worst patient."""
    root = tmp_path_factory.mktemp("report")
    src = make_source(root / "src", "brats2020", patients=5)
    shards = make_shards(src, root / "shards", size=32, split="train=0.2,val=0.8")
    assert len(manifest_of(shards).patients_of("val")) == 3
    out = root / "run"
    fit.run(dict(shards=str(shards), variant="v1", target="classes", stem=1, out=str(out), epochs=2, batch_size=8, workers=0, base=4, depth=2,
                 lr=0.01, seed=0, report=True), hooks=fit.Hooks(console=quiet_console()))
    return out


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image[..., :3]) > 0  # not a blank canvas


@pytest.mark.slow
def test_train_run_writes_the_report(run_dir):
    folder = run_dir / "report"
    for name in (*CURVES, "slices.png"):
        assert_png(folder / name)
    text = (folder / "report.md").read_text()
    for name in (*CURVES, "slices.png"):
        assert f"({name})" in text
    assert "| 2 | last" in text and "Dice NEC/NET" in text and "TP/FP/FN summed" in text
    assert "split `val`" in text and "3 patient(s)" in text
    assert not list(folder.glob(".*")), "temporary files left behind"


def test_slices_are_best_median_worst(run_dir):
    shown, summary = report.choose_slices(run_dir, "cpu", 16, quiet_console())
    assert [s.role for s in shown] == ["best", "median", "worst"]
    assert shown[0].dice >= shown[1].dice >= shown[2].dice
    assert len({s.patient for s in shown}) == 3 and summary["patients"] == 3
    for s in shown:
        assert s.image.shape == s.truth.shape == s.pred.shape == (32, 32)
        assert s.truth.any()  # the slice with the most tumour
        assert s.channel == "flair"


@pytest.mark.slow
def test_cli_rewrites_the_report(run_dir, capsys):
    (run_dir / "report" / "lr.png").unlink()
    code, _, err = run_cli(["report", run_dir], capsys)
    assert code == 0, err
    assert_png(run_dir / "report" / "lr.png")


def test_regions_header_and_no_checkpoint(tmp_path):
    """Curves from a regions run's metrics.csv alone; the slice picture is left out with the reason."""
    columns = fit.metric_columns("regions")
    assert "dice_WT" in columns
    with open(tmp_path / "metrics.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for epoch in (1, 2, 3):
            values = {c: 0.1 * epoch for c in columns}
            values.update(epoch=epoch, lr=1e-3 / epoch, dice_TC=float("nan"))
            writer.writerow([values[c] for c in columns])
    path = report.main(tmp_path, console=quiet_console())
    for name in CURVES:
        assert_png(tmp_path / "report" / name)
    assert not (tmp_path / "report" / "slices.png").exists()
    text = path.read_text()
    assert "Dice WT" in text and "Not drawn:" in text and "config.json" in text


def test_not_a_run_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["report", tmp_path], capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "metrics.csv" in lines[0]


def _metrics_only_run(folder, epochs):
    folder.mkdir()
    columns = fit.metric_columns("classes")
    with open(folder / "metrics.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for epoch in epochs:
            writer.writerow([epoch if c == "epoch" else 0.1 for c in columns])
    return folder


def _heading_text(markdown: str) -> str:
    """The text a Markdown renderer shows for the first heading (markdown-it, rich's parser)."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt().parse(markdown)
    inline = tokens[[t.type for t in tokens].index("heading_open") + 1]
    assert all(child.type in ("text", "softbreak") for child in inline.children), inline.children
    return "".join(child.content for child in inline.children)


@pytest.mark.slow
def test_a_budget_stop_is_reported_as_the_fractional_epoch_it_is(tmp_path):
    """metrics.csv rows 1..4 then 4.301 (a time-budget stop inside epoch 5): not "5 epoch(s)"."""
    run = _metrics_only_run(tmp_path / "stopped", [1, 2, 3, 4, 4.301])
    text = report.main(run, console=quiet_console()).read_text()
    assert "4.301 epoch(s) trained (stopped by the time budget inside epoch 5)" in text
    assert "5 epoch" not in text and "| 4.301 | last" in text
    assert "4.301 epoch(s) trained" in (run / "report" / "report.html").read_text()
    whole = _metrics_only_run(tmp_path / "whole", [1, 2, 3])  # control: whole epochs
    text = report.main(whole, console=quiet_console()).read_text()
    assert "3 epoch(s) trained." in text and "| 3 | last" in text and "time budget" not in text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["run_*bold* <img src=x onerror=alert(1)>",
                                  "a [link](x.html) `code` #1 &amp; ~~s~~ \\*", "v2-20250101"])
def test_the_heading_shows_the_folder_name_literally(tmp_path, name):
    run = _metrics_only_run(tmp_path / name, [1])
    text = report.main(run, console=quiet_console()).read_text()
    assert _heading_text(text) == f"Run report: {name}"
    from markdown_it import MarkdownIt

    assert text.splitlines()[0].startswith("# Run report: ")
    rendered = MarkdownIt().render(text)
    assert rendered.count("<img ") == 3 and "<a " not in rendered  # the curves only: no HTML or link from the name
