"""`train evaluate` attacked as issues 20 (class 4) and 22 (frictions 3-5) describe it: outputs
that are its own inputs or existing files, loader workers beyond the limit or that cannot be
started, a `--src` that is not the shards' source, warnings on stdout, help naming an option
evaluate has not.

Each attack runs in a temporary copy and asserts the fixed behaviour (exit 2, one `error:` line
naming the file and the problem, no traceback, the inputs unchanged by sha256, nothing loaded),
beside a control showing the good command still works.
"""

from __future__ import annotations

import errno
import gc
import json
import multiprocessing
import multiprocessing.process
import os
import shutil
from pathlib import Path

import pytest

from .helpers import assert_one_line, run_cli_inprocess, snapshot


@pytest.fixture
def inputs(built_shards, trained, pristine_src, tmp_path):
    """Private copies of the shards, the checkpoint and the source (the attacks target them)."""
    shards = tmp_path / "shards"
    shutil.copytree(built_shards["webdataset"], shards)
    checkpoint = tmp_path / "best.pt"
    shutil.copy(trained / "checkpoints" / "best.pt", checkpoint)
    src = tmp_path / "src"
    shutil.copytree(pristine_src, src)
    return shards, checkpoint, src


def evaluate_args(shards: Path, checkpoint: Path, *extra) -> list:
    return ["evaluate", "--checkpoint", checkpoint, "--shards", shards, "--device", "cpu", "--workers", "0", *extra]


