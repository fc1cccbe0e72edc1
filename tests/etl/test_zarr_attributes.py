"""Zarr shards explain themselves (issue 14 item 7), checked with plain zarr and xarray.

Arrays carry `dimension_names` and attributes, groups too; the spacing is checked against the
synthetic source's own (1 mm, 48 voxels resized to 16: 3 mm), the names against the manifest,
the values against our reader. Opening the root with plain zarr lists the hierarchy without a
warning, although `manifest.json` and `plan.json` lie there (listing the folder itself, which
consolidated metadata avoids, does warn: the test can fail). Shards written before the
attributes (rebuilt here by stripping them and re-checksumming) are still read the same.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

from etl.synth import synthesize
from shards_spec.read import ShardStore
from tests.helpers.etl_runs import NullCapsys, run_etl

SHAPE = (48, 48, 24)
SIZE = 16
DIMENSIONS = {"image": ["slice", "channel", "height", "width"], "mask": ["slice", "height", "width"],
              "slice_index": ["slice"], "class_voxels": ["slice", "label"], "brain_voxels": ["slice"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zarr")
    synthesize(root / "src", patients=3, layout="brats2021", shape=SHAPE, seed=0)
    code, _, err = run_etl(["build-shards", "--src", root / "src", "--out", root / "shards", "--format", "zarr",
                            "--size", SIZE, "--workers", "0", "--split", "train=0.5,val=0.5",
                            "--modalities", "t1ce,flair,t2"], NullCapsys())
    assert code == 0, err
    return root / "shards"


def manifest(shards: Path) -> dict:
    return json.loads((shards / "manifest.json").read_text())["content"]


def records(shards: Path) -> dict:
    reader = ShardStore(shards)
    return {r.patient: r for s in reader.manifest.content["shards"] for r in reader.records(s)}


@pytest.mark.slow
def test_plain_zarr_sees_dimension_names_and_attributes(store):
    import zarr

    content = manifest(store)
    assert (store / "manifest.json").is_file() and (store / "plan.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        root = zarr.open_group(str(store), mode="r")
        members = dict(root.members(max_depth=None))
        root.tree()
    patients = sorted(content["patients"])
    assert sorted(k for k, v in members.items() if k.count("/") == 1) == sorted(
        f"{info['split']}/{pid}" for pid, info in content["patients"].items())
    assert root.attrs["spec_version"] == content["spec_version"] and root.attrs["manifest"] == "manifest.json"
    for pid in patients:
        info = content["patients"][pid]
        group = root[f"{info['split']}/{pid}"]
        expected_spacing = {"slice": 1.0, "height": 1.0 * 48 / SIZE, "width": 1.0 * 48 / SIZE}
        assert group.attrs["patient"] == pid and group.attrs["split"] == info["split"]
        assert group.attrs["channel_names"] == content["channels"] == ["t1ce", "flair", "t2"]
        assert group.attrs["label_names"] == content["labels"]
        assert group.attrs["spacing_mm"] == expected_spacing
        assert group.attrs["source_shape"] == list(SHAPE) and group.attrs["source_spacing_mm"] == [1.0, 1.0, 1.0]
        for name, dims in DIMENSIONS.items():
            array = group[name]
            assert list(array.metadata.dimension_names) == dims, name
            assert array.attrs["spec_version"] == content["spec_version"]
        assert group["image"].attrs["channel_names"] == content["channels"]
        assert group["image"].attrs["spacing_mm"] == group["mask"].attrs["spacing_mm"] == expected_spacing
        assert group["mask"].attrs["label_names"] == group["class_voxels"].attrs["label_names"] == content["labels"]


def test_listing_the_folder_itself_would_warn_about_our_json_files(store):
    """What the consolidated metadata spares users: zarr's own listing of the root folder."""
    import zarr

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dict(zarr.open_group(str(store), mode="r", use_consolidated=False).members())
    assert any("manifest.json" in str(w.message) for w in caught)


def test_the_consolidated_metadata_is_the_stores_own(store):
    """Every node the root's consolidated metadata describes is exactly its own zarr.json."""
    consolidated = json.loads((store / "zarr.json").read_text())["consolidated_metadata"]["metadata"]
    nodes = {p.parent.relative_to(store).as_posix(): p for p in store.rglob("zarr.json") if p.parent != store}
    assert sorted(consolidated) == sorted(nodes)
    for path, node in nodes.items():
        own = json.loads(node.read_text())
        own.pop("consolidated_metadata", None)
        entry = dict(consolidated[path])
        entry.pop("consolidated_metadata", None)
        assert entry == own, path


