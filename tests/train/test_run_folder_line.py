"""`train run` says where it writes before it trains (issue 22): without `--out` the run folder is a
new `runs/<variant>-<timestamp>`, which only `--help` said; a resumed run says it continues there."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from tests.helpers.train_runs import build, options
from train import fit


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("shards"), "a", {"p1": 4, "p2": 4, "p3": 3},
                 {"train": ["p1", "p2"], "val": ["p3"]})


def printed(overrides: dict, resume: bool = False) -> list[str]:
    text = io.StringIO()
    result = fit.run(overrides, resume=resume, hooks=fit.Hooks(console=Console(file=text, soft_wrap=True)))
    assert result.exit_code == 0, text.getvalue()
    return text.getvalue().splitlines()


def test_the_first_line_names_the_run_folder_also_when_out_is_not_given(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = options(shards, "unused", epochs=1)
    del overrides["out"]
    lines = printed(overrides)
    assert lines[0].startswith("run folder runs/v1-"), lines
    folder = Path(lines[0].removeprefix("run folder "))
    assert [p.relative_to(tmp_path) for p in (tmp_path / "runs").iterdir()] == [folder]
    assert (folder / "config.json").is_file() and (folder / "checkpoints" / "last.pt").is_file()

    lines = printed(options(shards, folder, epochs=2), resume=True)  # the control: --out given, resumed
    assert lines[0] == f"run folder {folder} (continuing after epoch 1)", lines