def state(*roots: Path) -> list:
    return [snapshot(r) if r.is_dir() else snapshot(r.parent) for r in roots]


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Any model load fails the test: the refusals below come before any work."""
    from train.apply import inference

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the outputs were checked")

    monkeypatch.setattr(inference, "load_ensemble", refuse)


def test_an_output_that_is_an_input_is_refused_before_any_work(inputs, tmp_path, capsys, nothing_loaded):
    shards, checkpoint, src = inputs
    shard_file = next((shards / "val").glob("*.tar"))
    patient = next(p for p in src.rglob("BraTS20_Training_*") if p.is_dir())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "link.json").symlink_to(checkpoint)  # reaches the checkpoint through a link
    (outside / "hard.csv").hardlink_to(shard_file)
    attacks = {
        "manifest": (["--json", shards / "manifest.json", "--csv", tmp_path / "p.csv"], "manifest"),
        "checkpoint as --csv": (["--json", tmp_path / "e.json", "--csv", checkpoint], "--checkpoint"),
        "a shard file": (["--csv", shard_file], "shard file"),
        "a link to the checkpoint": (["--json", outside / "link.json", "--csv", tmp_path / "p.csv"], "--checkpoint"),
        "a hard link to a shard": (["--csv", outside / "hard.csv"], "shard file"),
        "a source file": (["--src", src, "--csv", next(patient.glob("*_seg.nii"))], "source"),
        "inside --src": (["--src", src, "--json", patient / "eval.json"], "inside --src"),
        "the shards folder": (["--json", shards], "folder"),
    }
    before = state(shards, checkpoint, src)
    for name, (extra, words) in attacks.items():
        for overwrite in ([], ["--overwrite"]):  # an input is never replaced, --overwrite or not
            code, out, err = run_cli_inprocess("train", evaluate_args(shards, checkpoint, *extra, *overwrite), capsys)
            assert_one_line(code, err, words, "never writes|folder"), name
    assert state(shards, checkpoint, src) == before
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "p.csv").exists()


def test_existing_outputs_are_replaced_only_with_overwrite(inputs, tmp_path, capsys):
    shards, checkpoint, _ = inputs
    json_path = tmp_path / "eval.json"
    derived = tmp_path / "eval_patients.csv"  # the CSV --json writes beside itself
    derived.write_text("my own table\n")
    args = evaluate_args(shards, checkpoint, "--json", json_path)
    code, out, err = run_cli_inprocess("train", args, capsys)
    assert_one_line(code, err, str(derived), "exists already", "--overwrite")
    assert derived.read_text() == "my own table\n" and not json_path.exists()

    json_path.write_text("{}")
    derived.unlink()
    code, out, err = run_cli_inprocess("train", args, capsys)
    assert_one_line(code, err, str(json_path), "exists already")
    assert json_path.read_text() == "{}" and not derived.exists()

    code, out, err = run_cli_inprocess("train", [*args, "--overwrite"], capsys)  # control
    assert code == 0, err
    assert json.loads(json_path.read_text())["split"] == "val"
    assert derived.read_text().startswith("patient,grid,")

    code, out, err = run_cli_inprocess("train", evaluate_args(shards, checkpoint, "--json", tmp_path / "same.csv",
                                                              "--csv", tmp_path / "same.csv"), capsys)
    assert_one_line(code, err, "same.csv", "also the --json output")


def test_workers_are_held_to_train_runs_limit(inputs, tmp_path, capsys, monkeypatch):
    shards, checkpoint, _ = inputs
    before = set(multiprocessing.active_children())
    code, _, err = run_cli_inprocess("train", [*evaluate_args(shards, checkpoint), "--workers", "100"], capsys)
    assert_one_line(code, err, "--workers", "100 is above the limit 64", "BRATS_SHARDS_MAX_WORKERS")
    assert set(multiprocessing.active_children()) == before  # refused before a process was started
    monkeypatch.setenv("BRATS_SHARDS_MAX_WORKERS", "1")
    code, _, err = run_cli_inprocess("train", [*evaluate_args(shards, checkpoint), "--workers", "2"], capsys)
    assert_one_line(code, err, "--workers", "above the limit 1")
    code, out, err = run_cli_inprocess("train", [*evaluate_args(shards, checkpoint), "--workers", "1"], capsys)
    assert code == 0 and "mean Dice over WT/TC/ET" in out, err  # control: within the limit


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_workers_that_cannot_be_started_are_one_line_and_none_is_left_running(inputs, capsys, monkeypatch):
    """As under a process limit (RLIMIT_NPROC, which root ignores, so the refusal is injected):
    the third worker's start fails with EAGAIN. The two started ones ignore SIGTERM, so any left
    alive would hold the interpreter's exit forever; torch's half-built loader iterator, when
    collected, must not print an ignored exception after the one line."""
    shards, checkpoint, _ = inputs
    start = multiprocessing.process.BaseProcess.start
    started = []

    def limited_start(self):
        if len(started) == 2:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        start(self)
        started.append(self)

    before = set(multiprocessing.active_children())
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", limited_start)
    code, _, err = run_cli_inprocess("train", [*evaluate_args(shards, checkpoint), "--workers", "3"], capsys)
    assert_one_line(code, err, "--workers 3", "cannot be started", os.strerror(errno.EAGAIN), "fewer --workers")
    assert len(started) == 2 and not any(p.is_alive() for p in started)
    assert set(multiprocessing.active_children()) == before
    gc.collect()  # the half-built iterator goes now, inside this test
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    code, out, err = run_cli_inprocess("train", [*evaluate_args(shards, checkpoint), "--workers", "2"], capsys)
    assert code == 0 and "mean Dice over WT/TC/ET" in out, err  # control: the same command with workers it can start


def test_a_src_that_is_not_the_shards_source_is_warned_on_stderr_and_named_in_the_headline(inputs, tmp_path,
                                                                                          capsys):
    from etl.synth import synthesize

    from .conftest import PATIENTS, SHAPE

    shards, checkpoint, src = inputs
    other = tmp_path / "other"
    synthesize(other, patients=PATIENTS, layout="brats2020", shape=SHAPE, seed=1)  # other data, the same patient ids
    assert sorted(p.name for p in other.rglob("*_seg.nii")) == sorted(p.name for p in src.rglob("*_seg.nii"))
    for source, matches in ((src, True), (other, False)):
        json_path = tmp_path / f"{source.name}.json"
        code, out, err = run_cli_inprocess("train", evaluate_args(shards, checkpoint, "--src", source,
                                                                  "--json", json_path), capsys)
        assert code == 0, err
        assert "warning" not in out.lower()  # warnings go to stderr, the tables and headline to stdout
        saved = json.loads(json_path.read_text())
        headline = [line for line in out.splitlines() if line.startswith("mean Dice over WT/TC/ET")]
        assert len(headline) == 1 and saved["headline"] == headline[0]
        assert saved["native_grid"]["source"]["match"] is matches
        flagged = "is not the source these shards were built from" in err
        assert flagged is (not matches), err
        assert ("NOT the source the shards were built from" in headline[0]) is (not matches)
        if not matches:
            assert str(other) in err and any("--src" in w for w in saved["warnings"])


def test_evaluate_help_names_only_its_own_options(capsys, monkeypatch):
    from tests.cli_help import render_help
    from train.cli import app

    text = render_help(app, ["evaluate"], capsys, monkeypatch)
    assert "--resume" not in text  # evaluate has no --resume
    assert "--overwrite" in text and "BRATS_SHARDS_MAX_WORKERS" in text
    assert "--resume" in render_help(app, ["run"], capsys, monkeypatch)  # control: train run's help still says it
