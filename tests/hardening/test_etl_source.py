"""Hostile or broken source folders through `etl build-shards` (issue 12), and the messages a new
user meets first:

- class 3: an entry the scan cannot look at (a symbolic link loop, a link to an ancestor, a link
  to nothing, a `stat` that fails) is a problem naming it, fatal unless `--skip-bad`, and then in
  the manifest's `skipped`; every other patient is still found, whatever the listing order;
- class 5: a Kaggle `.h5` whose data lie in another file (HDF5 external storage, a virtual
  dataset, an external link) is refused in one line, and not a byte of that file reaches a shard;
- class 7: a NIfTI header declaring a huge volume, or a `.nii.gz` stream longer than its header
  says (a gzip bomb), is refused from the header before anything is allocated: the peak RSS of
  the `etl` process stays within 100 MB of a good build's; the limit is an option;
- an unknown modality is named as such; `--debug` shows the traceback and keeps the exit code 2.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from .conftest import BUILD_ARGS
from .helpers import (
    RSS_MARGIN_MB,
    assert_one_line,
    error_lines,
    run_cli_inprocess,
    run_measured,
    run_subprocess,
)

MICCAI = "MICCAI_BraTS2020_TrainingData"
PATIENTS = ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]


def _args(src: Path, out: Path, *extra) -> list:
    return ["build-shards", "--src", src, "--out", out, *BUILD_ARGS, *extra]


def _content(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["content"]


# ------------------------------------------------------------------------------ class 3


def test_link_loops_and_dangling_links_are_reported_and_nothing_is_skipped_silently(fresh_src, tmp_path, capsys):
    root = fresh_src / MICCAI
    (root / "a-loop").symlink_to("a-loop")  # stat fails: ELOOP
    (root / "b-back-to-the-top").symlink_to(fresh_src)  # a folder reached twice: a loop in the tree
    (root / "c-gone").symlink_to(fresh_src / "nowhere")
    out = tmp_path / "out"
    code, _, err = run_cli_inprocess("etl", _args(fresh_src, out), capsys)
    lines = error_lines(err)
    assert code == 2 and "Traceback" not in err
    assert any("a-loop" in line and "symbolic link loop" in line for line in lines), err
    assert any("b-back-to-the-top" in line and "scanned already" in line for line in lines), err
    assert any("c-gone" in line and "link to nothing" in line for line in lines), err
    assert "3 problem(s)" in lines[-1] and not out.exists()

    code, _, err = run_cli_inprocess("etl", _args(fresh_src, out, "--skip-bad"), capsys)
    assert code == 0, err
    content = _content(out)
    assert sorted(content["patients"]) == PATIENTS  # every patient, none lost behind the loops
    assert sorted(s["file"] for s in content["skipped"]) == [f"{MICCAI}/a-loop", f"{MICCAI}/b-back-to-the-top",
                                                              f"{MICCAI}/c-gone"]


def test_an_entry_whose_stat_fails_is_a_problem_wherever_the_listing_puts_it(fresh_src, tmp_path, capsys, monkeypatch):
    """A stale network mount or a permission denied (simulated: the tests run as root) on the first
    entry listed made discovery skip every later entry, and the build exit 0 with fewer patients."""
    import importlib

    discover = importlib.import_module("etl.sources.discover")
    real_scandir = os.scandir

    class Unreadable:
        name, path = "stale-mount", str(fresh_src / MICCAI / "stale-mount")

        def is_dir(self, follow_symlinks=True):
            raise PermissionError(13, "Permission denied", self.path)

        is_symlink = is_file = is_dir

    class Listing:
        def __init__(self, folder):
            self.inner = real_scandir(folder)
            self.first = [Unreadable()] if Path(folder) == fresh_src / MICCAI else []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def __iter__(self):
            return iter(self.first + sorted(self.inner, key=lambda e: e.name))

    monkeypatch.setattr(discover.os, "scandir", Listing)
    out = tmp_path / "out"
    code, _, err = run_cli_inprocess("etl", _args(fresh_src, out), capsys)
    assert_one_line(code, err, "stale-mount", "Permission denied")
    assert not out.exists()
    code, _, err = run_cli_inprocess("etl", _args(fresh_src, out, "--skip-bad"), capsys)
    assert code == 0, err
    content = _content(out)
    assert sorted(content["patients"]) == PATIENTS
    assert [(s["file"], s["problem"]) for s in content["skipped"]] == \
        [(f"{MICCAI}/stale-mount", "cannot be read (Permission denied)")]


def test_a_patient_file_that_is_a_dangling_link_is_named(fresh_src, tmp_path, capsys):
    seg = next(fresh_src.rglob(f"{PATIENTS[1]}_seg.nii"))
    seg.unlink()
    seg.symlink_to(tmp_path / "moved-away.nii")  # would otherwise read as "no segmentation": left out
    code, _, err = run_cli_inprocess("etl", _args(fresh_src, tmp_path / "out"), capsys)
    assert_one_line(code, err, seg.name, "symbolic link to nothing")


# ------------------------------------------------------------------------------ class 5

SECRET = np.full((48, 48, 4), 31337.0)  # what a local file holds; must never reach a shard


def _kaggle(tmp_path: Path) -> Path:
    from etl.synth import synthesize

    src = tmp_path / "kaggle"
    synthesize(src, patients=3, layout="kaggle-h5", shape=(48, 48, 24), seed=0)
    return src


def _point_elsewhere(path: Path, kind: str, tmp_path: Path) -> None:
    """Rewrite one slice so that its `image` reads another file."""
    with h5py.File(path, "r") as f:
        mask = f["mask"][()]
    secret_h5 = tmp_path / "secret.h5"
    with h5py.File(secret_h5, "w") as f:
        f["x"] = SECRET
    raw = tmp_path / "secret.bin"
    raw.write_bytes(SECRET.tobytes())
    path.unlink()
    with h5py.File(path, "w") as f:
        f["mask"] = mask
        if kind == "external_storage":
            f.create_dataset("image", shape=SECRET.shape, dtype="<f8", external=[(str(raw), 0, SECRET.nbytes)])
        elif kind == "virtual_dataset":
            layout = h5py.VirtualLayout(shape=SECRET.shape, dtype="<f8")
            layout[:] = h5py.VirtualSource(str(secret_h5), "x", shape=SECRET.shape)
            f.create_virtual_dataset("image", layout)
        else:
            f["image"] = h5py.ExternalLink(str(secret_h5), "x")
    with h5py.File(path, "r") as f:  # the attack works with plain h5py: it reads the other file
        assert np.array_equal(f["image"][()], SECRET)


@pytest.mark.slow
@pytest.mark.parametrize("kind, slice_, words", [
    ("external_storage", 0, "external storage"),  # slice 0: found by the scan
    ("virtual_dataset", 7, "virtual dataset"),  # another slice: found while loading, then rolled back
    ("external_link", 13, "external link"),
])
def test_kaggle_h5_reading_another_file_is_refused(tmp_path, capsys, kind, slice_, words):
    src = _kaggle(tmp_path)
    path = next(src.rglob(f"volume_1_slice_{slice_}.h5"))
    _point_elsewhere(path, kind, tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli_inprocess("etl", _args(src, out), capsys)
    assert_one_line(code, err, path.name, words, "only data stored inside the file")
    assert not out.exists()
    code, _, err = run_cli_inprocess("etl", _args(src, out, "--skip-bad"), capsys)
    assert code == 0, err
    content = _content(out)
    assert sorted(content["patients"]) == ["volume_2", "volume_3"]
    assert [s["patient"] for s in content["skipped"]] == ["volume_1"]
    secret16 = np.float16(31337.0).tobytes() * 8
    assert all(secret16 not in p.read_bytes() for p in out.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ class 7


def _declare(patient_files: list[Path], compressed: bytes) -> list[Path]:
    """Replace every file of a patient by the same .nii.gz bytes (a consistent patient)."""
    made = []
    for path in patient_files:
        target = path.with_name(path.name + ".gz")
        target.write_bytes(compressed)
        path.unlink()
        made.append(target)
    return made


def _header(shape: tuple[int, ...]) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4


@pytest.mark.slow
def test_a_header_declaring_a_huge_volume_is_refused_before_loading(fresh_src, tmp_path, capsys):
    """~80-byte .nii.gz files (a header alone) declaring 20000x20000x10000 voxels: they passed the
    scan (a compressed file's length says nothing) and the task died allocating, with a traceback."""
    files = sorted(next(fresh_src.rglob(PATIENTS[1])).glob("*.nii"))
    made = _declare(files, gzip.compress(_header((20000, 20000, 10000)), mtime=0))
    assert all(p.stat().st_size < 200 for p in made)
    good_code, _, good_mb = run_measured("etl", _args(fresh_src, tmp_path / "good", "--skip-bad"))
    assert good_code == 0
    code, err, peak_mb = run_measured("etl", _args(fresh_src, tmp_path / "out"))
    line = assert_one_line(code, err, PATIENTS[1], "20000x20000x10000", "--max-patient-memory")
    assert "limit of 4.0 GiB" in line
    assert peak_mb < good_mb + RSS_MARGIN_MB, f"peak RSS {peak_mb:.0f} MB, good build {good_mb:.0f} MB"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_compressed_volume_too_large_for_the_limit_is_refused_from_its_header(pristine_src, fresh_src, tmp_path):
    """1024x1024x512 int16 zeros: ~1 MB .nii.gz files that needed 8 GB per patient per worker.
    (Written as gzip members, a header then 64 x 16 MiB of zeros, which a reader joins.)"""
    zeros = gzip.compress(b"\x00" * (1 << 24), compresslevel=9, mtime=0)
    compressed = gzip.compress(_header((1024, 1024, 512)), mtime=0) + zeros * (1024 * 1024 * 512 * 2 >> 24)
    made = _declare(sorted(next(fresh_src.rglob(PATIENTS[0])).glob("*.nii")), compressed)
    assert all(p.stat().st_size < 8 << 20 for p in made)
    good_code, _, good_mb = run_measured("etl", _args(pristine_src, tmp_path / "good"))
    assert good_code == 0
    code, err, peak_mb = run_measured("etl", _args(fresh_src, tmp_path / "out"))
    assert_one_line(code, err, PATIENTS[0], "1024x1024x512", "14.0 GiB")
    assert peak_mb < good_mb + RSS_MARGIN_MB, f"peak RSS {peak_mb:.0f} MB, the good source's build {good_mb:.0f} MB"


def test_the_memory_limit_is_an_option_both_ways(pristine_src, tmp_path, capsys):
    small = ["--max-patient-memory", "1MiB"]  # a 48x48x24 patient needs 1.5 MiB by the estimate
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, tmp_path / "out", *small), capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 4 and all("1.5 MiB" in line and "limit of 1.0 MiB" in line for line in lines[:3])
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, tmp_path / "out", "--max-patient-memory", "2MiB"),
                                     capsys)
    assert code == 0, err
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, tmp_path / "x", "--max-patient-memory", "lots"), capsys)
    assert_one_line(code, err, "--max-patient-memory", "4GiB")


