"""Measured gains live in one place, docs/quality.md (issue 22, when it was the README's Quality section;
issue 21 moved it): `--tta` help said +0.002 while the README said +0.010, `--min-et-voxels` help
"no change" against "+0.25 ET". The help of these options says what they do and points to that page
instead of quoting a figure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from train import cli

ROOT = Path(__file__).resolve().parents[2]
QUALITY = ROOT / "docs" / "quality.md"
COMMANDS = typer.main.get_command(cli.app).commands  # type: ignore[attr-defined]


@pytest.mark.parametrize(("command", "option"), [
    ("evaluate", "--tta"), ("evaluate", "--min-et-voxels"), ("predict", "--tta"), ("predict", "--min-et-voxels"),
    ("run", "--context"), ("run", "--deep-supervision"), ("run", "--amp")])
def test_option_help_points_to_the_quality_page_and_quotes_no_figure(command, option):
    (param,) = [p for p in COMMANDS[command].params if option in p.opts]
    assert "docs/quality.md" in param.help, param.help
    assert not re.search(r"\b[01]\.\d\d|Measured", param.help), param.help  # a Dice figure (0.879) would drift


def test_the_page_the_help_points_to_is_the_quality_section_and_the_readme_links_it():
    assert QUALITY.read_text().startswith("# Quality\n")
    assert "\n## Quality\n" in (ROOT / "README.md").read_text()  # the README's short summary
    assert "](docs/quality.md)" in (ROOT / "README.md").read_text()


def test_no_option_of_any_train_command_quotes_a_measured_gain():
    """A signed Dice figure (+0.146, -0.105) belongs in docs/quality.md only."""
    for name, command in COMMANDS.items():
        for param in command.params:
            assert not re.search(r"[+\-−]0\.\d\d", param.help or ""), (name, param.opts, param.help)
