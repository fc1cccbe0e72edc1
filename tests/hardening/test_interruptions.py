"""Interruptions: nothing is lost and nothing half-written is taken for complete.

- `etl build-shards` SIGKILLed after N shards (a hook, not a timer), then re-run: the shards are
  byte-identical to an uninterrupted build of the same input and options;
- one Dask worker process SIGKILLed mid-run (after writing its shard, before returning): Dask
  reruns the task elsewhere and the build completes with the same bytes;
- `train run` SIGKILLed mid-epoch, then `--resume`: the final weights equal an uninterrupted run's
  (CPU, one thread, torch.equal on every tensor of the model state);
- a write refused by the OS (RLIMIT_FSIZE: "File too large", as a full disk would refuse it)
  ends in one line naming the file, leaves no file `etl verify` accepts as complete, and the same
  command finishes the build once the limit is gone.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from .conftest import BUILD_ARGS
from .helpers import assert_one_line, run_cli_inprocess, run_subprocess


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Every file but the manifest (whose provenance holds a time) and the plan."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json",)}


def content(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["content"]


def _assert_same_build(out: Path, reference: Path) -> None:
    assert shard_bytes(out) == shard_bytes(reference)
    assert content(out) == content(reference)


def _unfinished(out: Path, capsys) -> None:
    code, _, err = run_cli_inprocess("etl", ["verify", out], capsys)
    assert_one_line(code, err, "did not finish")


@pytest.mark.parametrize("fmt", ["webdataset", pytest.param("zarr", marks=pytest.mark.slow)])
def test_etl_sigkilled_after_a_shard_then_rerun_gives_identical_shards(pristine_src, built_shards, tmp_path, capsys,
                                                                       fmt):
    out = tmp_path / "out"
    args = ["build-shards", "--src", pristine_src, "--out", out, *BUILD_ARGS, "--format", fmt]
    killed = run_subprocess("etl", args, env={"ETL_FAULT_AFTER_SHARDS": "1", "ETL_FAULT_KILL": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "plan.json").exists() and not (out / "manifest.json").exists()
    _unfinished(out, capsys)
    code, _, err = run_cli_inprocess("etl", args, capsys)
    assert code == 0, err
    assert "keeping 1 complete shard(s)" in err
    _assert_same_build(out, built_shards[fmt])


@pytest.mark.slow
def test_dask_worker_sigkilled_mid_run_still_gives_identical_shards(pristine_src, built_shards, tmp_path, capsys):
    out = tmp_path / "out"
    marker = tmp_path / "worker-killed"
    args = ["build-shards", "--src", pristine_src, "--out", out, *[a for a in BUILD_ARGS], "--workers", "2"]
    args = [a for i, a in enumerate(args) if not (a == "--workers" and args[i + 1] == "0")
            and not (a == "0" and args[i - 1] == "--workers")]
    run = run_subprocess("etl", args, env={"ETL_FAULT_KILL_WORKER": str(marker)})
    assert marker.exists(), run.stderr  # a worker did die
    if run.returncode != 0:  # Dask gave the task up: the same command finishes the build
        assert "Traceback" not in run.stderr, run.stderr
        code, _, err = run_cli_inprocess("etl", [*args[:-2], "--workers", "0"], capsys)
        assert code == 0, err
    _assert_same_build(out, built_shards["webdataset"])


LIMIT = 8192


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_write_refused_by_the_os_is_one_line_and_never_looks_complete(pristine_src, built_shards, tmp_path, capsys,
                                                                      fmt):
    out = tmp_path / "out"
    args = ["build-shards", "--src", pristine_src, "--out", out, *BUILD_ARGS, "--format", fmt]
    limited = run_subprocess("etl", args, preexec_fn=_limit_file_size)
    line = assert_one_line(limited.returncode, limited.stderr, "File too large", str(out))
    assert "EFBIG" in line
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*.partial")], sorted(out.rglob("*"))
    _unfinished(out, capsys)
    code, _, err = run_cli_inprocess("etl", args, capsys)
    assert code == 0, err
    _assert_same_build(out, built_shards[fmt])


# ------------------------------------------------------------------------------- the trainer

TRAIN = {"variant": "v2", "epochs": 2, "batch_size": 4, "base": 4, "depth": 2, "workers": 1, "device": "cpu",
         "shuffle_buffer": 8, "report": False, "seed": 3}

KILLED_RUN = """
import os, signal, sys
from train import fit

def kill(epoch, step, stop):
    if epoch == 1 and step == 2:
        os.kill(os.getpid(), signal.SIGKILL)

fit.run(dict({train}, shards=sys.argv[1], out=sys.argv[2]), hooks=fit.Hooks(after_step=kill))
"""


def _cli_args(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag if value is not False else "--no-" + key] if isinstance(value, bool) else [flag, str(value)]
    return args


@pytest.mark.slow
def test_trainer_sigkilled_mid_epoch_then_resume_gives_the_uninterrupted_weights(built_shards, tmp_path):
    import subprocess

    shards = built_shards["webdataset"]
    whole = run_subprocess("train", ["run", "--shards", shards, "--out", tmp_path / "whole", *_cli_args(TRAIN)])
    assert whole.returncode == 0, whole.stderr

    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(train=repr(TRAIN)), str(shards),
                             str(tmp_path / "cut")], capture_output=True, text=True, timeout=240,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1  # the second epoch died after 3 steps: nothing of it was written
    resumed = run_subprocess("train", ["run", "--out", tmp_path / "cut", "--resume"])
    assert resumed.returncode == 0, resumed.stderr

    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model_state"].keys() == b["model_state"].keys()
    for name, tensor in a["model_state"].items():
        assert torch.equal(tensor, b["model_state"][name]), name
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[1:] != []
    strip = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]  # noqa: E731 (seconds differ)
    assert strip((tmp_path / "whole" / "metrics.csv").read_text()) == strip((tmp_path / "cut" / "metrics.csv").read_text())


@pytest.mark.slow
def test_trainer_write_refused_by_the_os_is_one_line(built_shards, trained, tmp_path):
    """A checkpoint that cannot be written: one line naming it; the previous last.pt stays whole."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    limit = len(before) // 2

    def small():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = run_subprocess("train", ["run", "--out", run_dir, "--resume", "--epochs", "2"], preexec_fn=small)
    assert_one_line(run.returncode, run.stderr, "File too large", "last.pt")
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert not [p for p in run_dir.rglob("*tmp*")], sorted(run_dir.rglob("*"))
