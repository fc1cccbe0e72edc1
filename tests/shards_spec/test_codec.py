import io
import pickle
import tarfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shards_spec.codec import (
    IMAGE_DTYPE,
    MASK_DTYPE,
    decode_json,
    decode_npy,
    decode_record,
    encode_json,
    encode_npy,
    encode_record,
    iter_tar_records,
    member_limits,
    write_tar,
)
from shards_spec.errors import SpecError
from shards_spec.preprocess import Slices


def _slices(n=3, c=4, size=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, 4, size=(n, size, size)).astype(np.uint8)
    return Slices(
        image=rng.normal(size=(n, c, size, size)).astype(np.float16),
        mask=mask,
        slice_index=list(range(10, 10 + n)),
        class_voxels=[np.bincount(m.ravel(), minlength=4).tolist() for m in mask],
        brain_voxels=[size * size] * n,
    )


def _tar(records, **overrides):
    buffer = io.BytesIO()
    write_tar(buffer, records)
    buffer.seek(0)
    return buffer


LIMITS = member_limits(3, 4, 8)


def test_record_round_trip():
    slices = _slices()
    members = encode_record("BraTS20_Training_001", slices)
    rec = decode_record("BraTS20_Training_001", members, channels=4, size=8)
    np.testing.assert_array_equal(rec.image, slices.image)
    np.testing.assert_array_equal(rec.mask, slices.mask)
    assert rec.patient == "BraTS20_Training_001" and rec.slice_index == [10, 11, 12]


def test_tar_round_trip_and_reproducible_bytes():
    records = [("p1", encode_record("p1", _slices(seed=1))), ("p2", encode_record("p2", _slices(seed=2)))]
    first, second = _tar(records).getvalue(), _tar(records).getvalue()
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as archive:
        infos = archive.getmembers()
        assert [i.name for i in infos][:3] == ["p1.image.npy", "p1.mask.npy", "p1.json"]
        assert {(i.mtime, i.uid, i.gid, i.uname, i.gname) for i in infos} == {(0, 0, 0, "", "")}
    keys = [k for k, _ in iter_tar_records(io.BytesIO(first), max_bytes=LIMITS)]
    assert keys == ["p1", "p2"]


def test_pickled_object_array_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    array = np.empty(1, dtype=object)
    array[0] = Payload()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    with pytest.raises(SpecError, match="dtype"):
        decode_npy(buffer.getvalue(), dtype=IMAGE_DTYPE, ndim=1)
    assert not marker.exists()
    with pytest.raises(SpecError, match="pickle"):
        encode_npy(array)


def test_raw_pickle_bytes_are_not_npy(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(SpecError, match="not a valid .npy"):
        decode_npy(pickle.dumps(Payload()), dtype=IMAGE_DTYPE, ndim=4)
    assert not marker.exists()


def test_wrong_dtype_shape_and_length_are_refused():
    data = encode_npy(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(SpecError, match="dtype"):
        decode_npy(data, dtype=IMAGE_DTYPE, ndim=2)
    with pytest.raises(SpecError, match="dimensions"):
        decode_npy(encode_npy(np.zeros((2, 3), dtype=np.float16)), dtype=IMAGE_DTYPE, ndim=4)
    good = encode_npy(np.zeros((2, 3), dtype=np.float16))
    with pytest.raises(SpecError, match="data bytes"):
        decode_npy(good[:-1], dtype=IMAGE_DTYPE, ndim=2)


def test_oversized_npy_header_is_refused():
    header = b"{'descr': '<f2', 'fortran_order': False, 'shape': (1,), 'pad': '" + b"x" * 5000 + b"'}"
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00\x00"
    with pytest.raises(SpecError, match="not a valid .npy"):
        decode_npy(data, dtype=IMAGE_DTYPE, ndim=1)


def test_record_whose_arrays_disagree_is_refused():
    members = encode_record("p1", _slices())
    members["mask.npy"] = encode_npy(np.zeros((2, 8, 8), dtype=MASK_DTYPE))
    with pytest.raises(SpecError, match="mask shape"):
        decode_record("p1", members, channels=4, size=8)
    members = encode_record("p1", _slices())
    with pytest.raises(SpecError, match=r"p1.image.npy has shape \(3, 4, 8, 8\), the manifest implies \(S, 2, 8, 8\)"):
        decode_record("p1", members, channels=2, size=8)


def _raw_tar(entries):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _info(name, size=0, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info


@pytest.mark.parametrize("name", ["../evil.json", "/abs/p.json", "dir/p1.json", "p.1.json", "p1.pyd", "p1.pth"])
def test_unsafe_or_unknown_member_names_are_refused(name, tmp_path):
    data = _raw_tar([(_info(name, 2), b"{}")])
    with pytest.raises(SpecError, match="not '<key>"):
        list(iter_tar_records(io.BytesIO(data), max_bytes=LIMITS, name="s.tar"))
    assert list(tmp_path.iterdir()) == []


def test_links_duplicates_huge_and_truncated_members_are_refused():
    link = _raw_tar([(_info("p1.json", 0, tarfile.SYMTYPE), None)])
    with pytest.raises(SpecError, match="not a regular file"):
        list(iter_tar_records(io.BytesIO(link), max_bytes=LIMITS))
    dup = _raw_tar([(_info("p1.json", 2), b"{}"), (_info("p2.json", 2), b"{}"), (_info("p1.json", 2), b"{}")])
    with pytest.raises(SpecError, match="appears twice"):
        list(iter_tar_records(io.BytesIO(dup), max_bytes=LIMITS))
    # A header declaring 1 TB: refused from the header, before any read.
    huge = bytearray(_raw_tar([(_info("p1.image.npy", 10), b"0123456789")]))
    info = tarfile.TarInfo("p1.image.npy")
    info.size = 10**12
    huge[:512] = info.tobuf(format=tarfile.GNU_FORMAT)[:512]
    with pytest.raises(SpecError, match="more than"):
        list(iter_tar_records(io.BytesIO(bytes(huge)), max_bytes=LIMITS))
    whole = _tar([("p1", encode_record("p1", _slices()))]).getvalue()
    with pytest.raises(SpecError, match="s.tar"):
        list(iter_tar_records(io.BytesIO(whole[:1500]), max_bytes=LIMITS, name="s.tar"))


def test_json_limits():
    assert decode_json(encode_json({"a": [1, 2]}), max_bytes=100) == {"a": [1, 2]}
    with pytest.raises(SpecError, match="more than"):
        decode_json(b"{}" + b" " * 200, max_bytes=100)
    with pytest.raises(SpecError, match="not a JSON object"):
        decode_json(b"[1]", max_bytes=100)
    with pytest.raises(SpecError, match="not valid JSON"):
        decode_json(b"[" * 100000, max_bytes=10**6)


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=400))
def test_fuzz_npy_decoder_gives_an_array_or_spec_error(data):
    try:
        out = decode_npy(data, dtype=IMAGE_DTYPE, ndim=2)
    except SpecError:
        return
    assert out.dtype == IMAGE_DTYPE and out.ndim == 2


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=400).map(lambda tail: encode_npy(np.zeros((2, 2), np.float16))[:64] + tail))
def test_fuzz_npy_after_a_valid_header(data):
    try:
        decode_npy(data, dtype=IMAGE_DTYPE, ndim=2)
    except SpecError:
        pass


