"""The reader registry: every format is one module plus one `READERS` line, and a toy format
registered at run time is read end to end by `ShardStore` with no other change."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from shards_spec import formats
from shards_spec.codec import build_record
from shards_spec.errors import SpecError
from shards_spec.manifest import MANIFEST_NAME
from shards_spec.read import ShardStore
from tests.shard_fixtures import make_shards, sample_code


def test_format_names_are_the_registry():
    assert formats.FORMATS == tuple(formats.READERS) == ("webdataset", "zarr")
    for fmt in formats.FORMATS:
        assert formats.reader(fmt).__name__ == f"shards_spec.formats.{fmt}"
    with pytest.raises(SpecError, match="'npz' has no reader"):
        formats.reader("npz")


def _toy_records(store, shard, expected, name):
    """A toy format: one `.npz` per shard holding `<key>.image` and `<key>.mask` (trusted test data)."""
    import io

    arrays = np.load(io.BytesIO(store.read_file(shard["files"][0])), allow_pickle=False)
    for key, pid in expected.items():
        image, mask = arrays[f"{key}.image"], arrays[f"{key}.mask"]
        s = image.shape[0]
        meta = {"patient": pid, "slice_index": list(range(s)), "class_voxels": [[0, 0, 0, 0]] * s,
                "brain_voxels": [0] * s}
        yield build_record(key, image, mask, meta, channels=image.shape[1], size=image.shape[2])


def test_a_toy_format_registered_in_one_line_is_read_end_to_end(tmp_path, monkeypatch):
    import hashlib
    import io

    root = make_shards(tmp_path, "webdataset", patients={"p1": 3, "p2": 2}, tumour_every=100)
    reference = {r.patient: r for s in ShardStore(root).manifest.shards_of("train") for r in ShardStore(root).records(s)}
    data = json.loads((root / MANIFEST_NAME).read_text())
    for shard in data["content"]["shards"]:
        buffer = io.BytesIO()
        np.savez(buffer, **{f"{p}.image": reference[p].image for p in shard["patients"]},
                 **{f"{p}.mask": reference[p].mask for p in shard["patients"]})
        rel = shard["path"].replace(".tar", ".npz")
        (root / rel).write_bytes(buffer.getvalue())
        shard["path"] = rel
        shard["bytes"] = len(buffer.getvalue())
        shard["files"] = [{"path": rel, "bytes": len(buffer.getvalue()),
                           "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}]
        for pid in shard["patients"]:
            data["content"]["patients"][pid]["shard"] = rel
    data["content"]["format"] = "toy"
    (root / MANIFEST_NAME).write_text(json.dumps(data))

    with pytest.raises(SpecError, match="format must be one of"):
        ShardStore(root)
    monkeypatch.setitem(formats.READERS, "toy", SimpleNamespace(records=_toy_records))  # the one registry line
    store = ShardStore(root)
    got = {r.patient: r for s in store.manifest.shards_of("train") for r in store.records(s)}
    assert sorted(got) == ["p1", "p2"]
    assert got["p2"].image[1, 3, 0, 0] == sample_code(1, 1) * 4 + 3
    assert np.array_equal(got["p1"].image, reference["p1"].image)


@pytest.mark.parametrize("tumour_slices", [[0, 20], []], ids=["empty-chunks", "no-mask-shard"])
def test_zarr_arrays_read_directly_equal_what_zarr_python_reads(tmp_path, tumour_slices):
    """Our Zarr reader decodes the sharding codec itself; plain zarr must read the same arrays,
    including inner chunks left empty (all-zero masks) and an array whose shard zarr never wrote."""
    import zarr

    from etl.writers import zarr as zarr_writer
    from shards_spec.codec import IMAGE_DTYPE, MASK_DTYPE
    from shards_spec.formats.zarr import read_array
    from shards_spec.labels import class_voxels
    from shards_spec.preprocess import Slices

    rng = np.random.default_rng(0)
    n = 37  # three inner chunks of 16 slices, the last one partial
    mask = np.zeros((n, 16, 16), dtype=np.uint8)
    for s in tumour_slices:
        mask[s, 3:6, 4:9] = rng.integers(1, 4, size=(3, 5))
    slices = Slices(image=rng.normal(size=(n, 4, 16, 16)).astype(np.float16), mask=mask,
                    slice_index=list(range(5, 5 + n)), class_voxels=[class_voxels(m) for m in mask],
                    brain_voxels=rng.integers(0, 256, size=n).tolist())
    zarr_writer.write_root(tmp_path, ["train"])
    entries = zarr_writer.write_patient(tmp_path, "train", "p1", slices)
    files = {e["path"]: memoryview(bytearray((tmp_path / e["path"]).read_bytes())) for e in entries}
    assert ("train/p1/mask/c/0/0/0" in files) == bool(tumour_slices)
    expected = {"image": ((n, 4, 16, 16), (IMAGE_DTYPE,)), "mask": ((n, 16, 16), (MASK_DTYPE,)),
                "slice_index": ((n,), None), "class_voxels": ((n, 4), None), "brain_voxels": ((n,), None)}
    for name, (shape, dtypes) in expected.items():
        ours = read_array(files, f"train/p1/{name}", shape, dtypes, name)
        theirs = zarr.open_array(tmp_path / "train/p1" / name, mode="r")[...]
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), name
    assert np.array_equal(read_array(files, "train/p1/mask", (n, 16, 16), (MASK_DTYPE,), "mask"), mask)
