import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from shards_spec.errors import SpecError
from shards_spec.manifest import MANIFEST_NAME
from shards_spec.read import ShardStore
from tests.shard_fixtures import make_shards, sample_code, serve_range_http

FORMATS = ["webdataset", "zarr"]


def _records(store, split="train"):
    return {r.patient: r for shard in store.manifest.shards_of(split) for r in store.records(shard)}


def _edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / MANIFEST_NAME).read_text())
    edit(data["content"])
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def _rewrite(root: Path, rel: str, data: bytes) -> None:
    """Replace a file and update its manifest entry, so only the content checks can catch it."""
    (root / rel).write_bytes(data)

    def edit(content):
        for shard in content["shards"]:
            for entry in shard["files"]:
                if entry["path"] == rel:
                    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            shard["bytes"] = sum(entry["bytes"] for entry in shard["files"])
    _edit_manifest(root, edit)


@pytest.mark.parametrize("fmt", FORMATS)
def test_records_hold_the_known_values(tmp_path, fmt):
    root = make_shards(tmp_path, fmt, patients={"p1": 3, "p2": 5})
    records = _records(ShardStore(root))
    assert sorted(records) == ["p1", "p2"]
    p2 = records["p2"]
    assert p2.image.dtype == np.float16 and p2.image.shape == (5, 4, 16, 16)
    assert p2.image[3, 2, 7, 7] == sample_code(1, 3) * 4 + 2
    assert p2.slice_index == [10, 11, 12, 13, 14]
    assert p2.mask.shape == (5, 16, 16) and p2.mask[2, 0, :4].tolist() == [1, 2, 3, 0] and not p2.mask[1].any()
    assert p2.class_voxels[0] == [16 * 16 - 3, 1, 1, 1]


def test_gzip_tar_reads_like_plain(tmp_path):
    plain = _records(ShardStore(make_shards(tmp_path / "a", "webdataset")))
    packed = ShardStore(make_shards(tmp_path / "b", "webdataset", compression="gz"))
    assert packed.manifest.content["shards"][0]["path"].endswith(".tar.gz")
    for pid, record in _records(packed).items():
        assert np.array_equal(record.image, plain[pid].image)


