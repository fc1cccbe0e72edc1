"""Bad source data through `etl build-shards` and `train predict`: a non-zero exit, one line per
problem naming the file and the problem (a summary line when there are several), no traceback
unless `--debug`, and the output exactly as it was (every path and every byte), both for a fresh
out folder and for an existing complete shard folder (rebuilt with `--overwrite`, so the new
build really starts and must put the old shards back).

Header-level problems are found by the scan, before anything is written; data-level problems
(NaN, labels, a truncated gzip stream) inside a task, after some shards may have been written:
the roll-back must then remove them.
"""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .conftest import BUILD_ARGS
from .helpers import assert_one_line, error_lines, run_cli_inprocess, run_subprocess, snapshot

PATIENT = "BraTS20_Training_002"


def _file(src: Path, modality: str, patient: str = PATIENT) -> Path:
    found = [p for p in src.rglob("*") if re.fullmatch(rf"{patient}_{modality}\.nii(\.gz)?", p.name)]
    assert len(found) == 1, found
    return found[0]


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path, mmap=False).dataobj)


def _save(path: Path, data: np.ndarray) -> None:
    img = nib.load(path, mmap=False)
    header = img.header.copy()
    header.set_data_dtype(data.dtype)
    nib.save(nib.Nifti1Image(data, img.affine, header), str(path))


# Each damage changes the source and returns (file name the line must name, problem words).
# Only t1ce and flair are damaged, the channels of the v1 checkpoint `train predict` uses.

def missing_modality(src):
    _file(src, "flair").unlink()
    return PATIENT, "no flair"


def zero_byte_file(src):
    path = _file(src, "t1ce")
    path.write_bytes(b"")
    return path.name, "empty file"


def truncated_nifti(src):
    path = _file(src, "t1ce")
    path.write_bytes(path.read_bytes()[:5000])
    return path.name, "truncated"


