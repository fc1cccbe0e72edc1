"""The training side attacked as issue 12 describes it: `train predict` writing over its inputs
or over existing files (class 2), two `train run` into one folder and a run into a folder of
someone else's files (class 9), tampered checkpoints that would crash `--resume` or take
gigabytes in `predict`/`evaluate` (class 11), and messages that named the wrong problem.

Each test does the attack in a temporary folder and asserts the fixed behaviour: exit code 2, one
`error:` line naming the file and the problem, no traceback, the user's files unchanged (a
sha256 snapshot), and, where memory is the point, the peak RSS of the real command in a child
process against that of a good run.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

from .helpers import RSS_MARGIN_MB, assert_one_line, run_cli_inprocess, run_measured, snapshot

V1_CHANNELS = ("t1ce", "flair")


def _patient(src: Path, number: int = 1) -> Path:
    return next(p for p in src.rglob(f"BraTS20_Training_{number:03d}") if p.is_dir())


def _file(folder: Path, modality: str) -> Path:
    return folder / f"{folder.name}_{modality}.nii"


def _predict(checkpoint: Path, inputs: list, out: Path, *extra) -> list:
    args = ["predict", "--checkpoint", checkpoint]
    for item in inputs:
        args += ["--input", item]
    return [*args, "--out", out, "--device", "cpu", *extra]


# ------------------------------------------------------------------ class 2: predict's outputs


def _out_is_an_input(case: str, patient: Path, tmp_path: Path) -> tuple[list, Path]:
    """(the --input values, the --out path) of each way an output can reach an input."""
    flair, t1ce = _file(patient, "flair"), _file(patient, "t1ce")
    files = [f"t1ce={t1ce}", f"flair={flair}"]
    if case == "a modality given as NAME=PATH":
        return files, flair
    if case == "the seg given as NAME=PATH":
        return [*files, f"seg={_file(patient, 'seg')}"], _file(patient, "seg")
    if case == "the seg of a patient folder":
        return [patient], _file(patient, "seg")
    if case == "a modality the checkpoint does not use":
        return [patient], _file(patient, "t1")
    if case == "through a symbolic link":
        link = tmp_path / "seg_link.nii"
        link.symlink_to(flair)
        return files, link
    if case == "through a linked folder":
        (tmp_path / "linked").symlink_to(patient)
        return [patient], tmp_path / "linked" / t1ce.name
    if case == "through ..":
        return files, patient / ".." / patient.name / flair.name
    if case == "through a hard link":  # another name of the same file, as a case-insensitive file system gives
        other = tmp_path / "other_name.nii"
        os.link(flair, other)
        return files, other
    raise AssertionError(case)


OUT_IS_INPUT = ["a modality given as NAME=PATH", "the seg given as NAME=PATH", "the seg of a patient folder",
                "a modality the checkpoint does not use", "through a symbolic link", "through a linked folder",
                "through ..", "through a hard link"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "--overwrite"])
@pytest.mark.parametrize("case", OUT_IS_INPUT)
def test_predict_never_writes_over_an_input(trained, fresh_src, tmp_path, capsys, case, overwrite):
    patient = _patient(fresh_src)
    inputs, out = _out_is_an_input(case, patient, tmp_path)
    before = snapshot(fresh_src)
    code, _, err = run_cli_inprocess("train", _predict(trained / "checkpoints" / "best.pt", inputs, out,
                                                       *(["--overwrite"] if overwrite else [])), capsys)
    line = assert_one_line(code, err, out.name, "is the input", "never writes over its inputs")
    assert code == 2 and str(out) in line
    assert snapshot(fresh_src) == before


def test_predict_refuses_another_spelling_on_a_case_insensitive_file_system(trained, fresh_src, tmp_path, capsys):
    probe = tmp_path / "probe"
    probe.write_text("")
    if not (tmp_path / "PROBE").exists():
        pytest.skip("this file system tells letter cases apart (the hard-link case covers the same check)")
    patient = _patient(fresh_src)
    flair = _file(patient, "flair")
    out = flair.with_name(flair.name.upper().replace(".NII", ".nii"))
    before = snapshot(fresh_src)
    code, _, err = run_cli_inprocess("train", _predict(trained / "checkpoints" / "best.pt", [patient], out,
                                                       "--overwrite"), capsys)
    assert_one_line(code, err, "is the input")
    assert snapshot(fresh_src) == before


@pytest.mark.parametrize("which", ["segmentation", "probabilities"])
def test_predict_replaces_an_existing_file_only_with_overwrite(trained, pristine_src, tmp_path, capsys, which):
    import nibabel as nib

    out = tmp_path / "seg.nii.gz"
    taken = out if which == "segmentation" else tmp_path / "seg_probabilities.nii.gz"
    taken.write_text("the user's own file\n")
    args = _predict(trained / "checkpoints" / "best.pt", [_patient(pristine_src)], out, "--probabilities")
    code, _, err = run_cli_inprocess("train", args, capsys)
    assert_one_line(code, err, str(taken), "exists already", "--overwrite")
    assert code == 2 and taken.read_text() == "the user's own file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken.name]  # nothing else written, no temporary left

    code, _, err = run_cli_inprocess("train", [*args, "--overwrite"], capsys)
    assert code == 0, err
    assert nib.load(str(out)).shape == (48, 48, 24) and nib.load(str(taken)).shape[:3] == (48, 48, 24)


def test_predict_folder_of_patients_overwrites_per_file(trained, pristine_src, tmp_path, capsys):
    import nibabel as nib

    out = tmp_path / "segs"
    out.mkdir()
    (out / "BraTS20_Training_002.nii.gz").write_text("an earlier segmentation\n")
    (out / "notes.txt").write_text("the user's notes\n")
    release = pristine_src / "MICCAI_BraTS2020_TrainingData"
    args = _predict(trained / "checkpoints" / "best.pt", [release], out)
    code, _, err = run_cli_inprocess("train", args, capsys)
    assert_one_line(code, err, str(out), "BraTS20_Training_002.nii.gz", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["BraTS20_Training_002.nii.gz", "notes.txt"]
    assert (out / "BraTS20_Training_002.nii.gz").read_text() == "an earlier segmentation\n"

    code, _, err = run_cli_inprocess("train", [*args, "--overwrite"], capsys)
    assert code == 0, err
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == [f"BraTS20_Training_00{i}.nii.gz" for i in (1, 2, 3)]
    assert all(nib.load(str(out / name)).shape == (48, 48, 24) for name in written)
    assert (out / "notes.txt").read_text() == "the user's notes\n"


# ------------------------------------------------------------------ messages that named the wrong problem


@pytest.mark.parametrize("form", ["bare path", "NAME=PATH", "dangling link"])
def test_predict_input_that_does_not_exist_is_said_so(trained, tmp_path, capsys, form):
    missing = tmp_path / "does" / "not" / "exist"
    item = missing if form == "bare path" else f"flair={missing}"
    if form == "dangling link":
        item = tmp_path / "a_flair.nii"
        item.symlink_to(missing)
    code, _, err = run_cli_inprocess("train", _predict(trained / "checkpoints" / "best.pt", [item],
                                                       tmp_path / "seg.nii.gz"), capsys)
    line = assert_one_line(code, err, "does not exist")
    assert code == 2 and str(missing) in line and "modality" not in line


# ------------------------------------------------------------------ class 9: one train run per folder


def _run_args(shards: Path, out: Path, *extra) -> list:
    from .conftest import TRAIN_ARGS

    return ["run", "--shards", shards, "--out", out, *TRAIN_ARGS, *extra]


def test_a_second_train_run_into_the_same_folder_is_refused_while_the_first_runs(built_shards, tmp_path, capsys):
    """The second run starts from inside the first one's training step (a real second FolderLock
    on its own file descriptor, as another process has): refused in one line, and the first run
    ends with its own files only."""
    from train import fit
    from train.training.trainer import Hooks

    shards, out, seen = built_shards["webdataset"], tmp_path / "run", []

    def second_run(epoch, step, stop):
        if not seen:
            seen.append(run_cli_inprocess("train", _run_args(shards, out, "--force"), capsys))

    first = fit.run({"shards": str(shards), "variant": "v1", "out": str(out), "epochs": 1, "batch_size": 4,
                     "base": 4, "depth": 2, "workers": 0, "device": "cpu", "shuffle_buffer": 8, "report": False},
                    hooks=Hooks(after_step=second_run))
    code, _, err = seen[0]
    line = assert_one_line(code, err, str(out), "being written by another train run", f"pid {os.getpid()}")
    assert code == 2 and "--force" not in line
    assert first.exit_code == 0 and first.epochs_done == 1
    from train.runfiles.rundir import read_metrics

    assert [row["epoch"] for row in read_metrics(out / "metrics.csv")[1]] == [1.0]  # one writer's rows
    assert not (out / ".brats-shards.lock").exists()  # released on exit


@pytest.mark.slow
def test_a_killed_run_leaves_a_stale_lock_that_the_next_run_takes_over(built_shards, tmp_path):
    import signal
    import subprocess
    import time

    from .helpers import BIN, run_subprocess

    shards, out = built_shards["webdataset"], tmp_path / "run"
    args = [str(a) for a in _run_args(shards, out)]
    args[args.index("--epochs") + 1] = "100000"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    victim = subprocess.Popen([str(BIN / "train"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)
    lock = out / ".brats-shards.lock"
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and f'"pid": {victim.pid}' in lock.read_text()) and victim.poll() is None:
            assert time.monotonic() < deadline, "the run never took its lock"
            time.sleep(0.05)
        held = run_subprocess("train", [*_run_args(shards, out, "--force")])
        assert_one_line(held.returncode, held.stderr, str(out), "being written by another train run",
                        f"pid {victim.pid}")
    finally:
        victim.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays behind
        victim.wait()
    assert f'"pid": {victim.pid}' in lock.read_text()
    after = run_subprocess("train", [*_run_args(shards, out, "--force")])
    assert after.returncode == 0, after.stderr
    assert f"taking over the lock of a train run that is no longer running (pid {victim.pid}" in after.stderr
    assert not lock.exists()


@pytest.mark.parametrize("force", [False, True], ids=["plain", "--force"])
def test_a_run_into_a_folder_of_other_files_is_refused(built_shards, tmp_path, capsys, force):
    out = tmp_path / "thesis"
    (out / "chapters").mkdir(parents=True)
    (out / "chapters" / "1.tex").write_text("\\chapter{One}\n")
    (out / "results.csv").write_text("a,b\n1,2\n")
    (out / "config.json").write_text('{"my": "own config"}\n')  # not a run's config.json
    before = snapshot(out)
    code, _, err = run_cli_inprocess("train", _run_args(built_shards["webdataset"], out,
                                                        *(["--force"] if force else [])), capsys)
    assert_one_line(code, err, str(out), "not a train run", "chapters/", "config.json", "results.csv",
                    "new or empty folder")
    assert code == 2 and snapshot(out) == before


def test_a_folder_holding_only_a_dead_runs_lock_file_is_empty(built_shards, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".brats-shards.lock").write_text('{"owner": "train run", "pid": 999999, "host": "gone"}')
    code, _, err = run_cli_inprocess("train", _run_args(built_shards["webdataset"], out), capsys)
    assert code == 0, err
    assert "taking over the lock" in err and (out / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_force_over_a_run_replaces_only_the_runs_own_files(trained, built_shards, tmp_path, capsys):
    from train.runfiles import rundir

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    code, _, err = run_cli_inprocess("train", ["report", out], capsys)
    assert code == 0, err
    written = sorted(p.relative_to(out).as_posix() for p in (out / "report").rglob("*") if p.is_file())
    assert written and set(written) <= {f"report/{name}" for name in rundir.REPORT_FILES}  # the list is complete
    (out / "eval.json").write_text('{"mine": true}\n')
    (out / "report" / "notes.md").write_text("my notes\n")
    old_last = (out / "checkpoints" / "last.pt").read_bytes()
    kept = {name: (out / name).read_bytes() for name in ("eval.json", "report/notes.md")}

    code, _, err = run_cli_inprocess("train", _run_args(built_shards["webdataset"], out, "--force"), capsys)
    assert code == 0, err
    assert {name: (out / name).read_bytes() for name in kept} == kept  # the user's files stay
    assert (out / "checkpoints" / "last.pt").read_bytes() != old_last  # the run's own are new ...
    assert not any((out / "report" / name).exists() for name in rundir.REPORT_FILES)  # ... or gone (--no-report)


@pytest.mark.slow
@pytest.mark.parametrize("held", [False, True], ids=["other files", "locked"])
def test_under_torchrun_rank_0_claims_the_folder_and_every_rank_stops_with_its_refusal(built_shards, tmp_path, held):
    """Two ranks: rank 0 alone locks and checks the folder; its refusal reaches rank 1, so both
    exit with the same line instead of rank 1 waiting in a collective."""
    import subprocess

    from shards_spec.lock import FolderLock

    from .helpers import BIN

    out = tmp_path / "run"
    out.mkdir()
    (out / "results.csv").write_text("a,b\n")
    lock = FolderLock(out, "train run")
    if held:  # another run holds it (this process, on its own descriptor)
        (out / "results.csv").unlink()
        lock.acquire()
    try:
        done = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                               str(BIN / "train"), *map(str, _run_args(built_shards["webdataset"], out))],
                              capture_output=True, text=True, timeout=240,
                              env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    finally:
        lock.release()
    words = "being written by another train run" if held else "not a train run"
    # one line per rank (the two ranks write at once, so their lines may run together in the pipe)
    assert done.returncode != 0 and done.stderr.count("error: ") == 2, done.stderr[-3000:]
    assert done.stderr.count(words) == 2 and done.stderr.count(f"{out} ") + done.stderr.count(f"{out}:") >= 2
    assert "train/" not in done.stderr  # torchrun's own traceback of the failed ranks only, none of ours
    assert sorted(p.name for p in out.iterdir()) == ([] if held else ["results.csv"])


# ------------------------------------------------------------------ --resume messages


def test_resume_of_a_missing_run_says_so_without_suggesting_force(tmp_path, capsys):
    missing = tmp_path / "runs" / "never"
    code, _, err = run_cli_inprocess("train", ["run", "--out", missing, "--resume"], capsys)
    line = assert_one_line(code, err, str(missing), "does not exist", "without --resume")
    assert "--force" not in line and not missing.exists()

    other = tmp_path / "folder"
    other.mkdir()
    (other / "notes.txt").write_text("x\n")
    code, _, err = run_cli_inprocess("train", ["run", "--out", other, "--resume"], capsys)
    line = assert_one_line(code, err, str(other), "holds no run", "without --resume")
    assert "--force" not in line


# ------------------------------------------------------------------ class 11: tampered checkpoints


def _tampered_run(trained: Path, tmp_path: Path, tamper) -> Path:
    """A copy of the trained run whose last.pt was changed by `tamper(payload)` and saved as an
    attacker would (plain torch.save, no checks of ours)."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    last = run / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    tamper(payload)
    torch.save(payload, last)
    return run


