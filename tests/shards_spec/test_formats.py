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
