"""Our safe decoding inside a user's own pipeline built with the real `webdataset` library:
values equal plain webdataset + numpy on good shards; pickles, `.pth`, `.npy.gz`, object arrays
and oversized members are refused (or skipped under webdataset's own error handlers), and a
pickle payload never runs."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from shards_spec.errors import SpecError
from shards_spec.read import ShardStore
from shards_spec.webdataset_pipeline import SafeDecoder, record_samples, shard_urls
from tests.hardening.helpers import Payload, pickle_payload, reseal
from tests.shard_fixtures import make_shards

PATIENTS = {"p1": 3, "p2": 4, "p3": 2}


@pytest.fixture
def shards(tmp_path) -> Path:
    return make_shards(tmp_path, "webdataset", patients=PATIENTS)


def _reference(urls: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Plain webdataset reading and numpy decoding (trusted good shards only)."""
    out = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        out[sample["__key__"]] = (np.load(io.BytesIO(sample["image.npy"])), np.load(io.BytesIO(sample["mask.npy"])))
    return out


def _add_member(path: Path, name: str, data: bytes) -> None:
    """Insert a member after the first record member (same key, so webdataset puts it in the sample)."""
    with tarfile.open(path) as archive:
        members = [(info, archive.extractfile(info).read()) for info in archive.getmembers()]
    info = tarfile.TarInfo(name)
    info.size = len(data)
    members.insert(1, (info, data))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for member, content in members:
            archive.addfile(member, io.BytesIO(content))
    path.write_bytes(buffer.getvalue())


def test_record_samples_in_a_data_pipeline_equal_plain_webdataset(shards):
    store = ShardStore(shards)
    urls = shard_urls(store, "train")
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), record_samples(store))
    samples = {s["__key__"]: s for s in pipeline}
    reference = _reference(urls)
    assert sorted(samples) == sorted(reference) == sorted(PATIENTS)
    for key, (image, mask) in reference.items():
        assert samples[key]["image.npy"].dtype == np.float16 and np.array_equal(samples[key]["image.npy"], image)
        assert np.array_equal(samples[key]["mask.npy"], mask)
        assert samples[key]["json"]["patient"] == key and len(samples[key]["json"]["slice_index"]) == PATIENTS[key]


def test_record_samples_skips_or_raises_on_a_bad_shard_by_webdatasets_handler(shards, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    _add_member(shards / "train" / "train-000000.tar", "p1.pyd", pickle_payload(marker))
    reseal(shards)  # sizes and sha256 match: only the content checks can refuse it
    store = ShardStore(shards)
    urls = shard_urls(store, "train")
    kept = [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(urls),
                                                   record_samples(store, handler=wds.ignore_and_continue))]
    assert kept == ["p2", "p3"] and not marker.exists()
    with pytest.raises(SpecError, match=r"train-000000.tar: tar member 'p1.pyd' is not"):
        list(wds.DataPipeline(wds.SimpleShardList(urls), record_samples(store)))
    with pytest.raises(SpecError, match="is not a shard of this dataset's manifest"):
        list(record_samples(store)([str(shards / "elsewhere.tar")]))
    assert not marker.exists()


def test_safe_decoder_after_webdatasets_own_reading_equals_plain_decoding(shards):
    store = ShardStore(shards)
    urls = shard_urls(store, "train")
    decoder = SafeDecoder(store.manifest)
    decoded = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).map(decoder)}
    for key, (image, mask) in _reference(urls).items():
        assert np.array_equal(decoded[key]["image.npy"], image) and np.array_equal(decoded[key]["mask.npy"], mask)
    handled = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode(decoder.handler, pre=[], post=[])))
    assert np.array_equal(handled["image.npy"], decoded["p1"]["image.npy"]) and handled["json"]["patient"] == "p1"


def _object_npy(marker: Path) -> bytes:
    array = np.empty(1, dtype=object)
    array[0] = Payload(str(marker))
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


MALICIOUS = {
    "p1.pyd": (lambda marker: pickle_payload(marker), "pyd' is never decoded"),
    "p1.pickle": (lambda marker: pickle_payload(marker), "pickle' is never decoded"),
    "p1.pth": (lambda marker: pickle_payload(marker), "pth' is never decoded"),
    "p1.extra.npy.gz": (lambda marker: b"\x1f\x8b" + b"\0" * 64, "extra.npy.gz' is never decoded"),
}


@pytest.mark.parametrize("member", list(MALICIOUS))
def test_safe_decoder_refuses_other_members_and_never_unpickles(shards, tmp_path, member):
    marker = tmp_path / "pwned"
    make, words = MALICIOUS[member]
    tar = shards / "train" / "train-000000.tar"
    _add_member(tar, member, make(marker))
    decoder = SafeDecoder(ShardStore(shards).manifest)
    with pytest.raises(SpecError, match=words):
        list(wds.WebDataset([str(tar)], shardshuffle=False).map(decoder))
    with pytest.raises(Exception) as info:  # webdataset wraps it in its DecodingError
        list(wds.WebDataset([str(tar)], shardshuffle=False).decode(decoder.handler, pre=[], post=[]))
    assert isinstance(info.value.__cause__, SpecError) and re.search(words, str(info.value.__cause__))
    skipped = list(wds.WebDataset([str(tar)], shardshuffle=False).map(decoder, handler=wds.ignore_and_continue))
    assert skipped == []  # the one record of this shard carried the member
    selected = list(wds.WebDataset([str(tar)], shardshuffle=False, select_files=decoder.select).map(decoder))
    assert [s["__key__"] for s in selected] == ["p1"] and member not in selected[0]  # never even read
    assert not marker.exists()


def test_safe_decoder_refuses_pickled_arrays_and_oversized_members(shards, tmp_path):
    marker = tmp_path / "pwned"
    store = ShardStore(shards)
    decoder = SafeDecoder(store.manifest)
    sample = next(iter(wds.WebDataset(shard_urls(store, "train")[:1], shardshuffle=False)))
    with pytest.raises(SpecError, match="dtype object"):
        decoder({**sample, "image.npy": _object_npy(marker)})
    limit = decoder.limits["mask.npy"]
    with pytest.raises(SpecError, match=f"more than the {limit} the manifest allows"):
        decoder({**sample, "mask.npy": b"\0" * (limit + 1)})
    with pytest.raises(SpecError, match="not raw bytes"):
        decoder({**sample, "json": {"patient": "p1"}})
    assert not marker.exists()