def test_unknown_spec_version_and_missing_manifest_name_the_file(tmp_path):
    root = make_shards(tmp_path, "webdataset")
    _edit_manifest(root, lambda c: c.update(spec_version="brats-slices/9"))
    with pytest.raises(SpecError, match="manifest.json.*spec_version"):
        ShardStore(root)
    with pytest.raises(SpecError, match="nowhere: does not exist"):
        ShardStore(tmp_path / "nowhere")


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_file_is_refused_naming_the_shard_and_verify_reports_it(tmp_path, fmt):
    root = make_shards(tmp_path, fmt)
    store = ShardStore(root)
    shard = store.manifest.shards_of("train")[1]
    entry = max(shard["files"], key=lambda f: f["bytes"])  # the tar, or the zarr image shard
    path = root / entry["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.verify_file(entry) is not None and "sha256" in store.verify_file(entry)
    assert all(store.verify_file(f) is None for f in store.manifest.shards_of("train")[0]["files"])
    with pytest.raises(SpecError) as caught:
        list(store.records(shard))
    assert shard["path"] in str(caught.value) or entry["path"] in str(caught.value)


def test_truncated_file_is_refused(tmp_path):
    root = make_shards(tmp_path, "webdataset")
    store = ShardStore(root)
    shard = store.manifest.shards_of("train")[0]
    (root / shard["path"]).write_bytes((root / shard["path"]).read_bytes()[:3000])
    with pytest.raises(SpecError, match=re.escape(shard["path"])):
        list(store.records(shard))
    assert "bytes" in store.verify_file(shard["files"][0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_that_lies_about_counts_is_refused(tmp_path, fmt):
    root = make_shards(tmp_path, fmt, patients={"p1": 3, "p2": 5})

    def more_tumour(content):
        content["patients"]["p2"]["tumour_slices"] = 1
    _edit_manifest(root, more_tumour)
    store = ShardStore(root)
    assert len(list(store.records(store.manifest.shards_of("train")[0]))) == 1  # p1 is fine
    with pytest.raises(SpecError, match="p2.*manifest says"):
        list(store.records(store.manifest.shards_of("train")[1]))


def test_shard_slice_count_lie_is_refused(tmp_path):
    root = make_shards(tmp_path, "webdataset", patients={"p1": 3})
    _edit_manifest(root, lambda c: c["shards"][0].update(slices=4))
    with pytest.raises(SpecError, match=r"manifest.json: field content.shards \(train/train-000000.tar\).slices is 4, its "
                                        "patients add up to 3"):
        ShardStore(root)

    def lie(content):  # consistent everywhere in the manifest: only the record can tell
        for part in (content["shards"][0], content["patients"]["p1"], content["splits"]["train"]):
            part["slices"] = 4
    _edit_manifest(root, lie)
    store = ShardStore(root)
    with pytest.raises(SpecError, match="holds 3 slices.*the manifest says 4"):
        list(store.records(store.manifest.shards_of("train")[0]))


def test_zarr_metadata_is_checked_before_reading(tmp_path):
    root = make_shards(tmp_path, "zarr", patients={"p1": 3})
    rel = "train/p1/image/zarr.json"
    meta = json.loads((root / rel).read_text())
    meta["shape"] = [3, 4, 16, 8]
    _rewrite(root, rel, json.dumps(meta).encode())
    store = ShardStore(root)
    with pytest.raises(SpecError, match=r"train/p1.*shape \(3, 4, 16, 8\)"):
        list(store.records(store.manifest.shards_of("train")[0]))


def test_zarr_listed_file_that_vanished_is_an_error_not_fill_values(tmp_path):
    root = make_shards(tmp_path, "zarr", patients={"p1": 3})
    store = ShardStore(root)
    # zarr itself would read a missing chunk as the fill value 0; the reader reads the files the
    # manifest lists, so a vanished one fails.
    (root / "train/p1/image/c/0/0/0/0").unlink()
    with pytest.raises(SpecError, match="train/p1/image/c/0/0/0/0.*cannot be read"):
        list(store.records(store.manifest.shards_of("train")[0]))


def test_cache_is_keyed_by_sha256_and_revalidated(tmp_path):
    root = make_shards(tmp_path, "webdataset", patients={"p1": 3})
    cache = tmp_path / "cache"
    store = ShardStore(root, cache_dir=cache)
    shard = store.manifest.shards_of("train")[0]
    digest = shard["files"][0]["sha256"]
    first = _records(store)["p1"]
    cached = cache / digest[:2] / digest
    assert cached.exists() and [p.name for p in cache.rglob("*") if p.is_file()] == [digest]
    # A changed cached copy is discarded and fetched again from the source (with a warning).
    cached.write_bytes(b"tampered")
    with pytest.warns(UserWarning, match="fetching it again"):
        again = _records(store)["p1"]
    assert np.array_equal(again.image, first.image) and cached.read_bytes() == (root / shard["path"]).read_bytes()
    # A source that no longer matches the manifest is refused, naming the file; nothing is cached.
    cached.unlink()
    data = bytearray((root / shard["path"]).read_bytes())
    data[2000] ^= 1
    (root / shard["path"]).write_bytes(bytes(data))
    with pytest.raises(SpecError, match=re.escape(shard["path"]) + ".*sha256"):
        _records(store)
    assert not cached.exists() and not list(cache.rglob("*.partial"))


def test_file_url_reads_like_the_path(tmp_path):
    root = make_shards(tmp_path, "zarr", patients={"p1": 2})
    by_url = _records(ShardStore(root.as_uri()))
    assert np.array_equal(by_url["p1"].image, _records(ShardStore(root))["p1"].image)


@pytest.fixture
def http_root(tmp_path):
    with serve_range_http(tmp_path) as url:
        yield url


@pytest.mark.slow
def test_range_server_answers_ranges(http_root, tmp_path):
    import urllib.request
    (tmp_path / "x.bin").write_bytes(bytes(range(100)))
    request = urllib.request.Request(f"{http_root}/x.bin", headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206 and response.read() == bytes(range(10, 20))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_http_reads_the_same_records_as_the_path(tmp_path, http_root, fmt):
    root = make_shards(tmp_path, fmt, patients={"p1": 3, "p2": 4})
    local = _records(ShardStore(root))
    store = ShardStore(f"{http_root}/{root.name}")
    remote = _records(store)
    assert sorted(remote) == sorted(local)
    for pid in local:
        assert np.array_equal(remote[pid].image, local[pid].image)
        assert np.array_equal(remote[pid].mask, local[pid].mask)
        assert remote[pid].slice_index == local[pid].slice_index
    assert all(store.verify_file(f) is None for s in store.manifest.content["shards"] for f in s["files"])
    with pytest.raises(SpecError, match="127.0.0.1.*manifest.json"):
        ShardStore(f"{http_root}/missing")


@pytest.mark.slow
def test_s3_reads_the_same_records_as_the_path(tmp_path):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                     region_name="us-east-1").create_bucket(Bucket="lab")
        options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        import s3fs
        for fmt in FORMATS:
            root = make_shards(tmp_path / fmt, fmt, patients={"p1": 3})
            s3fs.S3FileSystem(**options).put(f"{root}/", f"lab/{fmt}/", recursive=True)
            remote = _records(ShardStore(f"s3://lab/{fmt}", storage_options=options))
            assert np.array_equal(remote["p1"].image, _records(ShardStore(root))["p1"].image)
    finally:
        server.stop()


class _CountingSha256:
    """Counts the sha256 digests `shards_spec.read` computes (a file hashed whole is one)."""

    def __init__(self, monkeypatch):
        import shards_spec.read as read_module

        self.calls = 0
        real = hashlib.sha256

        def counted(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(read_module.hashlib, "sha256", counted)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_unchanged_local_file_is_hashed_once_per_store_and_a_changed_one_again(tmp_path, monkeypatch, fmt):
    import os

    import shards_spec.read as read_module

    root = make_shards(tmp_path, fmt, patients={"p1": 3, "p2": 2})
    store = ShardStore(root)
    files = sum(len(s["files"]) for s in store.manifest.content["shards"])
    hashes = _CountingSha256(monkeypatch)
    first = _records(store)
    assert hashes.calls == files  # just written: within RECENT_CHANGE_S, so not remembered
    _records(store)
    assert hashes.calls == 2 * files
    monkeypatch.setattr(read_module, "RECENT_CHANGE_S", 0.0)  # as for files written long ago
    _records(store)
    again = _records(store)
    assert hashes.calls == 3 * files  # hashed once more, then remembered
    assert all(np.array_equal(again[p].image, first[p].image) for p in first)
    # A file changed in place (same size, one byte) is hashed again and refused: its ctime moved.
    entry = max((f for s in store.manifest.content["shards"] for f in s["files"]), key=lambda f: f["bytes"])
    path = root / entry["path"]
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its mtime set back
    with pytest.raises(SpecError, match=re.escape(entry["path"]) + ": sha256 differs"):
        _records(store)
    assert ShardStore(root)._verified == {}  # a new store (a new process) remembers nothing


def test_a_cached_copy_is_hashed_once_per_store(tmp_path, monkeypatch):
    import shards_spec.read as read_module

    root = make_shards(tmp_path, "webdataset", patients={"p1": 3})
    monkeypatch.setattr(read_module, "RECENT_CHANGE_S", 0.0)
    store = ShardStore(root, cache_dir=tmp_path / "cache")
    first = _records(store)  # fetched (hashed while streaming), then read from the cache (hashed)
    hashes = _CountingSha256(monkeypatch)
    again = _records(store)
    assert hashes.calls == 0 and np.array_equal(again["p1"].image, first["p1"].image)
    cached = next(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    cached.write_bytes(cached.read_bytes()[:-1] + b"X")
    with pytest.warns(UserWarning, match="sha256 differs.*fetching it again"):
        assert np.array_equal(_records(store)["p1"].image, first["p1"].image)


@pytest.mark.parametrize("fmt", FORMATS)
def test_values_are_scanned_until_a_shard_passed_once_and_bad_values_fail_every_time(tmp_path, monkeypatch, fmt):
    import shards_spec.codec as codec

    scans = []
    real = codec._has_nonfinite_float16
    monkeypatch.setattr(codec, "_has_nonfinite_float16", lambda image: scans.append(1) or real(image))
    root = make_shards(tmp_path / "good", fmt, patients={"p1": 3, "p2": 2})
    store = ShardStore(root)
    shards = store.manifest.shards_of("train")
    assert not any(store.values_checked(s) for s in shards)
    _records(store)
    assert len(scans) == 2 and all(store.values_checked(s) for s in shards)
    _records(store)
    assert len(scans) == 2  # the same verified bytes: the same values, not scanned again
    # A shard whose values are bad (NaN, the manifest resealed to match) fails at every read.
    bad = make_shards(tmp_path / "bad", fmt, patients={"p1": 3})
    store = ShardStore(bad)
    shard = store.manifest.shards_of("train")[0]
    record = next(iter(store.records(shard)))
    image = record.image.copy()
    image[1, 0, 2, 2] = np.nan
    if fmt == "webdataset":
        import io

        from shards_spec.codec import encode_npy, iter_tar_records, member_limits, write_tar

        with open(bad / shard["path"], "rb") as handle:
            members = dict(iter_tar_records(handle, max_bytes=member_limits(3, 4, 16)))["p1"]
        members = {k: bytes(v) for k, v in members.items()} | {"image.npy": encode_npy(image)}
        buffer = io.BytesIO()
        write_tar(buffer, [("p1", members)])
        _rewrite(bad, shard["path"], buffer.getvalue())
    else:
        import zarr

        array = zarr.open_array(bad / "train/p1/image", mode="r+")
        array[...] = image
        _rewrite(bad, "train/p1/image/c/0/0/0/0", (bad / "train/p1/image/c/0/0/0/0").read_bytes())
    store = ShardStore(bad)
    for _ in range(2):
        with pytest.raises(SpecError, match="non-finite"):
            _records(store)
        assert not store.values_checked(store.manifest.shards_of("train")[0])