def _first_weight(payload: dict) -> str:
    return next(k for k in payload["model_state"] if k.endswith("weight"))


def _wrong_weight_shape(p):
    key = _first_weight(p)
    p["model_state"][key] = p["model_state"][key][:1].clone()


def _weight_missing(p):
    del p["model_state"][_first_weight(p)]


def _optimizer_removed(p):
    del p["optimizer"]


def _optimizer_moment_of_another_shape(p):
    import torch

    entry = p["optimizer"]["state"][0]
    entry["exp_avg"] = torch.zeros(3, 3)


def _optimizer_state_emptied(p):
    p["optimizer"] = {"state": {}, "param_groups": []}


def _learning_rate_not_a_number(p):
    p["optimizer"]["param_groups"][0]["lr"] = "fast"


def _torch_rng_truncated(p):
    p["rng"]["torch"] = p["rng"]["torch"][:100].clone()


def _numpy_rng_short(p):
    p["rng"]["numpy"]["keys"] = p["rng"]["numpy"]["keys"][:10].clone()


def _python_rng_index_out_of_range(p):
    p["rng"]["python"]["internal"][624] = 10**6


def _rng_removed(p):
    del p["rng"]


def _augmenter_rng_of_floats(p):
    import torch

    p["rng"]["augmenter"] = torch.zeros(5056)


