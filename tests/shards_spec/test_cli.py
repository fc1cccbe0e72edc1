"""shards_spec.cli: what both command lines share (tables, version line, command summaries)."""

from __future__ import annotations

import importlib.metadata as md
import io
import platform

import click
from rich.console import Console
from rich.table import Table

from shards_spec.cli import print_table, summary, version_text

CELL = "0.812 ± 0.034 (0.830)"


def _table() -> Table:
    table = Table(title="patient level: mean ± std (median)")
    table.add_column("class / region")
    for name in ("dice", "precision", "recall", "hd95 (mm)"):
        table.add_column(name, justify="right")
    for key in ("NEC/NET", "ED", "ET", "WT", "TC"):
        table.add_row(key, CELL, CELL, CELL, CELL)
    return table


def _console(width: int, terminal: bool = False) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=terminal, color_system=None)


def test_a_table_wider_than_the_window_keeps_every_cell_on_one_line():
    for terminal in (False, True):
        console = _console(60, terminal)
        print_table(console, _table())
        rows = [line for line in console.file.getvalue().splitlines() if line.startswith("│ ")]
        assert len(rows) == 5
        assert all(line.count(CELL) == 4 for line in rows), rows


def test_rich_alone_would_wrap_those_cells():
    """What print_table prevents (so that the test above can fail)."""
    console = _console(60)
    console.print(_table())
    rows = [line for line in console.file.getvalue().splitlines() if line.startswith("│ ")]
    assert not any(line.count(CELL) == 4 for line in rows)


def test_a_table_that_fits_is_printed_as_rich_prints_it():
    wide, plain = _console(200), _console(200)
    print_table(wide, _table())
    plain.print(_table())
    assert wide.file.getvalue() == plain.file.getvalue()


def test_version_text_reads_installed_metadata():
    text = version_text("etl", ("numpy", "no-such-library-here"))
    assert text == (f"etl {md.version('brats-shards')} (brats-shards; numpy {md.version('numpy')}, "
                    f"no-such-library-here not installed; Python {platform.python_version()})")


def test_summary_is_the_whole_first_paragraph():
    command = click.Command("c", help="Show what a shard folder holds: splits, patients, slices,\n"
                                      "class balance, provenance.\n\nReads the manifest only.")
    assert summary(command) == "Show what a shard folder holds: splits, patients, slices, class balance, provenance."
    assert summary(click.Command("c", short_help="Short.", help="Long.")) == "Short."
