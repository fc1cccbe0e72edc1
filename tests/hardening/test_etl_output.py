"""What `etl build-shards` and `etl synth` may do to a folder that already holds something
(issue 12): nothing of the user's is lost, and nothing of a previous build is lost before the
new one is complete.

- class 1: `--overwrite` replaces only what a previous build wrote; any other file makes it
  refuse, naming it, with every byte left as it was (also with an unreadable plan or manifest,
  and for a crashed, partial zarr build);
- class 9: one writer per out folder: a second one is refused in one line naming the holder; a
  lock left by a process that died is taken over;
- class 12: an interrupted `--overwrite` (Ctrl-C, or `kill -9` twice in a row) never loses the
  previous build: Ctrl-C puts it back at once, the next `build-shards` after a kill puts it back
  (or resumes the same command, dropping the previous build only when the new one is written);
- `etl synth --out` over an existing dataset adds only what keeps it one dataset.

Interruptions land where they matter through the fault hooks (`etl/faults.py`), not timers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shards_spec.lock import LOCK_NAME

from .conftest import BUILD_ARGS
from .helpers import assert_one_line, run_cli_inprocess, run_subprocess, snapshot

STASH = ".build-previous"


def _args(src: Path, out: Path, *extra) -> list:
    return ["build-shards", "--src", src, "--out", out, *BUILD_ARGS, *extra]


def _content(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["content"]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


@pytest.fixture
def previous(built_shards, tmp_path):
    """`previous(fmt)`: a private copy of a complete build (size 16) and its snapshot."""

    def make(fmt: str = "webdataset") -> tuple[Path, dict]:
        out = tmp_path / f"shards-{fmt}"
        shutil.copytree(built_shards[fmt], out)
        return out, snapshot(out)

    return make


# ------------------------------------------------------------------------------ class 1


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_overwrite_refuses_files_no_build_wrote_and_keeps_every_byte(pristine_src, previous, capsys, fmt):
    out, _ = previous(fmt)
    (out / "results.csv").write_text("run,dice\nv1,0.81\n")
    (out / "thesis").mkdir()
    (out / "thesis" / "chapter1.tex").write_text("\\chapter{Results}\n")
    (out / "train" / "notes.txt").write_text("beside the shards")
    before = snapshot(out)
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, out, "--size", "8", "--overwrite"), capsys)
    line = assert_one_line(code, err, str(out), "--overwrite", "results.csv", "thesis", "train/notes.txt")
    assert "3 other file(s)" in line
    assert snapshot(out) == before

    for foreign in ("results.csv", "thesis", "train/notes.txt"):
        path = out / foreign
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, out, "--size", "8", "--overwrite"), capsys)
    assert code == 0, err
    assert _content(out)["preprocessing"]["size"] == 8 and not (out / STASH).exists()
    assert run_cli_inprocess("etl", ["verify", out], capsys)[0] == 0


def test_overwrite_with_an_unreadable_plan_and_manifest_still_refuses_foreign_files(pristine_src, tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "plan.json").write_bytes(b"\x00garbage{")
    (out / "manifest.json").write_text("[1, 2")
    (out / "analysis.ipynb").write_text("{}")
    before = snapshot(out)
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, out, "--overwrite"), capsys)
    assert_one_line(code, err, "analysis.ipynb", str(out))
    assert snapshot(out) == before

    (out / "analysis.ipynb").unlink()  # only the tool's own (broken) files: they may be replaced
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, out, "--overwrite"), capsys)
    assert code == 0, err
    assert run_cli_inprocess("etl", ["verify", out], capsys)[0] == 0


@pytest.mark.slow
def test_overwrite_of_a_crashed_partial_zarr_build_knows_its_files(pristine_src, built_shards, tmp_path, capsys):
    """No manifest yet: the plan (through the zarr writer's layout) and the journal say what is ours."""
    out = tmp_path / "shards"
    crashed = run_subprocess("etl", _args(pristine_src, out, "--format", "zarr"),
                             env={"ETL_FAULT_AFTER_SHARDS": "1", "ETL_FAULT_KILL": "1"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert not (out / "manifest.json").exists() and any(out.glob("*/*/image/zarr.json"))
    (out / "train" / "mine.txt").write_text("a user's file inside a split folder")
    before = {k: v for k, v in snapshot(out).items() if k != LOCK_NAME}  # the killed build's lock goes
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, out, "--overwrite"), capsys)
    assert_one_line(code, err, "train/mine.txt")
    assert snapshot(out) == before

    (out / "train" / "mine.txt").unlink()
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, out, "--overwrite"), capsys)
    assert code == 0, err
    assert _shard_bytes(out) == _shard_bytes(built_shards["webdataset"])


