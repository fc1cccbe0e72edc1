"""Untrusted shards through every reader: `etl verify`, `train run`, `train evaluate` (both
formats, a local folder and the same folder over HTTP), and `etl inspect`, which reads the
manifest only and must never decode a shard.

Each case tampers with the shard of patient p1 and then reseals the manifest (sizes and sha256
of the tampered files), as an attacker who controls both would, so the case reaches the decoder
rather than stopping at the checksum; `checksum_lie` is the one case left unsealed. Every reader
must exit non-zero with one line (verify: a head line and one line per problem) naming the shard
and the problem, with no traceback, and a pickle payload must never run (its marker file must
not exist afterwards).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.shard_fixtures import serve_range_http

from .helpers import (
    MARKER_ENV,
    assert_one_line,
    error_lines,
    load_manifest,
    pickle_payload,
    reseal,
    run_cli_inprocess,
    save_manifest,
)

P1_TAR = "train/train-000000.tar"


# ------------------------------------------------------------------------------- tar surgery


def _members(root: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(root / P1_TAR) as archive:
        return [(info, archive.extractfile(info).read()) for info in archive.getmembers()]


def _info(name: str, size: int, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _write(root: Path, members: list[tuple[tarfile.TarInfo, bytes]], fmt=tarfile.GNU_FORMAT) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    (root / P1_TAR).write_bytes(buffer.getvalue())


def _replace(root: Path, suffix: str, data: bytes | None = None, name: str | None = None) -> None:
    members = []
    for info, old in _members(root):
        if info.name == f"p1.{suffix}":
            new = old if data is None else data
            info = _info(name or info.name, len(new))
            old = new
        members.append((info, old))
    _write(root, members)


def _npy(array: np.ndarray, **kw) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kw)
    return buffer.getvalue()


def _image(root: Path) -> np.ndarray:
    return np.load(io.BytesIO(dict((i.name, d) for i, d in _members(root))["p1.image.npy"]), allow_pickle=False)


# Each webdataset case tampers with `root` and returns the words the error must hold.

def pickle_member(root, marker):
    members = _members(root)
    members.insert(2, (_info("p1.pyd", len(pickle_payload(marker))), pickle_payload(marker)))
    _write(root, members)
    return "p1.pyd"


def pickled_object_npy(root, marker):
    from .helpers import Payload

    array = np.empty(1, dtype=object)
    array[0] = Payload(str(marker))
    _replace(root, "image.npy", _npy(array, allow_pickle=True))
    return "dtype object"


def oversized_npy_header(root, marker):
    data = _npy(_image(root))
    header_len = int.from_bytes(data[8:10], "little")
    # 1100 bytes: over the decoder's 1024-byte limit, yet within the member's size limit (1152 + data)
    header = data[10:10 + header_len].rstrip(b"\n").ljust(1100 - 12, b" ") + b"\n"
    data = b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header + data[10 + header_len:]
    _replace(root, "image.npy", data)
    return "not a valid .npy"


def dotdot_name(root, marker):
    _replace(root, "json", name="../p1.json")
    return "'../p1.json'"


def absolute_name(root, marker):
    target = marker.parent / "written-by-tar" / "p1.json"
    _replace(root, "json", name=str(target))
    return "is not '<key>"


def slash_name(root, marker):
    _replace(root, "json", name="sub/p1.json")
    return "'sub/p1.json'"


def symlink_member(root, marker):
    members = [(m if m[0].name != "p1.json" else (_info("p1.json", 0, type=tarfile.SYMTYPE, linkname="/etc/passwd"), b""))
               for m in _members(root)]
    _write(root, members)
    return "not a regular file"


def hardlink_member(root, marker):
    members = [(m if m[0].name != "p1.json" else (_info("p1.json", 0, type=tarfile.LNKTYPE, linkname="p1.mask.npy"), b""))
               for m in _members(root)]
    _write(root, members)
    return "not a regular file"


def duplicate_key(root, marker):
    members = _members(root)
    _write(root, members + [(_info(i.name, len(d)), d) for i, d in members])
    return "twice"


def truncated_tar(root, marker):
    data = (root / P1_TAR).read_bytes()
    (root / P1_TAR).write_bytes(data[:4000])  # inside p1.image.npy (a cut in the zero padding is no cut)
    return "truncated|not a complete tar"


def dtype_differs(root, marker):
    _replace(root, "image.npy", _npy(_image(root).astype(np.int16)))  # same size: reaches the decoder
    return "dtype int16"


def dtype_and_size_differ(root, marker):
    _replace(root, "image.npy", _npy(_image(root).astype(np.float32)))  # refused by its size, unread
    return "declares"


def shape_differs(root, marker):
    _replace(root, "image.npy", _npy(_image(root)[:, :, :8, :8].copy()))
    return "shape"


def channels_differ(root, marker):
    _replace(root, "image.npy", _npy(_image(root)[:, :3].copy()))
    return "shape"


def label_out_of_range(root, marker):
    mask = np.load(io.BytesIO(dict((i.name, d) for i, d in _members(root))["p1.mask.npy"]))
    mask[0, 5, 5] = 7
    _replace(root, "mask.npy", _npy(mask))
    return "label 7"


def json_names_another_patient(root, marker):
    meta = json.loads(dict((i.name, d) for i, d in _members(root))["p1.json"])
    meta["patient"] = "p2"
    _replace(root, "json", json.dumps(meta).encode())
    return "names patient 'p2'"


def huge_declared_member(root, marker):
    members = []
    for info, data in _members(root):
        if info.name == "p1.json":  # claims 10 GB; a few bytes follow: refused from the header
            members.append((_info("p1.json", 10 ** 10), b""))
            break
        members.append((info, data))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members[:-1]:
            archive.addfile(info, io.BytesIO(data))
        buffer.write(members[-1][0].tobuf(format=tarfile.GNU_FORMAT) + b"{}" + b"\0" * 510)
    (root / P1_TAR).write_bytes(buffer.getvalue())
    return "declares 10000000000 bytes"


def extra_record(root, marker):
    members = _members(root)
    _write(root, members + [(_info("p9" + i.name[2:], len(d)), d) for i, d in members])
    return "more than the 1 records"


def count_lie(root, marker):
    content, provenance = load_manifest(root)
    content["patients"]["p1"]["slices"] += 1
    for shard in content["shards"]:
        if "p1" in shard["patients"]:
            shard["slices"] += 1
    content["splits"]["train"]["slices"] += 1
    save_manifest(root, content, provenance)
    return "holds 3 slices"


def checksum_lie(root, marker):
    data = bytearray((root / P1_TAR).read_bytes())
    data[1024 + 200] ^= 0x01
    (root / P1_TAR).write_bytes(bytes(data))
    return "sha256 differs"


WDS_CASES = [pickle_member, pickled_object_npy, oversized_npy_header, dotdot_name, absolute_name, slash_name,
             symlink_member, hardlink_member, duplicate_key, truncated_tar, dtype_differs, dtype_and_size_differ,
             shape_differs,
             channels_differ, label_out_of_range, json_names_another_patient, huge_declared_member, extra_record,
             count_lie, checksum_lie]


# ------------------------------------------------------------------------------- zarr cases

P1_ZARR = "train/p1"


def _edit_meta(root: Path, array: str, edit) -> None:
    path = root / P1_ZARR / array / "zarr.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def zarr_dtype_differs(root, marker):
    _edit_meta(root, "image", lambda m: m.update(data_type="float32"))
    return "dtype float32"


def zarr_shape_differs(root, marker):
    _edit_meta(root, "image", lambda m: m.update(shape=[3, 4, 8, 8]))
    return "shape"


def zarr_chunks_exceed_the_shape(root, marker):
    def edit(meta):
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [4096, 4, 16, 16]
    _edit_meta(root, "mask", edit) if False else _edit_meta(root, "image", edit)
    return "exceed|metadata cannot be read"


def zarr_corrupt_chunk(root, marker):
    chunk = next(p for p in (root / P1_ZARR / "image").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    for i in range(8, 40):
        data[i] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return "cannot be decoded"


def zarr_listed_file_missing(root, marker):
    chunk = next(p for p in (root / P1_ZARR / "mask").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    return "cannot be read"


def zarr_count_lie(root, marker):
    count_lie(root, marker)
    return "the manifest implies (4,"


def zarr_checksum_lie(root, marker):
    chunk = next(p for p in (root / P1_ZARR / "image").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[20] ^= 0x01
    chunk.write_bytes(bytes(data))
    return "sha256 differs"


ZARR_CASES = [zarr_dtype_differs, zarr_shape_differs, zarr_chunks_exceed_the_shape, zarr_corrupt_chunk,
              zarr_listed_file_missing, zarr_count_lie, zarr_checksum_lie]
UNSEALED = {checksum_lie, zarr_checksum_lie, zarr_listed_file_missing, count_lie, zarr_count_lie}

CASES = [("webdataset", c) for c in WDS_CASES] + [("zarr", c) for c in ZARR_CASES]
READERS = ["etl verify", "train run", "train evaluate"]


def _tampered(shards_copy, tmp_path, fmt, case):
    root = shards_copy(fmt)
    marker = tmp_path / "pwned"
    words = case(root, marker)
    if case not in UNSEALED:
        reseal(root)
    return root, marker, words


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(folder, base URL): one Range-capable HTTP server for the module (starting one per test
    would cost its shutdown poll each time); a test copies its shard folder under the folder."""
    folder = tmp_path_factory.mktemp("served")
    with serve_range_http(folder) as url:
        yield folder, url


