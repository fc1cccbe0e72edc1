"""`etl`'s command-line conventions (issue 14, items 8 and 9): --help in 80 columns with whole
descriptions and examples that are valid commands, on/off options both ways, --version, shell
completion, and tables whose rows stay whole in a narrow window or a log file."""

from __future__ import annotations

import importlib.metadata as md
import re

import dask
import numpy
import pytest
import typer.main
import zarr

from etl.cli import app
from tests.cli_help import check_help_page, check_toggles, complete, examples, parse_example, render_help, toggles
from tests.helpers.etl_runs import build, run_etl

GROUP = typer.main.get_command(app)
COMMANDS = list(GROUP.commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("argv", [[], *[[name] for name in COMMANDS]], ids=lambda a: " ".join(a) or "etl")
def test_help_fits_80_columns_with_nothing_cut(argv, capsys, monkeypatch):
    text = render_help(app, argv, capsys, monkeypatch)
    command = GROUP if not argv else GROUP.commands[argv[0]]  # type: ignore[attr-defined]
    check_help_page(app, text, command)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_example_is_a_whole_command_that_parses(name, capsys, monkeypatch):
    text = render_help(app, [name], capsys, monkeypatch)
    commands = examples(text)
    assert commands, f"etl {name} --help shows no example"
    for line in commands:
        parsed_name, params = parse_example(app, "etl", line)
        assert parsed_name == name and params


@pytest.mark.parametrize("name", COMMANDS)
def test_on_off_options_are_shown_and_parsed_both_ways(name, capsys, monkeypatch):
    command = GROUP.commands[name]  # type: ignore[attr-defined]
    text = render_help(app, [name], capsys, monkeypatch)
    check_toggles("etl", name, command, text)


def test_build_shards_has_its_three_switches():
    names = {o.name for o in toggles(GROUP.commands["build-shards"])}  # type: ignore[attr-defined]
    assert {"keep_empty", "skip_bad", "overwrite"} <= names


def test_version_names_the_distribution_and_its_libraries(capsys):
    code, out, _ = run_etl(["--version"], capsys)
    assert code == 0
    line = out.strip()
    assert line.startswith(f"etl {md.version('brats-shards')} ") and len(out.strip().splitlines()) == 1
    for name, module in (("numpy", numpy), ("dask", dask), ("zarr", zarr)):
        assert f"{name} {module.__version__}" in line


@pytest.mark.slow
def test_shell_completion_completes_commands_and_options():
    assert complete("etl", "etl build-shards --ove") == ["--overwrite"]
    assert complete("etl", "etl bu") == ["build-shards"]


def _row(text: str, first: str) -> list[str]:
    """The cells of the table row that starts with `first` (box-drawing separators)."""
    lines = [line for line in text.splitlines() if re.match(rf"^[│|]\s*{re.escape(first)}\s*[│|]", line)]
    assert len(lines) == 1, text
    return [cell.strip() for cell in re.split(r"[│|]", lines[0])[1:-1]]


def test_tables_keep_whole_rows_in_a_narrow_window(source_factory, tmp_path, capsys, monkeypatch):  # noqa: F811
    """`etl inspect` and the build summary at 40 columns (rich reads COLUMNS; not a terminal here,
    as in a log file): each row is one line holding every number of the manifest."""
    out = tmp_path / "shards"
    manifest = build(source_factory(), out, capsys)
    monkeypatch.setenv("COLUMNS", "40")
    code, text, err = run_etl(["inspect", out], capsys)
    assert code == 0, err
    for name, split in manifest["content"]["splits"].items():
        splits_table, balance_table = text.split("class balance")
        cells = _row(splits_table, name)
        assert cells[1:5] == [str(split["records"]), str(split["shards"]), str(split["slices"]),
                              str(split["tumour_slices"])], cells
        balance = _row(balance_table, name)  # background, 3 classes, 3 tumour shares
        assert len(balance) == 8 and all(re.fullmatch(r"\d+\.\d+", c) for c in balance[1:]), balance
    code, text, err = run_etl(["build-shards", "--src", source_factory(), "--out", tmp_path / "again",
                               "--workers", "0", "--size", "32", "--split", "train=0.5,val=0.5"], capsys)
    assert code == 0, err
    for name, split in manifest["content"]["splits"].items():
        assert _row(text, name)[1:4] == [str(split["records"]), str(split["shards"]), str(split["slices"])]