def truncated_gzip(src):
    """A .nii.gz cut in half: its header reads, the data does not (found inside the task)."""
    path = _file(src, "t1ce")
    packed = gzip.compress(path.read_bytes(), mtime=0)
    target = path.with_name(path.name + ".gz")
    target.write_bytes(packed[: len(packed) // 2])
    path.unlink()
    return target.name, "truncated or corrupt"


def corrupt_gzip(src):
    """A .nii.gz whose deflate stream has flipped bytes in the middle (CRC/stream error)."""
    path = _file(src, "flair")
    packed = bytearray(gzip.compress(path.read_bytes(), mtime=0))
    for i in range(len(packed) // 2, len(packed) // 2 + 64):
        packed[i] ^= 0xFF
    target = path.with_name(path.name + ".gz")
    target.write_bytes(bytes(packed))
    path.unlink()
    return target.name, "corrupt"


def not_nifti(src):
    path = _file(src, "flair")
    path.write_text("this is not an image\n" * 40)
    return path.name, "not a readable NIfTI"


def shape_mismatch(src):
    path = _file(src, "flair")
    _save(path, _data(path)[:40])
    return path.name, "differs"


def four_d_image(src):
    path = _file(src, "t1ce")
    data = _data(path)
    _save(path, np.stack([data, data], axis=-1))
    return path.name, "4D"


def nan_voxels(src):
    path = _file(src, "t1ce")
    data = _data(path).astype(np.float32)
    data[24, 24, 12] = np.nan
    _save(path, data)
    return path.name, "non-finite"


def inf_voxels(src):
    path = _file(src, "flair")
    data = _data(path).astype(np.float32)
    data[24, 24, 12] = np.inf
    _save(path, data)
    return path.name, "non-finite"


def label_outside_the_set(src):
    path = _file(src, "seg")
    data = _data(path).astype(np.int16)  # another dtype, so the file list's sizes change too
    data[20, 20, 12] = 3  # BraTS 2020 has no label 3 (ET is 4)
    _save(path, data)
    return path.name, "label"


def patient_present_twice(src):
    path = _file(src, "flair")
    shutil.copy(path, str(path) + ".gz")
    return path.name, "present twice"


def empty_source(src):
    shutil.rmtree(src)
    src.mkdir()
    return src.name, "empty"


def unrecognised_source(src):
    shutil.rmtree(src)
    (src / "holiday photos").mkdir(parents=True)
    (src / "notes.txt").write_text("nothing to see")
    return src.name, "no BraTS data"


def source_is_a_file(src):
    shutil.rmtree(src)
    src.write_text("not a folder")
    return src.name, "not a folder|file"


ETL_DAMAGES = [missing_modality, zero_byte_file, truncated_nifti, truncated_gzip, corrupt_gzip, not_nifti,
               shape_mismatch, four_d_image, nan_voxels, inf_voxels, label_outside_the_set, patient_present_twice,
               empty_source, unrecognised_source, source_is_a_file]


@pytest.mark.slow
@pytest.mark.parametrize("out_state", ["fresh", "complete"])
@pytest.mark.parametrize("damage", ETL_DAMAGES, ids=lambda d: d.__name__)
def test_build_shards_refuses_bad_source(fresh_src, built_shards, tmp_path, capsys, damage, out_state):
    named, problem = damage(fresh_src)
    out = tmp_path / "out"
    extra = []
    if out_state == "complete":
        shutil.copytree(built_shards["webdataset"], out)
        extra = ["--overwrite"]  # the source changed: make the build really start, then fail
    before = snapshot(out)
    code, _, err = run_cli_inprocess("etl", ["build-shards", "--src", fresh_src, "--out", out, *BUILD_ARGS, *extra],
                                     capsys)
    assert_one_line(code, err, named, problem)
    assert snapshot(out) == before


def test_build_shards_lists_many_problems_with_a_summary(fresh_src, tmp_path, capsys):
    for number in (1, 2, 3):
        _file(fresh_src, "t2", f"BraTS20_Training_{number:03d}").unlink()
    out = tmp_path / "out"
    code, _, err = run_cli_inprocess("etl", ["build-shards", "--src", fresh_src, "--out", out, *BUILD_ARGS], capsys)
    assert code == 2 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 4, err
    for number, line in zip((1, 2, 3), lines):
        assert f"BraTS20_Training_{number:03d}" in line and "no t2" in line
    assert "3 problem(s)" in lines[-1] and "--skip-bad" in lines[-1]
    assert not out.exists()


@pytest.mark.slow
def test_kaggle_h5_corrupt_and_foreign_files(tmp_path, capsys):
    from etl.synth import synthesize

    src = tmp_path / "kaggle"
    synthesize(src, patients=2, layout="kaggle-h5", shape=(48, 48, 24), seed=0)
    files = sorted(src.rglob("volume_1_slice_*.h5"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    cut = files[12]
    cut.write_bytes(cut.read_bytes()[:700])
    out = tmp_path / "out"
    code, _, err = run_cli_inprocess("etl", ["build-shards", "--src", src, "--out", out, *BUILD_ARGS], capsys)
    assert_one_line(code, err, cut.name)
    assert not out.exists()
    cut.write_text("plain text behind an .h5 name\n")
    code, _, err = run_cli_inprocess("etl", ["build-shards", "--src", src, "--out", out, *BUILD_ARGS], capsys)
    assert_one_line(code, err, cut.name)
    assert not out.exists()


@pytest.mark.slow
def test_debug_shows_the_traceback_and_plain_does_not(fresh_src, tmp_path):
    named, problem = missing_modality(fresh_src)
    args = ["build-shards", "--src", fresh_src, "--out", tmp_path / "out", *BUILD_ARGS]
    plain = run_subprocess("etl", args)
    assert_one_line(plain.returncode, plain.stderr, named, problem)
    debug = run_subprocess("etl", [*args, "--debug"])
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "SourceError" in debug.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ train predict

PREDICT_DAMAGES = [missing_modality, zero_byte_file, truncated_nifti, truncated_gzip, corrupt_gzip, not_nifti,
                   shape_mismatch, four_d_image, nan_voxels, inf_voxels, patient_present_twice, empty_source,
                   unrecognised_source, source_is_a_file]


@pytest.mark.slow
@pytest.mark.parametrize("damage", PREDICT_DAMAGES, ids=lambda d: d.__name__)
def test_predict_refuses_bad_input(fresh_src, trained, tmp_path, capsys, damage):
    folder = _file(fresh_src, "t1").parent
    target = folder if damage not in (empty_source, unrecognised_source, source_is_a_file) else fresh_src
    named, problem = damage(target if target is fresh_src else fresh_src)
    out_dir = tmp_path / "pred"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("someone else's file")
    before = snapshot(out_dir)
    code, _, err = run_cli_inprocess("train", ["predict", "--checkpoint", trained / "checkpoints" / "best.pt",
                                               "--input", target, "--out", out_dir / "seg.nii.gz",
                                               "--device", "cpu"], capsys)
    assert_one_line(code, err, named, problem)
    assert snapshot(out_dir) == before


@pytest.mark.slow
def test_predict_debug_shows_the_traceback(fresh_src, trained, tmp_path):
    named, problem = not_nifti(fresh_src)
    args = ["predict", "--checkpoint", trained / "checkpoints" / "best.pt", "--input", _file(fresh_src, "t1").parent,
            "--out", tmp_path / "seg.nii.gz", "--device", "cpu"]
    plain = run_subprocess("train", args)
    assert_one_line(plain.returncode, plain.stderr, named, problem)
    debug = run_subprocess("train", [*args, "--debug"])
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert not (tmp_path / "seg.nii.gz").exists()