def _read(reader: str, shards: str, tmp_path: Path, trained: Path, capsys) -> tuple[int, str, str]:
    if reader == "etl verify":
        return run_cli_inprocess("etl", ["verify", shards], capsys)
    if reader == "etl inspect":
        return run_cli_inprocess("etl", ["inspect", shards], capsys)
    if reader == "train run":
        from .conftest import TRAIN_ARGS

        return run_cli_inprocess("train", ["run", "--shards", shards, "--out", tmp_path / "run", *TRAIN_ARGS], capsys)
    return run_cli_inprocess("train", ["evaluate", "--checkpoint", trained / "checkpoints" / "best.pt", "--shards",
                                       shards, "--split", "train", "--workers", "0", "--device", "cpu"], capsys)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("fmt, case", CASES, ids=[f"{f}-{c.__name__}" for f, c in CASES])
def test_reader_refuses_tampered_shard(shards_copy, trained, served, tmp_path, capsys, monkeypatch, fmt, case,
                                       reader, where):
    root, marker, words = _tampered(shards_copy, tmp_path, fmt, case)
    monkeypatch.setenv(MARKER_ENV, str(marker))
    shard = P1_TAR if fmt == "webdataset" else "train/train-000000|train/p1/"  # a zarr shard or its file
    if where == "local":
        code, _, err = _read(reader, str(root), tmp_path, trained, capsys)
    else:
        folder, url = served
        shutil.copytree(root, folder / tmp_path.name, symlinks=True)
        code, _, err = _read(reader, f"{url}/{tmp_path.name}", tmp_path, trained, capsys)
    assert not marker.exists(), "a pickle payload ran"
    assert not (marker.parent / "written-by-tar").exists() and not (root.parent / "p1.json").exists()
    if reader == "etl verify":
        assert code != 0 and "Traceback" not in err, err
        message = "\n".join(error_lines(err))
        assert any(s in message for s in shard.split("|")), message
        assert any(w.lower() in message.lower() for w in words.split("|")), message
    else:
        assert_one_line(code, err, shard, words)


