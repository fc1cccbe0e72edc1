"""Measured gains live in one place, the README's Quality section (issue 22): `--tta` help said
+0.002 while the README said +0.010, `--min-et-voxels` help "no change" against "+0.25 ET". The
help of these options says what they do and points to the README instead of quoting a figure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from train import cli

README = Path(__file__).resolve().parents[2] / "README.md"
COMMANDS = typer.main.get_command(cli.app).commands  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("option", ["--tta", "--min-et-voxels"])
def test_inference_option_help_points_to_the_readme_and_quotes_no_figure(command, option):
    (param,) = [p for p in COMMANDS[command].params if option in p.opts]
    assert "README, Quality" in param.help, param.help
    assert not re.search(r"\d\.\d|Measured", param.help), param.help  # a Dice figure would drift from the README
    assert "\n## Quality\n" in README.read_text()  # the section it points to


def test_no_option_of_any_train_command_quotes_a_measured_gain():
    """A signed Dice figure (+0.146, -0.105) belongs in the README only."""
    for name, command in COMMANDS.items():
        for param in command.params:
            assert not re.search(r"[+\-−]0\.\d\d", param.help or ""), (name, param.opts, param.help)