@settings(deadline=None, max_examples=200)
@given(st.binary(max_size=2000))
def test_fuzz_tar_reader_gives_records_or_spec_error(data):
    try:
        for _key, members in iter_tar_records(io.BytesIO(data), max_bytes=LIMITS):
            assert set(members) <= {"image.npy", "mask.npy", "json"}
    except SpecError:
        pass


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=300))
def test_fuzz_json_decoder(data):
    try:
        assert isinstance(decode_json(data, max_bytes=1000), dict)
    except SpecError:
        pass


def _outcome(source, max_total=20000):
    """Records (key -> {suffix: bytes}) a tar source gives, or the message it is refused with."""
    try:
        return [(key, {s: bytes(v) for s, v in members.items()})
                for key, members in iter_tar_records(source, max_bytes=LIMITS, max_total=max_total, name="s.tar")]
    except SpecError as exc:
        return str(exc)


def test_an_archive_in_memory_reads_and_fails_as_the_stream_does():
    whole = _tar([("p1", encode_record("p1", _slices())), ("p2", encode_record("p2", _slices(seed=1)))]).getvalue()
    cases = {"whole": (whole, 20000), "truncated in a member": (whole[:1500], 20000),
             "truncated in a header": (whole[:2 * 512 + 100], 20000), "over max_total": (whole, 3000),
             "garbage": (bytes(range(256)) * 4, 20000)}
    for label, (data, max_total) in cases.items():
        assert _outcome(io.BytesIO(data), max_total) == _outcome(bytearray(data), max_total), label
    assert [key for key, _ in _outcome(bytearray(whole))] == ["p1", "p2"]  # the control reads
    assert "truncated" in _outcome(bytearray(whole[:1500])) and "more than the 3000" in _outcome(bytearray(whole), 3000)


@settings(deadline=None, max_examples=200)
@given(st.binary(max_size=2000))
def test_fuzz_tar_reader_in_memory_agrees_with_the_stream(data):
    assert _outcome(bytearray(data)) == _outcome(io.BytesIO(data))


def test_npy_in_a_writable_buffer_is_used_in_place_and_bytes_are_copied():
    array = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    data = bytearray(encode_npy(array))
    shared = decode_npy(memoryview(data)[:], dtype=IMAGE_DTYPE, ndim=3)
    assert np.array_equal(shared, array) and np.shares_memory(shared, np.frombuffer(data, np.uint8))
    copied = decode_npy(bytes(data), dtype=IMAGE_DTYPE, ndim=3)
    assert np.array_equal(copied, array) and copied.flags.writeable


def test_nonfinite_scan_matches_isfinite_on_every_float16_and_can_be_skipped():
    from shards_spec.codec import _has_nonfinite_float16, build_record

    every = np.arange(65536, dtype=np.uint16).view(np.float16)
    assert [_has_nonfinite_float16(every[i:i + 1]) for i in range(65536)] == (~np.isfinite(every)).tolist()
    slices = _slices()
    bad = slices.image.copy()
    bad[1, 2, 3, 4] = np.nan
    meta = {"patient": "p1", "slice_index": slices.slice_index, "class_voxels": slices.class_voxels,
            "brain_voxels": slices.brain_voxels}
    with pytest.raises(SpecError, match="non-finite"):
        build_record("p1", bad, slices.mask, meta, channels=4, size=8)
    assert build_record("p1", bad, slices.mask, meta, channels=4, size=8, scan=False).slices == 3
    build_record("p1", slices.image, slices.mask, meta, channels=4, size=8)  # the control passes the scan
