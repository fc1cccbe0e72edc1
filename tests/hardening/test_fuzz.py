"""Property-based fuzzing one level above tests/shards_spec/test_codec.py (which fuzzes the
`.npy`, JSON and tar decoders on raw bytes): `decode_record` on arbitrary member dicts, and
`ShardStore.records` on a resealed shard folder whose tar is built from fuzzed members or has
fuzzed bytes. Every example must give checked records or a `SpecError`, never another exception,
and stay within a small memory bound (tracemalloc sees numpy's allocations), so a lying header
cannot make the reader allocate what it declares.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from shards_spec.codec import IMAGE_DTYPE, MASK_DTYPE, decode_record, encode_record
from shards_spec.errors import SpecError
from shards_spec.read import ShardStore
from tests.shard_fixtures import make_shards, patient_slices

from .helpers import reseal

SIZE, CHANNELS = 16, 4
MEMORY_BOUND = 8 << 20  # bytes: a record here is ~10 KiB; a declared 10 GB must never be allocated
VALID = encode_record("p1", patient_slices(0, 3, SIZE, CHANNELS, 2))
SUFFIXES = ("image.npy", "mask.npy", "json")


def _mutated(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["keep", "flip", "cut", "grow", "random"]))
    if kind == "keep":
        return data
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "cut":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "grow":
        return data + draw(st.binary(min_size=1, max_size=64))
    buffer = bytearray(data)
    for offset, value in draw(st.lists(st.tuples(st.integers(0, max(len(buffer) - 1, 0)), st.integers(0, 255)),
                                       min_size=1, max_size=8)):
        if buffer:
            buffer[offset] = value
    return bytes(buffer)


@st.composite
def member_dicts(draw):
    suffixes = draw(st.sets(st.sampled_from(SUFFIXES)))
    return {s: _mutated(VALID[s], draw) for s in suffixes}


def _bounded(call):
    tracemalloc.start()
    try:
        return call()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MEMORY_BOUND, peak


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(member_dicts())
def test_fuzz_decode_record_gives_a_checked_record_or_spec_error(members):
    try:
        record = _bounded(lambda: decode_record("p1", members, channels=CHANNELS, size=SIZE))
    except SpecError:
        return
    assert record.image.dtype == IMAGE_DTYPE and record.mask.dtype == MASK_DTYPE
    assert record.image.shape[1:] == (CHANNELS, SIZE, SIZE) and record.mask.shape == (record.slices, SIZE, SIZE)
    assert np.isfinite(record.image).all() and int(record.mask.max(initial=0)) <= 3


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("fuzz"), "webdataset", patients={"p1": 3, "p2": 2},
                       splits={"train": ["p1"], "val": ["p2"]}, size=SIZE, channels=CHANNELS)


NAMES = ["p1.image.npy", "p1.mask.npy", "p1.json", "p1.pyd", "p1.pth", "../p1.json", "/p1.json", "a/p1.json",
         "p2.json", "p1", "p1.image.npy.gz", "p.1.json"]


@st.composite
def fuzzed_tars(draw):
    if draw(st.booleans()):  # members: names and contents fuzzed, headers well formed
        members = draw(st.lists(st.tuples(st.one_of(st.sampled_from(NAMES), st.text(min_size=1, max_size=30)),
                                          st.sampled_from(SUFFIXES)), max_size=6))
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
            for name, suffix in members:
                data = _mutated(VALID[suffix], draw)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.type = draw(st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.SYMTYPE, tarfile.LNKTYPE,
                                                                          tarfile.DIRTYPE, tarfile.FIFOTYPE]))
                archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
        return buffer.getvalue()
    good = io.BytesIO()  # a valid tar with fuzzed bytes (headers included)
    with tarfile.open(fileobj=good, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for suffix in SUFFIXES:
            info = tarfile.TarInfo(f"p1.{suffix}")
            info.size = len(VALID[suffix])
            archive.addfile(info, io.BytesIO(VALID[suffix]))
    return _mutated(good.getvalue(), draw)


@pytest.mark.slow
@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=fuzzed_tars())
def test_fuzz_shard_store_over_a_fuzzed_tar(template, tmp_path, data):
    root = tmp_path / "shards"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root)
    (root / "train" / "train-000000.tar").write_bytes(data)
    reseal(root)
    store = ShardStore(root)
    shard = store.manifest.shards_of("train")[0]
    try:
        records = _bounded(lambda: list(store.records(shard)))
    except SpecError as exc:
        assert "train-000000.tar" in str(exc) and "\n" not in str(exc)
        return
    assert [r.patient for r in records] == ["p1"] and records[0].slices == 3
