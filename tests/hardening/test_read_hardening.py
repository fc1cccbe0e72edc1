"""Reading hostile shard folders, as an attacker who controls the shards and the manifest would
(issue 12): memory bombs (class 4), header arithmetic (class 6), hangs (class 8), a missing
fsspec backend, and the messages a new user meets first.

Memory is measured as the peak RSS of a real `etl verify` process (`os.wait4` gives that child's
own rusage) and compared with the same command on the good folder. Time is bounded by a fake
server that stalls, and by a subprocess timeout that fails the test instead of hanging it; no
test asserts a wall-clock duration.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import socket
import struct
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from .helpers import (
    RSS_MARGIN_MB,
    assert_one_line,
    error_lines,
    load_manifest,
    reseal,
    run_cli_inprocess,
    run_measured,
    save_manifest,
)

P1_TAR = "train/train-000000.tar"
P1_IMAGE_SHARD = "train/p1/image/c/0/0/0/0"
MB = 1 << 20
def _npy_header(shape: tuple, descr: str = "<f2") -> bytes:
    """An `.npy` version 1.0 header for any shape, with no data."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    total = -(-(10 + len(text) + 1) // 64) * 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", total - 10) + text.ljust(total - 11).encode() + b"\n"


def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(path) as archive:
        return [(info.name, archive.extractfile(info).read()) for info in archive.getmembers()]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _rename_shard(root: Path, old: str, new: str) -> None:
    """Move a WebDataset shard to a new path in the folder and in the manifest (sealed later)."""
    (root / old).rename(root / new)
    content, provenance = load_manifest(root)
    for shard in content["shards"]:
        if shard["path"] == old:
            shard["path"] = new
            shard["files"][0]["path"] = new
    for info in content["patients"].values():
        if info["shard"] == old:
            info["shard"] = new
    save_manifest(root, content, provenance)


# ------------------------------------------------------------------------ class 4: memory bombs