@pytest.mark.slow
def test_a_gzip_bomb_behind_a_small_header_is_refused_with_bounded_memory(pristine_src, fresh_src, tmp_path):
    """The header says 48x48x24; the stream inflates to 1 GiB. nibabel reads only what the header
    says, but the whole-stream CRC check decompressed all of it."""
    t2 = next(fresh_src.rglob(f"{PATIENTS[2]}_t2.nii"))
    target = t2.with_name(t2.name + ".gz")
    with gzip.open(target, "wb", compresslevel=9) as stream:
        stream.write(t2.read_bytes())
        zeros = b"\x00" * (1 << 24)
        for _ in range(64):
            stream.write(zeros)
    t2.unlink()
    good_code, _, good_mb = run_measured("etl", _args(pristine_src, tmp_path / "good"))
    assert good_code == 0
    code, err, peak_mb = run_measured("etl", _args(fresh_src, tmp_path / "out"))
    assert_one_line(code, err, target.name, "gzip stream holds more than")
    assert peak_mb < good_mb + RSS_MARGIN_MB, f"peak RSS {peak_mb:.0f} MB, the good source's build {good_mb:.0f} MB"


# ------------------------------------------------------------------------------ messages


def test_an_unknown_modality_is_named(pristine_src, tmp_path, capsys):
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, tmp_path / "o", "--modalities", "t1ce,flare"), capsys)
    assert_one_line(code, err, "--modalities", "unknown modality 'flare'", "t1, t1ce, t2, flair")
    code, _, err = run_cli_inprocess("etl", _args(pristine_src, tmp_path / "o", "--modalities", "t1ce,t1ce"), capsys)
    assert_one_line(code, err, "t1ce is given twice")


