"""`etl verify` finds every bad shard; `etl inspect` describes a folder from its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.etl_runs import NullCapsys, build, run_etl


@pytest.fixture(scope="module")
def built(tmp_path_factory, source_factory):  # noqa: F811
    """One webdataset and one zarr build of the same source, copied per test."""
    src = source_factory("brats2020", 4)
    root = tmp_path_factory.mktemp("built")

    capsys = NullCapsys()
    for fmt in ("webdataset", "zarr"):
        build(src, root / fmt, capsys, "--format", fmt)
    return root


def copy_of(built: Path, fmt: str, tmp_path: Path) -> tuple[Path, dict]:
    target = tmp_path / fmt
    shutil.copytree(built / fmt, target)
    return target, json.loads((target / "manifest.json").read_text())["content"]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_verify_passes_on_a_fresh_build(built, tmp_path, capsys, fmt):
    out, content = copy_of(built, fmt, tmp_path)
    code, stdout, err = run_etl(["verify", out], capsys)
    assert code == 0, err
    slices = sum(s["slices"] for s in content["shards"])
    assert stdout.startswith(f"ok: {out}") and f"{slices} slices" in stdout and "4 records" in stdout


def test_verify_names_every_bad_shard(built, tmp_path, capsys):
    out, content = copy_of(built, "webdataset", tmp_path)
    flipped, missing, fine = (s["path"] for s in content["shards"][:3])
    flip_byte(out / flipped)
    (out / missing).unlink()
    code, _, err = run_etl(["verify", out], capsys)
    assert code != 0
    first = err[err.index("error: "):].splitlines()[0]
    assert "2 bad shard(s)" in first and flipped in first and missing in first and fine not in first
    assert "sha256" in err and "FileNotFoundError" in err


def test_verify_catches_a_flipped_byte_in_a_zarr_chunk_and_a_stray_file(built, tmp_path, capsys):
    out, content = copy_of(built, "zarr", tmp_path)
    shard = content["shards"][0]
    chunk = next(f["path"] for f in shard["files"] if "/image/c/" in f["path"])
    flip_byte(out / chunk)
    (out / "train" / "leftover.tar.partial").write_bytes(b"x")
    code, _, err = run_etl(["verify", out], capsys)
    assert code != 0
    assert shard["path"] in err and chunk in err
    assert "train/leftover.tar.partial: is not listed in the manifest" in err


def test_verify_decodes_records_and_checks_counts(built, tmp_path, capsys):
    """A manifest whose counts disagree with the records is caught even when checksums match."""
    out, _ = copy_of(built, "webdataset", tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["content"]["shards"][0]
    pid = shard["patients"][0]
    info = manifest["content"]["patients"][pid]
    manifest["content"]["splits"][info["split"]]["tumour_slices"] -= info["tumour_slices"]  # the manifest agrees
    info["tumour_slices"] = 0  # with itself: only the records can tell
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_etl(["verify", out], capsys)
    assert code != 0 and shard["path"] in err and "tumour" in err


def test_verify_refuses_a_broken_manifest_in_one_line(built, tmp_path, capsys):
    out, _ = copy_of(built, "webdataset", tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["content"]["spec_version"] = "brats-slices/9"
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_etl(["verify", out], capsys)
    assert code == 2
    line = err[err.index("error: "):].strip()
    assert "\n" not in line and "manifest.json" in line and "spec_version" in line
    code, _, err = run_etl(["verify", tmp_path / "nothing"], capsys)
    assert code == 2 and "nothing: does not exist" in err
    (out / "manifest.json").unlink()
    for command in ("verify", "inspect"):
        code, _, err = run_etl([command, out], capsys)
        assert code == 2 and "the build did not finish" in err


def test_inspect_shows_splits_balance_and_provenance(built, tmp_path, capsys):
    out, content = copy_of(built, "zarr", tmp_path)
    code, stdout, err = run_etl(["inspect", out], capsys)
    assert code == 0, err
    for word in ("train", "val", "NEC/NET", "ED", "ET", "bytes/slice", "preprocessing", "provenance",
                 "content digest", "stratify grade"):
        assert word in stdout, word
    from etl.verify import describe

    info = describe(out)
    assert info["patients"] == 4 and info["format"] == "zarr"
    for name, split in info["splits"].items():
        assert split["slices"] == content["splits"][name]["slices"]
        assert sum(split["voxel_fraction"].values()) == pytest.approx(1.0)
        assert sum(split["tumour_fraction"].values()) == pytest.approx(1.0)