# ------------------------------------------------------------------------------ class 9

HOLDER = """
import sys, time
from shards_spec.lock import FolderLock
FolderLock(sys.argv[1], "etl build-shards").acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(pristine_src, built_shards, tmp_path, capsys):
    out = tmp_path / "shards"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli_inprocess("etl", _args(pristine_src, out), capsys)
        assert_one_line(code, err, str(out), "being written by another etl build-shards", f"pid {holder.pid}")
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing of ours was written
        second = run_subprocess("etl", _args(pristine_src, out))  # a real second process, too
        assert_one_line(second.returncode, second.stderr, "being written by another")
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).exists()  # SIGKILL: its lock file stays, but its lock died with it
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, out), capsys)
    assert code == 0, err
    assert "taking over the lock of a build that is no longer running" in err and f"pid {holder.pid}" in err
    assert not (out / LOCK_NAME).exists()
    assert _shard_bytes(out) == _shard_bytes(built_shards["webdataset"])


def test_a_failed_build_into_a_new_folder_leaves_no_folder_and_no_lock(tmp_path, capsys):
    (tmp_path / "empty-src").mkdir()
    (tmp_path / "empty-src" / "readme.txt").write_text("no data here")
    out = tmp_path / "new" / "shards"
    code, _, err = run_cli_inprocess("etl", _args(tmp_path / "empty-src", out), capsys)
    assert_one_line(code, err, "no BraTS data")
    assert not out.exists()


# ------------------------------------------------------------------------------ class 12


@pytest.mark.slow
def test_ctrl_c_during_overwrite_puts_the_previous_build_back_at_once(pristine_src, previous):
    out, before = previous()
    # Ctrl-C must reach the child even when this suite was started with SIGINT ignored (a shell's
    # background job), which every child would inherit: then the build would just finish.
    run = run_subprocess("etl", _args(pristine_src, out, "--size", "8", "--overwrite"),
                         env={"ETL_FAULT_AFTER_SHARDS": "1", "ETL_FAULT_KILL": "INT"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert run.returncode == 130, run.stderr
    assert_one_line(run.returncode, run.stderr, str(out), "interrupted", "the previous build is in place")
    assert snapshot(out) == before


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_prints_only_the_interrupted_line(pristine_src, tmp_path, capsys):
    """A terminal's Ctrl-C reaches the Dask worker processes too: they leave it to the build, so
    no worker traceback comes before the one line, and the same command then finishes the build."""
    out = tmp_path / "shards"
    args = _args(pristine_src, out, "--workers", "2")
    group_ctrl_c = {"ETL_FAULT_AFTER_SHARDS": "1", "ETL_FAULT_KILL": "INT", "ETL_FAULT_KILL_GROUP": "1"}

    def own_group_with_ctrl_c() -> None:  # a group of its own, as a terminal's foreground job
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    run = run_subprocess("etl", args, env=group_ctrl_c, preexec_fn=own_group_with_ctrl_c)
    assert run.returncode == 130, run.stderr
    assert_one_line(run.returncode, run.stderr, str(out), "interrupted", "the same command finishes the build")
    assert "KeyboardInterrupt" not in run.stderr and "distributed." not in run.stderr, run.stderr
    assert not (out / "manifest.json").exists()

    code, _, err = run_cli_inprocess("etl", args, capsys)  # the control: the same command finishes it
    assert code == 0, err
    assert re.search(r"keeping [12] complete shard\(s\) of 3", err), err  # the other worker's may be done too
    assert run_cli_inprocess("etl", ["verify", out], capsys)[0] == 0


@pytest.mark.slow
def test_two_killed_overwrites_in_a_row_never_lose_the_previous_build(pristine_src, previous, capsys):
    out, before = previous()
    previous_files = {k: v for k, v in before.items()}
    for size in ("8", "12"):  # the second --overwrite must not delete the first one's stash
        killed = run_subprocess("etl", _args(pristine_src, out, "--size", size, "--overwrite"),
                                env={"ETL_FAULT_AFTER_SHARDS": "1", "ETL_FAULT_KILL": "1"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert snapshot(out / STASH) == previous_files  # set aside whole, byte for byte
        assert not (out / "manifest.json").exists()
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, out), capsys)  # the previous build's command
    assert code == 0, err
    assert "put back the previous build" in err
    assert snapshot(out) == before


@pytest.mark.slow
def test_the_same_overwrite_after_a_kill_resumes_and_drops_the_previous_build_only_at_the_end(
        pristine_src, previous, tmp_path, capsys):
    out, before = previous()
    args = _args(pristine_src, out, "--size", "8", "--overwrite")
    killed = run_subprocess("etl", args, env={"ETL_FAULT_AFTER_SHARDS": "1", "ETL_FAULT_KILL": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    code, _, err = run_cli_inprocess("etl", args, capsys)
    assert code == 0, err
    assert "resuming the interrupted --overwrite" in err and "keeping 1 complete shard(s)" in err
    assert not (out / STASH).exists() and not (out / ".build-discarded").exists()
    clean = tmp_path / "clean"
    assert run_cli_inprocess("etl", _args(pristine_src, clean, "--size", "8"), capsys)[0] == 0
    assert _shard_bytes(out) == _shard_bytes(clean) and _content(out) == _content(clean)


# ------------------------------------------------------------------------------ etl synth


def _synth(out: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_cli_inprocess("etl", ["synth", "--out", out, "--shape", "32,32,16", *extra], capsys)


@pytest.mark.slow
def test_synth_adds_only_to_its_own_dataset_made_with_the_same_options(tmp_path, capsys):
    out = tmp_path / "data"
    assert _synth(out, capsys, "--patients", "2")[0] == 0
    code, stdout, err = _synth(out, capsys, "--patients", "3")
    assert code == 0, err
    assert "added 1 patient(s) (3 in all)" in stdout
    fresh = tmp_path / "fresh"
    assert _synth(fresh, capsys, "--patients", "3")[0] == 0
    assert snapshot(out) == snapshot(fresh)  # the grown dataset is the 3-patient dataset, CSVs included
    mapping = (out / "MICCAI_BraTS2020_TrainingData" / "name_mapping.csv").read_text().splitlines()
    assert len(mapping) == 1 + 3

    grown = snapshot(out)
    code, _, err = _synth(out, capsys, "--patients", "2")  # fewer: nothing is removed or rewritten
    assert code == 0 and snapshot(out) == grown
    for extra, named in ((["--shape", "32,32,20"], "shape 32,32,16"), (["--layout", "brats2021"], "layout brats2020"),
                         (["--seed", "4"], "seed 0")):
        code, _, err = _synth(out, capsys, "--patients", "4", *extra)
        assert_one_line(code, err, str(out), named)
        assert snapshot(out) == grown


def test_synth_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "draft.tex").write_text("\\section{Data}\n")
    before = snapshot(out)
    code, _, err = _synth(out, capsys, "--patients", "1")
    assert_one_line(code, err, str(out), "not made by etl synth")
    assert snapshot(out) == before
