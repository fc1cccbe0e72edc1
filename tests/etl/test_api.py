"""`etl.api`: `synth` and `build_shards` return what the commands print, build what they build,
raise their one-line errors as exceptions (never SystemExit) and print nothing unless asked."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from etl import api
from etl.cli import app
from shards_spec.errors import ToolError, run_cli
from shards_spec.manifest import parse

SHAPE = (48, 48, 24)
SPLIT = "train=0.5,val=0.5"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return api.synth(tmp_path_factory.mktemp("api") / "src", patients=4, shape=SHAPE).out


def cli(*argv):
    return CliRunner().invoke(app, [str(a) for a in argv])


def test_synth_reports_what_it_wrote_and_adds_only_what_is_missing(tmp_path, capfd):
    made = api.synth(tmp_path / "s", patients=2, shape=SHAPE, seed=3)
    assert (made.patients, made.added, made.shape) == (2, 2, SHAPE)
    assert len(list((tmp_path / "s" / "MICCAI_BraTS2020_TrainingData").glob("BraTS20_Training_*"))) == 2
    more = api.synth(tmp_path / "s", patients=3, shape=SHAPE, seed=3)
    assert (more.patients, more.added) == (3, 1)
    assert api.synth(tmp_path / "s", patients=3, shape=SHAPE, seed=3).added == 0
    assert capfd.readouterr().err == ""
    api.synth(tmp_path / "t", patients=1, shape=SHAPE, progress=True)  # control: asked for, a progress line
    assert "synthesising" in capfd.readouterr().err


def test_build_shards_builds_what_the_cli_builds(src, tmp_path, capfd):
    capfd.readouterr()
    summary = api.build_shards(src, tmp_path / "api", size=32, channels="t1ce,flair", split=SPLIT, workers=0)
    assert capfd.readouterr() == ("", "")  # nothing printed
    assert summary.action == "built" and summary.shards_built == 4 and summary.content["channels"] == ["t1ce", "flair"]
    result = cli("build-shards", "--src", src, "--out", tmp_path / "cli", "--size", 32, "--modalities", "t1ce,flair",
                 "--split", SPLIT, "--workers", 0)
    assert result.exit_code == 0, result.output
    built = parse((tmp_path / "cli" / "manifest.json").read_bytes())
    assert built.digest == summary.digest and built.content == summary.content
    again = api.build_shards(src, tmp_path / "api", size=32, channels=["t1ce", "flair"], split=SPLIT, workers=0)
    assert again.action == "up to date" and again.digest == summary.digest


def test_errors_are_the_commands_lines_as_exceptions(src, tmp_path, capsys):
    with pytest.raises(ToolError) as raised:
        api.build_shards(src, tmp_path / "o", size=0, workers=0)
    with pytest.raises(SystemExit) as exited:
        run_cli(app, [str(a) for a in ("build-shards", "--src", src, "--out", tmp_path / "o", "--size", 0)])
    assert exited.value.code == 2 and capsys.readouterr().err == f"error: {raised.value}\n"
    assert str(raised.value) == "--size must be between 1 and 4096, got 0"
    with pytest.raises(ToolError, match="does not exist"):
        api.build_shards(tmp_path / "missing", tmp_path / "o", workers=0)
    with pytest.raises(ToolError, match="--layout must be one of"):
        api.synth(tmp_path / "s", layout="brats1999")
    with pytest.raises(TypeError, match="unknown option.*sise.*the options are"):
        api.build_shards(src, tmp_path / "o", sise=32)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
