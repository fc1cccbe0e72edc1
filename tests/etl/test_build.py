"""`etl build-shards` end to end: synth -> build -> read back with plain webdataset / zarr.

Shard contents are compared with an independent computation of the recipe (tests/helpers/
etl_recipe.py), reading the source files with nibabel / h5py directly. Builds run in this process
(`--workers 0`) except one test that starts a real LocalCluster.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.etl_recipe import expected_slice, read_source
from tests.helpers.etl_runs import SHAPE, SIZE, build, error_line, find_one, run_etl, shard_bytes, snapshot, synth

# ---------------------------------------------------------------------------------------------
# reading shards back with the plain libraries


def read_plain_webdataset(out: Path, shard: dict) -> dict[str, dict]:
    """Records of one tar through plain `webdataset`, decoding .npy with np.load(allow_pickle=False)."""
    import webdataset as wds

    def decode(sample):
        return {
            "key": sample["__key__"],
            "image": np.load(io.BytesIO(sample["image.npy"]), allow_pickle=False),
            "mask": np.load(io.BytesIO(sample["mask.npy"]), allow_pickle=False),
            "meta": json.loads(sample["json"]),
        }

    url = str(out / shard["path"])
    if url.endswith(".gz"):
        import gzip

        plain = out.parent / (Path(url).name[:-3])
        plain.write_bytes(gzip.decompress(Path(url).read_bytes()))
        url = str(plain)
    return {r["key"]: r for r in wds.WebDataset(url, shardshuffle=False, empty_check=False).map(decode)}


def read_plain_zarr(out: Path, info: dict) -> dict:
    import zarr

    root = zarr.open_group(str(out), mode="r")
    group = root[f"{info['split']}/{info['key']}"]
    return {
        "image": group["image"][...],
        "mask": group["mask"][...],
        "meta": {"slice_index": group["slice_index"][...].tolist()},
    }


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.slow
@pytest.mark.parametrize("layout, fmt, extra", [
    ("brats2020", "webdataset", []),
    ("brats2021", "zarr", []),
    ("brats2023", "webdataset", ["--compress", "gz"]),
    ("kaggle-h5", "webdataset", []),
    ("kaggle-h5", "zarr", ["--patients-per-shard", "2"]),
])
def test_end_to_end_matches_the_independent_recipe(source_factory, tmp_path, capsys, layout, fmt, extra):
    src = source_factory(layout, 3)
    out = tmp_path / "shards"
    manifest = build(src, out, capsys, "--format", fmt, *extra)
    content = manifest["content"]
    assert content["format"] == fmt and content["source"]["layout"] == layout
    assert content["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert len(content["patients"]) == 3 and content["skipped"] == []
    checked = 0
    for shard in content["shards"]:
        for pid in shard["patients"]:
            info = content["patients"][pid]
            if fmt == "webdataset":
                record = read_plain_webdataset(out, shard)[info["key"]]
                assert record["meta"]["patient"] == pid
            else:
                record = read_plain_zarr(out, info)
                assert sorted(info["arrays"]) == ["brain_voxels", "class_voxels", "image", "mask", "slice_index"]
            image, mask = record["image"], record["mask"]
            assert image.dtype == np.float16 and image.shape == (info["slices"], 4, SIZE, SIZE)
            assert mask.dtype == np.uint8 and mask.shape == (info["slices"], SIZE, SIZE)
            assert info["tumour_slices"] == int(mask.reshape(len(mask), -1).any(axis=1).sum())
            assert info["class_voxels"] == np.bincount(mask.ravel(), minlength=4).tolist()
            assert info["source_shape"] == list(SHAPE)
            volume, labels = read_source(src, layout, pid)
            kept = [z for z in range(SHAPE[2]) if np.any(volume[..., z] != 0)]
            assert record["meta"]["slice_index"] == kept  # empty slices dropped
            k = int(np.argmax(mask.reshape(len(mask), -1).astype(bool).sum(axis=1)))  # the most tumour
            want_image, want_mask = expected_slice(volume, labels, kept[k], SIZE)
            np.testing.assert_allclose(image[k].astype(np.float32), want_image.astype(np.float32), atol=2e-2, rtol=2e-3)
            np.testing.assert_array_equal(mask[k], want_mask)
            assert mask[k].any()
            checked += 1
    assert checked == 3
    if fmt == "zarr":
        listed = {f["path"] for s in content["shards"] for f in s["files"]} | {f["path"] for f in content["zarr_groups"]}
        on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        assert on_disk - listed == {"manifest.json", "plan.json"}
        assert {f["path"] for f in content["zarr_groups"]} == {"zarr.json", "train/zarr.json", "val/zarr.json"}


@pytest.mark.slow
def test_one_and_two_workers_give_identical_shards_and_content(source_factory, tmp_path, capsys, monkeypatch):
    """The one test with real Dask clusters: build-shards' own LocalCluster of 1 worker, and an
    existing 2-worker cluster found through DASK_SCHEDULER_ADDRESS."""
    import logging

    from distributed import LocalCluster

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src = source_factory("brats2020", 4)
    args = ["--size", SIZE, "--split", "train=0.5,val=0.5"]
    one = tmp_path / "w1"
    code, _, err = run_etl(["build-shards", "--src", src, "--out", one, "--workers", "1", *args], capsys)
    assert code == 0, err
    two = tmp_path / "w2"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster:
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
        code, _, err = run_etl(["build-shards", "--src", src, "--out", two, *args], capsys)
        monkeypatch.delenv("DASK_SCHEDULER_ADDRESS")
    assert code == 0, err
    in_process = tmp_path / "w0"
    build(src, in_process, capsys)
    m1, m2, m0 = (json.loads((out / "manifest.json").read_text()) for out in (one, two, in_process))
    assert shard_bytes(one) == shard_bytes(two) == shard_bytes(in_process)
    encode = lambda c: json.dumps(c, sort_keys=True)  # noqa: E731
    assert encode(m1["content"]) == encode(m2["content"]) == encode(m0["content"])
    assert (m1["provenance"]["scheduler"], m1["provenance"]["workers"]) == ("LocalCluster", 1)
    assert (m2["provenance"]["scheduler"], m2["provenance"]["workers"]) == ("external", 2)
    assert (m0["provenance"]["scheduler"], m0["provenance"]["workers"]) == ("in-process", 0)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_interrupted_build_resumes_to_identical_bytes(source_factory, tmp_path, capsys, monkeypatch, fmt):
    from etl.faults import InjectedFault

    src = source_factory("brats2020", 4)
    clean = tmp_path / "clean"
    reference = build(src, clean, capsys, "--format", fmt)

    out = tmp_path / "crashed"
    monkeypatch.setenv("ETL_FAULT_AFTER_SHARDS", "2")
    with pytest.raises(InjectedFault):
        run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", SIZE,
                 "--split", "train=0.5,val=0.5", "--format", fmt], capsys)
    assert (out / "plan.json").exists() and not (out / "manifest.json").exists()
    journal = [json.loads(line) for line in (out / ".build-journal.jsonl").read_text().splitlines()]
    assert len(journal) == 2
    # a crash in the middle of a write leaves a temporary file behind: it must not survive
    (out / "train" / "junk.tar.partial").write_bytes(b"half")
    before = {p: out.joinpath(p).stat().st_mtime_ns for f in journal for p in (e["path"] for e in f["files"])}

    monkeypatch.delenv("ETL_FAULT_AFTER_SHARDS")
    code, stdout, err = run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", SIZE,
                                 "--split", "train=0.5,val=0.5", "--format", fmt], capsys)
    assert code == 0, err
    assert "keeping 2 complete shard(s)" in err and "resumed" in stdout
    resumed = json.loads((out / "manifest.json").read_text())
    assert {p: out.joinpath(p).stat().st_mtime_ns for p in before} == before  # kept, not rewritten
    assert shard_bytes(out) == shard_bytes(clean)
    assert resumed["content"] == reference["content"]
    assert resumed["provenance"]["shards_kept"] == 2 and not (out / ".build-journal.jsonl").exists()


def test_rerun_of_a_complete_build_is_left_alone_and_a_lost_shard_is_rebuilt(source_factory, tmp_path, capsys):
    src = source_factory("brats2020", 4)
    out = tmp_path / "shards"
    first = build(src, out, capsys)
    state = snapshot(out)
    code, stdout, _ = run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", SIZE,
                               "--split", "train=0.5,val=0.5"], capsys)
    assert code == 0 and "up to date" in stdout
    assert snapshot(out) == state
    lost = first["content"]["shards"][1]["path"]
    (out / lost).unlink()
    second = build(src, out, capsys)
    assert second["content"] == first["content"]
    assert second["provenance"]["shards_built"] == 1
    assert {k: v for k, v in snapshot(out).items() if k != "manifest.json"} == \
        {k: v for k, v in state.items() if k != "manifest.json"}


@pytest.mark.slow
def test_split_is_stable_when_patients_are_added(tmp_path, capsys):
    small = synth(tmp_path / "six", "brats2020", 6)
    large = synth(tmp_path / "eight", "brats2020", 8)
    args = ("--size", "16")
    a = build(small, tmp_path / "a", capsys, *args)["content"]
    b = build(large, tmp_path / "b", capsys, *args)["content"]
    again = build(small, tmp_path / "c", capsys, *args)["content"]
    assert again == a  # deterministic
    assert len(a["patients"]) == 6 and len(b["patients"]) == 8
    for pid, info in a["patients"].items():
        assert b["patients"][pid]["split"] == info["split"]
    for content in (a, b):
        members = [p for s in content["splits"].values() for p in s["patients"]]
        assert len(members) == len(set(members)) == len(content["patients"])  # no patient in two splits
        for name, split in content["splits"].items():
            assert all(content["patients"][p]["split"] == name for p in split["patients"])
            assert split["slices"] == sum(content["patients"][p]["slices"] for p in split["patients"])
        # BraTS 2020 gives HGG/LGG: assignment is stratified and each split's grades are recorded
        assert content["split"]["stratify"] == "grade"
        grades = {}
        for info in content["patients"].values():
            grades.setdefault(info["split"], {}).setdefault(info["grade"], 0)
            grades[info["split"]][info["grade"]] += 1
        assert {n: s["grades"] for n, s in content["splits"].items()} == grades
    other_seed = build(small, tmp_path / "d", capsys, *args, "--seed", "5")["content"]
    assert other_seed["split"]["seed"] == 5


def test_brats2021_has_no_grade_so_no_stratification(source_factory, tmp_path, capsys):
    src = source_factory("brats2021", 3)
    code, _, err = run_etl(["build-shards", "--src", src, "--out", tmp_path / "s", "--workers", "0", "--size", "16",
                            "--folds", "2", "--seed", "1"], capsys)
    assert code == 0, err
    content = json.loads((tmp_path / "s" / "manifest.json").read_text())["content"]
    assert content["split"]["stratify"] is None and content["split"]["method"] == "folds"
    assert set(content["splits"]) == {"fold0", "fold1"}
    assert all("grades" not in s for s in content["splits"].values())


def test_manifest_content_fields(source_factory, tmp_path, capsys):
    from shards_spec.manifest import content_digest, parse

    src = source_factory("brats2020", 4)
    out = tmp_path / "shards"
    build(src, out, capsys, "--patients-per-shard", "2", "--norm", "volume", "--keep-empty")
    manifest = parse((out / "manifest.json").read_bytes())
    content = manifest.content
    pre = content["preprocessing"]
    assert pre["norm"] == "volume" and pre["keep_empty"] is True and pre["size"] == SIZE
    assert pre["image_dtype"] == "float16" and "numpy_version" in pre and "torch_version" in pre
    assert content["labels"] == {"0": "background", "1": "NEC/NET", "2": "ED", "3": "ET"}
    for shard in content["shards"]:
        assert 1 <= shard["records"] <= 2 and shard["records"] == len(shard["patients"])
        assert shard["bytes"] == sum(f["bytes"] for f in shard["files"])
        for f in shard["files"]:
            assert hashlib.sha256((out / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    for info in content["patients"].values():
        assert info["slices"] == SHAPE[2]  # --keep-empty keeps every slice
        assert len(info["affine"]) == 4 and info["spacing"] == [1.0, 1.0, 1.0]
        assert "folder" not in json.dumps(info["meta"]) or str(src) not in json.dumps(info["meta"])
    assert str(src) not in json.dumps(content) and str(out) not in json.dumps(content)
    prov = manifest.provenance
    assert prov["source"]["fingerprint"] and prov["command"].startswith("etl build-shards")
    assert set(prov["versions"]) >= {"python", "numpy", "torch", "zarr", "webdataset", "dask"}
    assert content_digest(content) == manifest.digest


def test_data_error_inside_a_task_rolls_back_a_resumed_folder(source_factory, tmp_path, capsys, monkeypatch):
    """A bad label found while loading stops the build and leaves the folder as before this run."""
    import nibabel as nib

    from etl.faults import InjectedFault

    src = source_factory("brats2020", 4)
    out = tmp_path / "shards"
    monkeypatch.setenv("ETL_FAULT_AFTER_SHARDS", "1")
    with pytest.raises(InjectedFault):
        run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", SIZE,
                 "--split", "train=0.5,val=0.5"], capsys)
    monkeypatch.delenv("ETL_FAULT_AFTER_SHARDS")
    plan = json.loads((out / "plan.json").read_text())
    last = plan["shards"][-1]["patients"][0]
    path = find_one(src, rf"^{last}_seg\.nii$")
    img = nib.load(path, mmap=False)
    data = np.asarray(img.dataobj).copy()
    data[20, 20, 12] = 5  # not a BraTS 2020 label; same file size, so the plan still matches
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    before = snapshot(out)
    code, _, err = run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", SIZE,
                            "--split", "train=0.5,val=0.5"], capsys)
    assert code == 2
    line = error_line(err)
    assert path.name in line and "label" in line and "5" in line
    assert snapshot(out) == before

    code, stdout, err = run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", SIZE,
                                 "--split", "train=0.5,val=0.5", "--skip-bad"], capsys)
    assert code == 0, err
    content = json.loads((out / "manifest.json").read_text())["content"]
    assert [s["patient"] for s in content["skipped"]] == [last]
    assert content["skipped"][0]["file"].endswith(path.name) and not content["skipped"][0]["file"].startswith("/")
    assert last not in content["patients"] and "skipped 1 patient" in stdout
    assert all(last not in s["patients"] for s in content["splits"].values())
