"""The `etl` command line: help texts, exit codes, one-line errors, folder left untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers.etl_runs import SIZE, build, error_line, find_one, run_etl, snapshot

PATIENT = "BraTS20_Training_002"


def _nifti(src: Path, modality: str) -> Path:
    return find_one(src, rf"^{PATIENT}_{modality}\.nii$")


def _resave(path: Path, data: np.ndarray) -> None:
    img = nib.load(path, mmap=False)
    header = img.header.copy()
    header.set_data_dtype(data.dtype)
    nib.save(nib.Nifti1Image(data, img.affine, header), str(path))


def missing_modality(src: Path) -> tuple[str, str]:
    path = _nifti(src, "t2")
    path.unlink()
    return PATIENT, "t2"


def truncated_file(src: Path) -> tuple[str, str]:
    path = _nifti(src, "t1ce")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name, "truncated"


def shape_mismatch(src: Path) -> tuple[str, str]:
    path = _nifti(src, "flair")
    _resave(path, np.asarray(nib.load(path, mmap=False).dataobj)[:40])
    return path.name, "shape"


def invalid_label(src: Path) -> tuple[str, str]:
    path = _nifti(src, "seg")
    data = np.asarray(nib.load(path, mmap=False).dataobj).copy()
    data[20, 20, 12] = 3  # BraTS 2020 has no label 3 (ET is 4)
    _resave(path, data)
    return path.name, "label"


def nan_value(src: Path) -> tuple[str, str]:
    path = _nifti(src, "t1")
    data = np.asarray(nib.load(path, mmap=False).dataobj).astype(np.float32)
    data[24, 24, 12] = np.nan
    _resave(path, data)
    return path.name, "NaN"


def four_d_image(src: Path) -> tuple[str, str]:
    path = _nifti(src, "t1")
    data = np.asarray(nib.load(path, mmap=False).dataobj)
    _resave(path, np.stack([data, data], axis=-1))
    return path.name, "4D"


@pytest.mark.parametrize("damage", [missing_modality, truncated_file, shape_mismatch, invalid_label, nan_value,
                                    four_d_image])
@pytest.mark.parametrize("out_state", ["missing", "empty"])
def test_bad_input_is_one_line_and_leaves_the_output_as_it_was(source_factory, tmp_path, capsys, damage, out_state):
    src = source_factory("brats2020", 4)
    named, problem = damage(src)
    out = tmp_path / "shards"
    if out_state == "empty":
        out.mkdir()
    before = snapshot(out)
    code, stdout, err = run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", SIZE,
                                 "--split", "train=0.5,val=0.5"], capsys)
    assert code == 2
    line = error_line(err)
    assert named in line and problem.lower() in line.lower(), line
    assert "Traceback" not in err
    assert snapshot(out) == before


def test_debug_shows_the_traceback_and_keeps_the_exit_code(source_factory, tmp_path, capsys):
    src = source_factory("brats2020", 4)
    missing_modality(src)
    args = ["build-shards", "--src", src, "--out", tmp_path / "o", "--workers", "0"]
    plain, _, plain_err = run_etl(args, capsys)
    code, _, err = run_etl([*args, "--debug"], capsys)
    assert plain == code == 2
    assert "Traceback (most recent call last)" in err and "shards_spec.errors.SourceError" in err
    assert "Traceback" not in plain_err and error_line(err) == error_line(plain_err)


def test_empty_source_and_missing_source(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_etl(["build-shards", "--src", tmp_path / "empty", "--out", tmp_path / "o", "--workers", "0"],
                           capsys)
    assert code == 2 and "empty" in error_line(err) and str(tmp_path / "empty") in err
    code, _, err = run_etl(["build-shards", "--src", tmp_path / "nowhere", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "nowhere" in error_line(err)
    assert not (tmp_path / "o").exists()


def test_many_bad_patients_are_listed_one_per_line_with_a_summary(source_factory, tmp_path, capsys):
    src = source_factory("brats2020", 4)
    for pid in ("BraTS20_Training_001", "BraTS20_Training_003"):
        find_one(src, rf"^{pid}_t2\.nii$").unlink()
    code, _, err = run_etl(["build-shards", "--src", src, "--out", tmp_path / "o", "--workers", "0"], capsys)
    assert code == 2
    tail = err[err.index("error: "):].strip().splitlines()
    assert "BraTS20_Training_001" in tail[0] and "BraTS20_Training_003" in tail[1]
    assert "2 problem(s)" in tail[-1] and "--skip-bad" in tail[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--split", "train=0.8,val=0.3"], "sum to 1.1"),
    (["--format", "parquet"], "--format must be one of webdataset, zarr"),
    (["--modalities", "t1,dwi"], "--modalities"),
    (["--norm", "batch"], "--norm must be one of"),
    (["--compress", "xz"], "--compress must be one of"),
    (["--split", "train=0.99,val=0.01"], "received no patient"),
])
def test_bad_options_are_one_line(source_factory, tmp_path, capsys, args, fragment):
    src = source_factory("brats2020", 4)
    code, _, err = run_etl(["build-shards", "--src", src, "--out", tmp_path / "o", "--workers", "0", *args], capsys)
    assert code == 2 and fragment in error_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_other_options_are_refused_unless_overwrite(source_factory, tmp_path, capsys):
    src = source_factory("brats2020", 4)
    out = tmp_path / "shards"
    build(src, out, capsys)
    before = snapshot(out)
    args = ["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", "24", "--split", "train=0.5,val=0.5"]
    code, _, err = run_etl(args, capsys)
    line = error_line(err)
    assert code == 2 and str(out) in line and "size: 32 -> 24" in line and "--overwrite" in line
    assert snapshot(out) == before
    code, _, err = run_etl(args + ["--overwrite"], capsys)
    assert code == 0, err
    content = json.loads((out / "manifest.json").read_text())["content"]
    assert content["preprocessing"]["size"] == 24
    assert not (out / ".build-previous").exists()
    code, stdout, _ = run_etl(["verify", out], capsys)
    assert code == 0 and stdout.startswith("ok")


def test_overwrite_that_fails_restores_the_old_shards(source_factory, tmp_path, capsys):
    src = source_factory("brats2020", 4)
    out = tmp_path / "shards"
    build(src, out, capsys)
    before = snapshot(out)
    invalid_label(src)  # found only when loading: after the old content was set aside
    code, _, err = run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", "24",
                            "--split", "train=0.5,val=0.5", "--overwrite"], capsys)
    assert code == 2 and "label" in error_line(err)
    assert snapshot(out) == before


def test_foreign_folder_is_refused_even_with_overwrite(source_factory, tmp_path, capsys):
    src = source_factory("brats2020", 4)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    for extra in ([], ["--overwrite"]):
        code, _, err = run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", *extra], capsys)
        assert code == 2 and "not made by build-shards" in error_line(err)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_skip_bad_builds_the_rest_and_lists_the_skipped(source_factory, tmp_path, capsys):
    src = source_factory("brats2020", 4)
    missing_modality(src)  # found by the scan
    nan_path = find_one(src, r"^BraTS20_Training_004_t1\.nii$")
    data = np.asarray(nib.load(nan_path, mmap=False).dataobj).astype(np.float32)
    data[24, 24, 12] = np.nan
    _resave(nan_path, data)  # found when loading
    out = tmp_path / "shards"
    code, stdout, err = run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", SIZE,
                                 "--split", "train=0.5,val=0.5", "--skip-bad"], capsys)
    assert code == 0, err
    content = json.loads((out / "manifest.json").read_text())["content"]
    skipped = {s["patient"]: s for s in content["skipped"]}
    assert set(skipped) == {PATIENT, "BraTS20_Training_004"}
    assert "t2" in skipped[PATIENT]["problem"] and "NaN" in skipped["BraTS20_Training_004"]["problem"]
    assert set(content["patients"]) == {"BraTS20_Training_001", "BraTS20_Training_003"}
    assert "skipped 2 patient(s)" in stdout
    assert run_etl(["verify", out], capsys)[0] == 0


def test_unlabelled_folders_are_reported(source_factory, tmp_path, capsys):
    src = source_factory("brats2020", 4)
    find_one(src, rf"^{PATIENT}_seg\.nii$").unlink()
    code, stdout, err = run_etl(["build-shards", "--src", src, "--out", tmp_path / "o", "--workers", "0",
                                 "--size", SIZE, "--split", "train=0.5,val=0.5"], capsys)
    assert code == 0, err
    assert "without labels" in stdout and PATIENT in stdout
    assert PATIENT not in json.loads((tmp_path / "o" / "manifest.json").read_text())["content"]["patients"]


def test_synth_command(tmp_path, capsys):
    code, stdout, err = run_etl(["synth", "--out", tmp_path / "s", "--patients", "2", "--layout", "brats2023",
                                 "--shape", "32,32,16", "--seed", "3"], capsys)
    assert code == 0, err
    assert "2 patient(s)" in stdout and len(list((tmp_path / "s").rglob("*-seg.nii.gz"))) == 2
    code, _, err = run_etl(["synth", "--out", tmp_path / "t", "--shape", "32,32"], capsys)
    assert code == 2 and "--shape" in error_line(err)
    code, _, err = run_etl(["synth", "--out", tmp_path / "t", "--layout", "brats1999"], capsys)
    assert code == 2 and "--layout must be one of" in error_line(err)


@pytest.mark.slow
def test_help_is_instant_and_shows_examples():
    for command in ([], ["synth"], ["build-shards"], ["verify"], ["inspect"]):
        started = time.time()
        result = subprocess.run([sys.executable, "-m", "etl.cli", *command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert time.time() - started < 5
        if command:
            assert "Example" in result.stdout and f"etl {command[0]}" in result.stdout
    probe = "import sys, etl.cli; print(sorted(m for m in ('torch', 'numpy', 'dask', 'zarr') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