@pytest.mark.parametrize("fmt, case", [("webdataset", pickle_member), ("webdataset", pickled_object_npy),
                                       ("webdataset", huge_declared_member), ("zarr", zarr_corrupt_chunk)],
                         ids=lambda v: getattr(v, "__name__", v))
def test_inspect_reads_the_manifest_only(shards_copy, tmp_path, capsys, fmt, case):
    root, marker, _ = _tampered(shards_copy, tmp_path, fmt, case)
    code, out, err = run_cli_inprocess("etl", ["inspect", root], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "content digest" in out and not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("where", ["local", "http"])
def test_train_run_skip_policy_counts_the_bad_shard_each_epoch(shards_copy, served, tmp_path, capsys, monkeypatch,
                                                               workers, where):
    """`--on-bad-shard skip`: the run completes on the good shards, and after every epoch says how
    many shards and slices it left out, also when loader worker processes did the skipping."""
    from .conftest import TRAIN_ARGS

    root, marker, _ = _tampered(shards_copy, tmp_path, "webdataset", pickle_member)
    monkeypatch.setenv(MARKER_ENV, str(marker))
    shards = str(root)
    if where == "http":
        folder, url = served
        shutil.copytree(root, folder / tmp_path.name)
        shards = f"{url}/{tmp_path.name}"
    args = [a for a in TRAIN_ARGS if a not in ("--epochs", "1", "--workers", "0")]
    code, out, err = run_cli_inprocess("train", ["run", "--shards", shards, "--out", tmp_path / "run", *args,
                                                 "--epochs", "2", "--workers", str(workers), "--on-bad-shard", "skip"],
                                       capsys)
    assert code == 0 and "Traceback" not in err, err
    for epoch in (1, 2):  # p1 (3 slices) is the bad shard; nothing of val is bad
        assert (f"epoch {epoch}: skipped 1 bad shard(s) (3 slices): train 1 (3 slices), validation 0 (0 slices)"
                in err), err
    assert not marker.exists()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["on_bad_shard"] == "skip"
