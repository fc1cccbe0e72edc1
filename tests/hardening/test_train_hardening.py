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

import os
import shutil
from pathlib import Path

import pytest

from .helpers import assert_one_line, run_cli_inprocess, snapshot

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