def _scaler_scale_text(p):
    p["scaler"] = {"scale": "big", "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 0}


def _history_not_rows(p):
    p["history"] = "nothing"


def _epoch_negative(p):
    p["epoch"] = -3


def _batch_size_huge(p):
    p["config"]["batch_size"] = 10**9


def _shuffle_buffer_huge(p):
    p["config"]["shuffle_buffer"] = 10**12


def _base_400(p):
    p["config"]["base"] = 400
    p["model"]["kwargs"]["base"] = 400


def _model_not_the_configs(p):
    p["config"]["depth"] = 3  # the config would build another model than the weights fit


TAMPERINGS = {  # how the checkpoint was changed -> words the line must hold
    _wrong_weight_shape: "has shape",
    _weight_missing: "do not fit",
    _optimizer_removed: "optimiser",
    _optimizer_moment_of_another_shape: "exp_avg",
    _optimizer_state_emptied: "optimiser",
    _learning_rate_not_a_number: "'lr'|learning rate",
    _torch_rng_truncated: "RNG state 'torch'",
    _numpy_rng_short: "RNG state 'numpy'",
    _python_rng_index_out_of_range: "RNG state 'python'",
    _rng_removed: "RNG state",
    _augmenter_rng_of_floats: "RNG state 'augmenter'",
    _scaler_scale_text: "scaler",
    _history_not_rows: "history",
    _epoch_negative: "epoch",
    _batch_size_huge: "BRATS_SHARDS_MAX_BATCH",
    _shuffle_buffer_huge: "BRATS_SHARDS_MAX_SHUFFLE_BUFFER",
    _base_400: "BRATS_SHARDS_MAX_BASE",
    _model_not_the_configs: "model",
}


@pytest.mark.parametrize("tamper", list(TAMPERINGS), ids=lambda f: f.__name__.strip("_"))
def test_resume_from_a_tampered_checkpoint_is_one_line(trained, tmp_path, capsys, tamper):
    run = _tampered_run(trained, tmp_path, tamper)
    before = snapshot(run)
    code, _, err = run_cli_inprocess("train", ["run", "--out", run, "--resume", "--epochs", "2"], capsys)
    line = assert_one_line(code, err, "last.pt", TAMPERINGS[tamper])
    assert code == 2 and str(run / "checkpoints" / "last.pt") in line
    assert snapshot(run) == before


def test_the_tamperings_are_real(trained):
    """Independent reference: each tampered value makes the step `--resume` takes with it fail
    (torch, numpy, random themselves), so the refusals above guard real tracebacks."""
    import random

    import numpy as np
    import torch

    from train.models import build_model

    payload = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    spec = payload["model"]
    model = build_model(spec["name"], spec["in_channels"], **spec["kwargs"])
    broken = {k: v.clone() for k, v in payload["model_state"].items()}
    _wrong_weight_shape({"model_state": broken})
    with pytest.raises(RuntimeError):
        model.load_state_dict(broken)
    rng = {}
    for tamper in (_torch_rng_truncated, _numpy_rng_short, _python_rng_index_out_of_range):
        p = {"rng": copy.deepcopy(payload["rng"])}
        tamper(p)
        rng[tamper] = p["rng"]
    with pytest.raises(RuntimeError):
        torch.set_rng_state(rng[_torch_rng_truncated]["torch"])
    keys = rng[_numpy_rng_short]["numpy"]["keys"].numpy().astype(np.uint32)
    with pytest.raises((ValueError, IndexError)):
        np.random.set_state(("MT19937", keys, 0, 0, 0.0))
    with pytest.raises(ValueError):
        random.setstate((3, tuple(rng[_python_rng_index_out_of_range]["python"]["internal"].tolist()), None))


# ------------------------------------------------------------------ values that size memory, in predict/evaluate


def _tampered_checkpoint(trained: Path, tmp_path: Path, tamper, name: str = "best.pt") -> Path:
    import torch

    payload = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    tamper(payload)
    path = tmp_path / name
    torch.save(payload, path)
    return path


def _size_30000(p):
    p["preprocessing"]["size"] = 30000


def _base_400_only_described(p):
    p["model"]["kwargs"]["base"] = 400


def _base_200_within_the_limit(p):  # a width the limits allow, with weights of base 4: built on `meta` only
    p["model"]["kwargs"]["base"] = 200


MEMORY_ATTACKS = {_size_30000: "BRATS_SHARDS_MAX_SIZE", _base_400_only_described: "BRATS_SHARDS_MAX_BASE",
                  _base_200_within_the_limit: "do not fit|has shape"}


@pytest.fixture(scope="module")
def good_predict_rss(trained, pristine_src, tmp_path_factory) -> float:
    out = tmp_path_factory.mktemp("good-predict") / "seg.nii.gz"
    code, err, rss = run_measured("train", _predict(trained / "checkpoints" / "best.pt", [_patient(pristine_src)], out))
    assert code == 0, err
    return rss


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("tamper", list(MEMORY_ATTACKS), ids=lambda f: f.__name__.strip("_"))
def test_checkpoint_values_that_size_memory_are_refused_before_allocating(trained, pristine_src, built_shards,
                                                                          good_predict_rss, tmp_path, tamper,
                                                                          command):
    checkpoint = _tampered_checkpoint(trained, tmp_path, tamper)
    if command == "predict":
        args = _predict(checkpoint, [_patient(pristine_src)], tmp_path / "seg.nii.gz")
    else:
        args = ["evaluate", "--checkpoint", checkpoint, "--shards", built_shards["webdataset"], "--workers", "0",
                "--device", "cpu", "--src", pristine_src]
    code, err, rss = run_measured("train", args)
    assert_one_line(code, err, str(checkpoint), MEMORY_ATTACKS[tamper])
    assert code == 2 and rss < good_predict_rss + RSS_MARGIN_MB, (rss, good_predict_rss)
    assert not (tmp_path / "seg.nii.gz").exists()


def test_export_refuses_the_same_checkpoints(trained, tmp_path, capsys):
    for tamper, words in MEMORY_ATTACKS.items():
        checkpoint = _tampered_checkpoint(trained, tmp_path, tamper, f"{tamper.__name__}.pt")
        code, _, err = run_cli_inprocess("train", ["export", "--checkpoint", checkpoint, "--out", tmp_path / "exp",
                                                   "--format", "pt2"], capsys)
        assert_one_line(code, err, str(checkpoint), words)
    assert not (tmp_path / "exp").exists()


def test_limits_move_with_their_environment_variable(trained, pristine_src, tmp_path, capsys, monkeypatch):
    """The limit is the documented variable's: lowered below the checkpoint's own base, the good
    checkpoint is refused naming it; raised, the base-400 description gets to the weight check."""
    checkpoint = trained / "checkpoints" / "best.pt"
    monkeypatch.setenv("BRATS_SHARDS_MAX_BASE", "2")
    code, _, err = run_cli_inprocess("train", _predict(checkpoint, [_patient(pristine_src)], tmp_path / "s.nii.gz"),
                                     capsys)
    assert_one_line(code, err, "base 4 is above the limit 2", "BRATS_SHARDS_MAX_BASE")
    monkeypatch.setenv("BRATS_SHARDS_MAX_BASE", "1000")
    monkeypatch.setenv("BRATS_SHARDS_MAX_WIDTH", "100000")
    bad = _tampered_checkpoint(trained, tmp_path, _base_400_only_described)
    code, _, err = run_cli_inprocess("train", _predict(bad, [_patient(pristine_src)], tmp_path / "s.nii.gz"), capsys)
    assert_one_line(code, err, "has shape")


@pytest.mark.slow
def test_a_compressed_checkpoint_is_refused_before_torch_reads_it(trained, pristine_src, tmp_path, capsys):
    """A zip whose members are deflated: torch would load it (checked here with torch itself),
    and a few KB could so declare gigabytes; refused from the archive's directory alone."""
    import zipfile

    import torch

    good = trained / "checkpoints" / "best.pt"
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(packed, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    torch_view = torch.load(packed, weights_only=True)["model_state"]
    assert all(torch.equal(v, torch.load(good, weights_only=True)["model_state"][k]) for k, v in torch_view.items())
    code, _, err = run_cli_inprocess("train", _predict(packed, [_patient(pristine_src)], tmp_path / "s.nii.gz"),
                                     capsys)
    assert_one_line(code, err, str(packed), "compressed")


# ------------------------------------------------------------------ a file that is not a checkpoint says what it is


def _not_checkpoints(src: Path, tmp_path: Path) -> dict:
    import gzip
    import pickle

    made = {}
    text = tmp_path / "notes.pt"
    text.write_text("hello, this is not a checkpoint\n")
    made[text] = "a text file"
    pickled = tmp_path / "old.pt"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=2))
    made[pickled] = "a Python pickle"
    nifti = _file(_patient(src), "flair")
    made[nifti] = "a NIfTI image"
    packed = tmp_path / "seg.nii.gz"
    packed.write_bytes(gzip.compress(nifti.read_bytes()))
    made[packed] = "gzip"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    made[empty] = "empty"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    made[folder] = "is a folder"
    return made