def pax_bomb(root: Path, declared: int = 1 << 30) -> str:
    """p1's shard becomes a ~1 MB `.tar.gz` whose first header is a PAX extended header declaring
    (and holding) `declared` bytes of zeros: gzip members of 1 MiB of zeros are ~1 KB each."""
    import tarfile

    rest = _tar(_tar_members(root / P1_TAR))  # the real records after the bomb: never reached
    gz = P1_TAR + ".gz"
    _rename_shard(root, P1_TAR, gz)

    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, declared
    record = b"30 path=p1.image.npy\n"
    first = info.tobuf(format=tarfile.USTAR_FORMAT) + record + b"\0" * (MB - len(record))
    zeros = gzip.compress(b"\0" * MB, mtime=0)
    (root / gz).write_bytes(gzip.compress(first, mtime=0) + zeros * (declared // MB - 1)
                            + gzip.compress(rest, mtime=0))
    reseal(root)
    return gz


def _zstd_rle_frame(declared: int) -> bytes:
    """A zstd frame declaring `declared` content bytes and holding them as RLE blocks of zeros
    (4 bytes per 128 KiB): 2 GiB in 64 KB."""
    out = bytearray(b"\x28\xb5\x2f\xfd") + bytes([3 << 6 | 1 << 5]) + struct.pack("<Q", declared)
    block, left = 1 << 17, declared
    while left:
        n = min(block, left)
        left -= n
        out += ((1 if not left else 0) | 1 << 1 | n << 3).to_bytes(3, "little") + b"\0"
    return bytes(out)


def zstd_bomb(root: Path, declared: int = 2 << 30) -> str:
    """p1's image array: its first inner chunk becomes a zstd frame declaring `declared` bytes,
    with a correct shard index and crc32c (zarr's sharding layout), so plain zarr would decode it."""
    import json

    import google_crc32c

    path = root / P1_IMAGE_SHARD
    meta = json.loads((path.parents[4] / "zarr.json").read_text())
    outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
    inner = meta["codecs"][0]["configuration"]["chunk_shape"]
    count = int(np.prod([-(-o // i) for o, i in zip(outer, inner)]))
    original = path.read_bytes()
    index = original[-(16 * count + 4):-4]  # (offset, nbytes) little-endian uint64 per inner chunk
    assert original[-4:] == struct.pack("<I", google_crc32c.value(index)), "the shard index layout assumed here"
    pairs = np.frombuffer(index, dtype="<u8").reshape(count, 2).tolist()
    chunks = [_zstd_rle_frame(declared)] + [original[o:o + n] for o, n in pairs[1:]]
    offsets = np.cumsum([0] + [len(c) for c in chunks[:-1]]).tolist()
    index = b"".join(struct.pack("<QQ", o, len(c)) for o, c in zip(offsets, chunks))
    path.write_bytes(b"".join(chunks) + index + struct.pack("<I", google_crc32c.value(index)))
    reseal(root)
    return P1_IMAGE_SHARD


@pytest.fixture
def keep(tmp_path):
    """fmt -> a shard folder to tamper with, and an untouched copy at `tmp_path/keep`. Records of
    50 slices of 64 x 64 (1.8 MB), so that a 1 MB bomb is within the bytes the manifest may list
    for the shard and reaches the decoder."""
    from tests.shard_fixtures import make_shards

    def make(fmt: str) -> Path:
        made = make_shards(tmp_path / "made", fmt, patients={"p1": 50, "p2": 4, "p3": 3}, size=64,
                           splits={"train": ["p1", "p2"], "val": ["p3"]})
        if fmt == "zarr":  # list the group metadata as the ETL does, so verify finds no stray files
            content, provenance = load_manifest(made)
            content["zarr_groups"] = [{"path": p, "bytes": (made / p).stat().st_size,
                                       "sha256": hashlib.sha256((made / p).read_bytes()).hexdigest()}
                                      for p in ("zarr.json", "train/zarr.json", "val/zarr.json")]
            save_manifest(made, content, provenance)
        shutil.copytree(made, tmp_path / "keep")
        return made

    return make


@pytest.mark.slow
@pytest.mark.parametrize("fmt, bomb, words", [("webdataset", pax_bomb, "PAX extended header declares 1073741824"),
                                              ("zarr", zstd_bomb, "zstd frame declares 2147483648")],
                         ids=["gzip-tar-pax-1GiB", "zarr-zstd-2GiB"])
def test_verify_of_a_bomb_stays_within_100_mb_of_a_good_folder(keep, tmp_path, fmt, bomb, words):
    root = keep(fmt)
    code, err, good_mb = run_measured("etl", ["verify", tmp_path / "keep"])
    assert code == 0, err
    bad_file = bomb(root)
    assert (root / bad_file).stat().st_size < 2 * MB  # a small file ...
    code, err, bomb_mb = run_measured("etl", ["verify", root])
    assert code == 2 and "Traceback" not in err, err
    message = "\n".join(error_lines(err))
    assert "1 bad shard(s)" in message and bad_file.split("/c/")[0] in message and words in message, message
    assert bomb_mb < good_mb + RSS_MARGIN_MB, f"peak RSS {bomb_mb:.0f} MB, good folder {good_mb:.0f} MB"


@pytest.mark.slow
@pytest.mark.parametrize("fmt, bomb, words", [("webdataset", pax_bomb, "PAX extended header"),
                                              ("zarr", zstd_bomb, "zstd frame declares")], ids=["pax", "zstd"])
def test_train_run_refuses_a_bomb_in_one_line_or_skips_it(keep, tmp_path, capsys, fmt, bomb, words):
    from .conftest import TRAIN_ARGS

    root = keep(fmt)
    bomb(root)
    code, _, err = run_cli_inprocess("train", ["run", "--shards", root, "--out", tmp_path / "run", *TRAIN_ARGS], capsys)
    assert_one_line(code, err, "train/", words)
    code, _, err = run_cli_inprocess("train", ["run", "--shards", root, "--out", tmp_path / "run2", *TRAIN_ARGS,
                                               "--on-bad-shard", "skip"], capsys)
    assert code == 0 and "skipped 1 bad shard(s) (50 slices)" in err, err


def test_tar_member_and_pax_sizes_are_checked_before_reading(tmp_path):
    """The decoder itself: a PAX header, a GNU long name and a member, each declaring more than
    allowed, are refused from their header; the stream's total is capped."""
    import tarfile

    from shards_spec.codec import iter_tar_records, member_limits
    from shards_spec.errors import SpecError

    limits = member_limits(2, 4, 8)
    for kind, size, words in ((tarfile.XHDTYPE, 1 << 30, "PAX extended header declares 1073741824"),
                              (tarfile.GNUTYPE_LONGNAME, 1 << 30, "GNU long name declares 1073741824"),
                              (tarfile.REGTYPE, limits["json"] + 1, f"declares {limits['json'] + 1} bytes")):
        info = tarfile.TarInfo("p1.json")
        info.type, info.size = kind, size
        data = info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024  # far less than declared follows
        with pytest.raises(SpecError, match=words):
            list(iter_tar_records(io.BytesIO(data), max_bytes=limits, name="s.tar"))
    whole = _tar([("p1.json", b"{}"), ("p2.json", b"{}")])
    with pytest.raises(SpecError, match="more than the 1536 bytes its records can need"):
        list(iter_tar_records(io.BytesIO(whole), max_bytes=limits, max_total=1536, name="s.tar"))


# --------------------------------------------------------------------- class 6: header arithmetic


def _replace_image(root: Path, data: bytes) -> None:
    members = [(name, data if name == "p1.image.npy" else old) for name, old in _tar_members(root / P1_TAR)]
    (root / P1_TAR).write_bytes(_tar(members))
    reseal(root)


HEADERS = {
    "overflow-to-zero": ((2**32, 2**32, 1, 1), "has shape (4294967296, 4294967296, 1, 1), the manifest implies (S, 4, 16, 16)"),
    "slices-overflow": ((2**62, 4, 16, 16), "its header (4611686018427387904, 4, 16, 16) needs"),
    "wrong-slice-shape": ((3, 4, 16, 8), "the manifest implies (S, 4, 16, 16)"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_npy_header_shapes_are_checked_before_use(shards_copy, tmp_path, capsys, case):
    from .conftest import TRAIN_ARGS

    shape, words = HEADERS[case]
    root = shards_copy("webdataset")
    _replace_image(root, _npy_header(shape))
    code, _, err = run_cli_inprocess("etl", ["verify", root], capsys)
    assert code == 2 and "Traceback" not in err and words in "\n".join(error_lines(err)), err
    code, _, err = run_cli_inprocess("train", ["run", "--shards", root, "--out", tmp_path / "run", *TRAIN_ARGS], capsys)
    assert_one_line(code, err, P1_TAR, words)
    code, _, err = run_cli_inprocess("train", ["run", "--shards", root, "--out", tmp_path / "skip", *TRAIN_ARGS,
                                               "--on-bad-shard", "skip"], capsys)
    assert code == 0 and "skipped 1 bad shard(s) (3 slices)" in err, err


def test_any_decoder_failure_goes_through_the_bad_shard_policy(shards_copy, monkeypatch):
    """An error type no check anticipated (here numpy's own, injected) is still a bad shard."""
    from shards_spec.errors import SpecError
    from shards_spec.formats import webdataset
    from shards_spec.read import ShardStore

    root = shards_copy("webdataset")
    monkeypatch.setattr(webdataset, "decode_record", lambda *a, **k: np.zeros(0).reshape(2))
    store = ShardStore(root)
    shard = store.manifest.shards_of("train")[0]
    with pytest.raises(SpecError, match=rf"{P1_TAR}: cannot be decoded \(ValueError: cannot reshape"):
        list(store.records(shard))


# ---------------------------------------------------------------------------- class 8: hangs


def _not_regular(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)  # a device that streams forever


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("target", ["manifest.json", P1_TAR])
def test_a_fifo_or_device_in_place_of_a_file_is_refused_not_waited_on(shards_copy, tmp_path, kind, target):
    root = shards_copy("webdataset")
    _not_regular(root / target, kind)
    words = "is a FIFO, not a regular file" if kind == "fifo" else "is a device or socket, not a regular file"
    commands = [["verify", root], ["inspect", root]] if target == "manifest.json" else [["verify", root]]
    for args in commands:
        code, err, _ = run_measured("etl", args, timeout=120)
        assert code == 2 and "Traceback" not in err, err
        assert f"{target}: {words}: refused" in "\n".join(error_lines(err)), err
    if target != "manifest.json":
        from .conftest import TRAIN_ARGS

        code, err, _ = run_measured("train", ["run", "--shards", root, "--out", tmp_path / "run", *TRAIN_ARGS],
                                    timeout=240)
        assert_one_line(code, err, target, words)


class _Stalling(BaseHTTPRequestHandler):
    """Serves a folder; the file named `stall` stalls mid-body or before answering, or drops the
    connection mid-body on its first request only (`mode`). Counts GETs per path."""

    folder: Path
    stall: str
    mode: str
    release: threading.Event
    gets: dict

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self.gets[self.path] = self.gets.get(self.path, 0) + 1
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = self.folder / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        stalls = body and self.path == "/" + self.stall
        if stalls and self.mode == "before-headers":
            self.release.wait(120)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        if stalls and self.mode == "mid-body":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.release.wait(120)
            return
        if stalls and self.mode == "drop-once" and self.gets[self.path] == 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)


@contextmanager
def stalling_server(folder: Path, stall: str, mode: str):
    release = threading.Event()
    handler = type("Handler", (_Stalling,), {"folder": folder, "stall": stall, "mode": mode, "release": release,
                                             "gets": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.gets
    finally:
        release.set()
        server.shutdown()
        server.server_close()


FAST = {"BRATS_SHARDS_READ_TIMEOUT": "1", "BRATS_SHARDS_CONNECT_TIMEOUT": "2", "BRATS_SHARDS_RETRIES": "2",
        "BRATS_SHARDS_BACKOFF": "0.1"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mid-body", "before-headers"])
def test_a_stalling_server_times_out_retries_then_says_so_in_one_line(shards_copy, mode):
    root = shards_copy("webdataset")
    with stalling_server(root, P1_TAR, mode) as (url, gets):
        code, err, _ = run_measured("etl", ["verify", url], env=FAST, timeout=120)
    assert code == 2 and "Traceback" not in err, err
    message = "\n".join(error_lines(err))
    assert f"1 bad shard(s): {P1_TAR}" in message, message
    assert f"{url}/{P1_TAR}: cannot be read" in message and "timed out (connect 2 s, read 1 s)" in message, message
    assert "gave up after 3 attempt(s)" in message and "BRATS_SHARDS_RETRIES" in message, message
    assert gets[f"/{P1_TAR}"] == 3  # the first attempt and two retries, then verify moves on


@pytest.mark.slow
def test_a_dropped_connection_is_retried_and_the_read_resumes(shards_copy):
    root = shards_copy("webdataset")
    with stalling_server(root, P1_TAR, "drop-once") as (url, gets):
        code, err, _ = run_measured("etl", ["verify", url], env=FAST, timeout=120)
    assert code == 0, err
    assert gets[f"/{P1_TAR}"] >= 2


def test_timeouts_reach_the_http_and_s3_filesystems_unless_the_user_sets_their_own(monkeypatch):
    import aiohttp

    from shards_spec.remote import with_timeouts

    monkeypatch.setenv("BRATS_SHARDS_READ_TIMEOUT", "7")
    timeout = with_timeouts("https", {})["client_kwargs"]["timeout"]
    assert (timeout.sock_read, timeout.connect, timeout.total) == (7, 10, None)
    mine = aiohttp.ClientTimeout(total=5)
    assert with_timeouts("http", {"client_kwargs": {"timeout": mine}})["client_kwargs"]["timeout"] is mine
    assert with_timeouts("s3", {"config_kwargs": {"read_timeout": 3}})["config_kwargs"] == {
        "read_timeout": 3, "connect_timeout": 10}
    monkeypatch.setenv("BRATS_SHARDS_RETRIES", "many")
    from shards_spec import limits
    from shards_spec.errors import SpecError

    with pytest.raises(SpecError, match="BRATS_SHARDS_RETRIES='many' must be a number >= 0"):
        limits.retries()


# ------------------------------------------------------------------- missing fsspec backends


@pytest.fixture
def without_backends(tmp_path):
    """PYTHONPATH shadowing s3fs and gcsfs with modules that fail to import, as when not installed."""
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for package in ("s3fs", "gcsfs"):
        (fakes / f"{package}.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{package}'\", name='{package}')\n")
    return {"PYTHONPATH": str(fakes)}


@pytest.mark.slow
@pytest.mark.parametrize("command, url, package, extra", [
    (["etl", "verify"], "s3://lab/brats-shards", "s3fs", "brats-shards[s3]"),
    (["etl", "inspect"], "gs://lab/brats-shards", "gcsfs", "brats-shards[gcs]"),
    (["train", "run", "--shards"], "s3://lab/brats-shards", "s3fs", "brats-shards[s3]"),
])
def test_a_url_whose_backend_is_missing_names_the_package_in_one_line(without_backends, tmp_path, command, url,
                                                                      package, extra):
    from .conftest import TRAIN_ARGS

    args = [*command[1:], url] + (["--out", tmp_path / "run", *TRAIN_ARGS] if command[0] == "train" else [])
    code, err, _ = run_measured(command[0], args, env=without_backends, timeout=120)
    line = assert_one_line(code, err, url.split("://")[0] + "://", f"needs the package {package}", extra)
    assert code == 2, line


def test_an_unknown_protocol_is_one_line(capsys):
    code, _, err = run_cli_inprocess("etl", ["inspect", "nosuch://lab/brats-shards"], capsys)
    assert_one_line(code, err, "nosuch://lab/brats-shards", "Protocol not known: nosuch")


# ------------------------------------------------------------------------- misleading messages


def test_a_missing_or_empty_folder_is_named_for_what_it_is(tmp_path, capsys):
    from .conftest import TRAIN_ARGS

    missing = tmp_path / "no-such-shards"
    for tool, args in (("etl", ["verify", missing]), ("etl", ["inspect", missing]),
                       ("train", ["run", "--shards", missing, "--out", tmp_path / "run", *TRAIN_ARGS])):
        code, _, err = run_cli_inprocess(tool, args, capsys)
        line = assert_one_line(code, err, f"{missing}: does not exist")
        assert "manifest.json" not in line
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli_inprocess("etl", ["inspect", empty], capsys)
    assert_one_line(code, err, f"{empty}: has no manifest.json")


def test_the_manifest_path_itself_is_accepted_as_the_folder(shards_copy, capsys):
    root = shards_copy("zarr")
    _, by_folder, _ = run_cli_inprocess("etl", ["inspect", root], capsys)
    code, by_manifest, err = run_cli_inprocess("etl", ["inspect", root / "manifest.json"], capsys)
    assert code == 0, err
    digest = hashlib.sha256(json_content(root)).hexdigest()
    assert f"content digest {digest}" in by_manifest and by_manifest == by_folder
    (root / "train" / "stray.bin").write_bytes(b"x")  # verify still checks the folder for strays
    code, _, err = run_cli_inprocess("etl", ["verify", root / "manifest.json"], capsys)
    assert code == 2 and "train/stray.bin: is not listed in the manifest" in err, err


def json_content(root: Path) -> bytes:
    """The canonical JSON of the manifest's content (its digest's input, computed here independently)."""
    import json

    content = json.loads((root / "manifest.json").read_text())["content"]
    return json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def test_manifest_and_record_sizes_have_limits_that_an_option_changes(shards_copy, monkeypatch, capsys):
    """The manifest's own size and the decoded bytes it may ask of a record are bounded too; the
    environment variables the README documents move the bounds."""
    root = shards_copy("webdataset")
    size = (root / "manifest.json").stat().st_size
    monkeypatch.setenv("BRATS_SHARDS_MAX_MANIFEST_MB", str((size - 1) / MB))
    code, _, err = run_cli_inprocess("etl", ["inspect", root], capsys)
    assert_one_line(code, err, "manifest.json: is larger than", "BRATS_SHARDS_MAX_MANIFEST_MB")
    monkeypatch.setenv("BRATS_SHARDS_MAX_MANIFEST_MB", str(size / MB))
    record = 4 * (4 * 16 * 16 * 2 + 16 * 16)  # p2: 4 slices of 4 channels, 16 x 16, float16 image + uint8 mask
    monkeypatch.setenv("BRATS_SHARDS_MAX_RECORD_MB", str((record - 1) / MB))
    code, _, err = run_cli_inprocess("etl", ["inspect", root], capsys)
    assert_one_line(code, err, "content.patients['p2'].slices", "exceed the record limit", "BRATS_SHARDS_MAX_RECORD_MB")
    monkeypatch.setenv("BRATS_SHARDS_MAX_RECORD_MB", str(record / MB))
    code, _, err = run_cli_inprocess("etl", ["inspect", root], capsys)
    assert code == 0, err