@pytest.mark.slow
def test_debug_keeps_the_exit_code(pristine_src, tmp_path):
    args = _args(pristine_src, tmp_path / "o", "--modalities", "flare")
    plain = run_subprocess("etl", args)
    debug = run_subprocess("etl", [*args, "--debug"])
    assert plain.returncode == debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "Traceback" not in plain.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]


def test_inspect_and_verify_name_what_the_user_typed(built_shards, tmp_path, capsys):
    manifest = built_shards["webdataset"] / "manifest.json"
    code, stdout, err = run_cli_inprocess("etl", ["inspect", manifest], capsys)
    assert code == 0 and "content digest" in stdout, err
    missing = tmp_path / "no-such-shards"
    for command in ("verify", "inspect"):
        code, _, err = run_cli_inprocess("etl", [command, missing], capsys)
        line = assert_one_line(code, err, str(missing), "does not exist")
        assert "FileNotFoundError" not in line and "manifest.json/manifest.json" not in line


def test_skipped_problems_in_the_manifest_hold_no_machine_path(fresh_src, tmp_path, capsys):
    """nibabel names the file by its absolute path in its message; the content must not (its digest
    would then depend on where the source lies)."""
    flair = next(fresh_src.rglob(f"{PATIENTS[0]}_flair.nii"))
    flair.write_text("this is not an image\n" * 40)
    out = tmp_path / "out"
    code, _, err = run_cli_inprocess("etl", _args(fresh_src, out, "--skip-bad"), capsys)
    assert code == 0, err
    (skipped,) = _content(out)["skipped"]
    assert skipped["file"] == f"{MICCAI}/{PATIENTS[0]}/{flair.name}"
    assert flair.name in skipped["problem"] and str(fresh_src) not in skipped["problem"]
    assert str(tmp_path) not in json.dumps(_content(out))