def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(trained, pristine_src, tmp_path, capsys):
    for path, words in _not_checkpoints(pristine_src, tmp_path).items():
        code, _, err = run_cli_inprocess("train", _predict(path, [_patient(pristine_src)], tmp_path / "s.nii.gz"),
                                         capsys)
        line = assert_one_line(code, err, str(path), words)
        assert "101" not in line and "not from this tool" not in line


@pytest.mark.slow
def test_an_exported_onnx_model_is_held_to_the_same_limits(trained, pristine_src, tmp_path, capsys):
    """`predict` runs an `.onnx` from `train export` with the config in its metadata: a config
    declaring a 30000-pixel grid is refused before onnxruntime builds anything."""
    import json

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from train.runfiles.export import METADATA_KEY

    code, _, err = run_cli_inprocess("train", ["export", "--checkpoint", trained / "checkpoints" / "best.pt",
                                               "--out", tmp_path / "exp", "--format", "onnx"], capsys)
    assert code == 0, err
    path = tmp_path / "exp" / "model.onnx"
    model = onnx.load(str(path))
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    config = json.loads(entry.value)
    config["preprocessing"]["size"] = 30000
    entry.value = json.dumps(config)
    onnx.save(model, str(path))
    (tmp_path / "exp" / "model.json").unlink(missing_ok=True)
    code, _, err = run_cli_inprocess("train", _predict(path, [_patient(pristine_src)], tmp_path / "s.nii.gz"), capsys)
    assert_one_line(code, err, str(path), "size 30000", "BRATS_SHARDS_MAX_SIZE")