@pytest.mark.slow
def test_xarray_opens_a_patient_with_named_dimensions(store):
    import xarray as xr

    content = manifest(store)
    expected = records(store)
    for pid, info in content["patients"].items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = xr.open_zarr(str(store), group=f"{info['split']}/{pid}").load()
        assert dict(ds.sizes) == {"slice": info["slices"], "channel": 3, "height": SIZE, "width": SIZE, "label": 4}
        assert ds["image"].dims == ("slice", "channel", "height", "width")
        assert ds["image"].dtype == np.float16 and ds["mask"].dtype == np.uint8  # no fill-value masking
        np.testing.assert_array_equal(ds["image"].values, expected[pid].image)
        np.testing.assert_array_equal(ds["mask"].values, expected[pid].mask)
        assert ds["slice_index"].values.tolist() == expected[pid].slice_index
        assert ds.attrs["channel_names"] == ["t1ce", "flair", "t2"]
        labelled = ds.assign_coords(channel=ds.attrs["channel_names"])
        np.testing.assert_array_equal(labelled["image"].sel(channel="t2").values, expected[pid].image[:, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(str(store), engine="zarr")
    assert sorted(tree["train"].children) == sorted(p for p, i in content["patients"].items() if i["split"] == "train")


def test_the_manifest_says_how_the_arrays_are_chunked(store):
    import zarr

    content = manifest(store)
    assert content["preprocessing"]["compression"] == \
        "zstd level 3, sharding codec: one shard per array, chunks of 16 slices, crc32c index"
    pid, info = max(content["patients"].items(), key=lambda item: item[1]["slices"])
    image = zarr.open_array(str(store / info["split"] / pid / "image"), mode="r")
    assert info["slices"] > 16 and image.chunks[0] == 16 and image.shards[0] == 32


def test_the_same_build_gives_the_same_bytes(store, tmp_path, capsys):
    code, _, err = run_etl(["build-shards", "--src", store.parent / "src", "--out", tmp_path / "again", "--format",
                            "zarr", "--size", SIZE, "--workers", "0", "--split", "train=0.5,val=0.5",
                            "--modalities", "t1ce,flair,t2"], capsys)
    assert code == 0, err
    files = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file() and p.name != "manifest.json")
    for rel in files:
        assert (store / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    assert manifest(store) == manifest(tmp_path / "again")


def test_consolidation_does_not_depend_on_the_order_nodes_are_found(store):
    from etl.writers.zarr import consolidated

    files = {p.relative_to(store).as_posix(): p.read_bytes() for p in store.rglob("zarr.json")}
    names = list(files)
    random.Random(0).shuffle(names)
    assert consolidated({n: files[n] for n in names}) == consolidated(dict(sorted(files.items())))


def _strip(store: Path) -> None:
    """Turn a store into what the writer made before the attributes: every zarr.json without
    attributes, dimension_names or consolidated metadata, the manifest's checksums updated."""
    for path in store.rglob("zarr.json"):
        meta = json.loads(path.read_text())
        meta.pop("consolidated_metadata", None)
        meta.pop("dimension_names", None)
        meta["attributes"] = {}
        path.write_text(json.dumps(meta, indent=2))
    doc = json.loads((store / "manifest.json").read_text())
    for entry in [f for s in doc["content"]["shards"] for f in s["files"]] + doc["content"]["zarr_groups"]:
        data = (store / entry["path"]).read_bytes()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    for shard in doc["content"]["shards"]:
        shard["bytes"] = sum(f["bytes"] for f in shard["files"])
    (store / "manifest.json").write_text(json.dumps(doc))


def test_shards_written_before_the_attributes_read_the_same(store, tmp_path, capsys):
    import shutil

    import zarr

    old = tmp_path / "old"
    shutil.copytree(store, old)
    _strip(old)
    pid, info = next(iter(manifest(old)["patients"].items()))
    assert zarr.open_array(str(old / info["split"] / pid / "image"), mode="r").metadata.dimension_names is None
    new, before = records(store), records(old)
    assert sorted(new) == sorted(before)
    for patient, record in new.items():
        np.testing.assert_array_equal(before[patient].image, record.image)
        np.testing.assert_array_equal(before[patient].mask, record.mask)
    code, out, err = run_etl(["verify", old], capsys)
    assert code == 0, err


@pytest.mark.slow
def test_plain_zarr_lists_the_store_over_http(store):
    """HTTP cannot list folders: the root's consolidated metadata is what makes the tree visible."""
    import zarr

    from tests.integration.servers import serve_http

    content = manifest(store)
    with serve_http(store) as (url, requests):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            root = zarr.open_group(url, mode="r")
            groups = sorted(k for k, _ in root.groups())
            patients = sorted(k for split in groups for k, _ in root[split].groups())
            pid, info = next(iter(content["patients"].items()))
            image = root[f"{info['split']}/{pid}/image"][...]
    assert groups == ["train", "val"]
    assert patients == sorted(content["patients"])
    np.testing.assert_array_equal(image, records(store)[pid].image)
    assert not any(path.endswith("/") for path in requests)  # no folder was asked for
