"""Reading shards: the one home of it, for the trainer, `train evaluate` and `etl verify/inspect`.

`ShardStore(root)` reads a shard folder given as a local path or any fsspec URL (`http(s)://`,
`s3://`, `file://`). Everything it reads is untrusted and checked against the manifest, which is
read and validated first:

- every file is read as a stream, never more bytes than the manifest lists for it, and its
  sha256 is compared with the manifest's (before use with a `cache_dir`, otherwise at the end of
  the stream, before `records` returns for that shard); `read_file` reads a file whole and
  verifies it before returning any byte;
- a local file (or a cached copy) is hashed once per `ShardStore` (so once per process and
  loader worker), not at every epoch: its identity and change times (device, inode, size, mtime,
  ctime) when its bytes matched are remembered, and a later read of the file with the same
  identity and times skips the hash. Any write to a file changes its ctime, which no program can
  set back; a file changed less than `RECENT_CHANGE_S` before it was hashed is not remembered,
  since a second write within one tick of the file system's clock could leave its times equal
  (git's "racily clean" files). Remote files without a cache are hashed at every read;
- records are decoded by the reader of the manifest's format (`shards_spec.formats`: one module
  per format, e.g. `formats/webdataset.py`, `formats/zarr.py`, registered in `READERS`);
- each shard's patients, records, slices and tumour slices must equal the manifest's counts,
  because epoch lengths and DDP batch counts are computed from them up front; any error while
  decoding a shard is a `SpecError` naming it, so a caller's bad-shard policy sees them all;
- the values (labels <= 3, a finite image) are scanned the first time a shard's bytes are
  decoded; once they passed, bytes verified equal to the manifest's again are the same values,
  and a reader may skip the scan (`values_checked`).

Local files are opened only when they are regular files (a FIFO in place of a shard or of
`manifest.json` blocked `verify` forever). Remote files get timeouts and retries
(`shards_spec.remote`); the limits on sizes, times and attempts are in `shards_spec.limits`.
`root` may also name the manifest itself (`shards/manifest.json`).

With `cache_dir`, each file is fetched once into `cache_dir/<sha256[:2]>/<sha256>` (keyed by
content, so equal basenames in different folders never collide) and validated by sha256 before
it is used (once per store while unchanged, as a local file); a cached copy that no longer matches
is discarded and fetched again, and a fetched copy that does not match is refused with a
`SpecError` naming the file.

fsspec and numcodecs are imported inside the functions that need them, so `shards_spec` stays light.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from . import formats, limits, remote
from .checked_io import CHUNK, CheckedReader, open_regular
from .codec import Record, member_limits
from .errors import SpecError
from .fileio import atomic_path
from .manifest import MANIFEST_NAME, Manifest, parse

FILE_OVERHEAD_BYTES = 64 << 10
"""Allowance per listed file over the raw array bytes (tar headers, zarr metadata, codec framing)."""
RECENT_CHANGE_S = 2.0
"""A file whose ctime is less than this before its hash began is hashed again at its next read
(file system timestamps are coarse: a second write within one tick leaves them unchanged)."""


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def shard_root(root: str | Path) -> str:
    """The shard folder of what a user typed: the folder, a `file://` URL of it, or its manifest."""
    text = str(root)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_url(text):
        return text[: -len(MANIFEST_NAME) - 1] if text.rstrip("/").endswith("/" + MANIFEST_NAME) else text
    path = Path(text)
    if path.name == MANIFEST_NAME and not path.is_dir():
        return str(path.parent)
    return text


def parse_storage_options(pairs: list[str] | tuple[str, ...] | None) -> dict:
    """`--storage-option KEY=VALUE` (repeatable) -> fsspec keyword arguments for a shard URL.

    VALUE is read as JSON when it parses (`anon=true`, `default_block_size=1048576`,
    `client_kwargs={"region_name": "eu-west-1"}`), else kept as text
    (`endpoint_url=http://minio.lab:9000`). They go to the URL's filesystem (s3fs for `s3://`,
    `HTTPFileSystem` for `http(s)://`) on top of fsspec's own configuration (`FSSPEC_S3_ENDPOINT_URL`
    style environment variables or `~/.config/fsspec/*.json`) and the library's defaults (the
    `AWS_*` variables and `~/.aws/` for s3fs). Nothing here is written to a run's files: they may
    hold credentials.
    """
    import json

    options: dict = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SpecError(f"--storage-option: expected KEY=VALUE (e.g. endpoint_url=http://host:9000), got {pair!r}")
        try:
            options[key] = json.loads(value)
        except (ValueError, RecursionError):
            options[key] = value
    return options


class ShardStore:
    """A shard folder (local path or fsspec URL) with its validated manifest.

    `manifest` is read and validated on construction; any problem (missing file, bad JSON,
    unknown spec version, a wrong field) is a `SpecError` naming the manifest.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        cache_dir: str | Path | None = None,
        storage_options: dict | None = None,
    ) -> None:
        self.root = shard_root(root)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.storage_options = dict(storage_options or {})
        self._fs = None
        self._fs_pid = 0
        self._base = self.root.rstrip("/") if is_url(self.root) else None
        self._verified: dict[str, tuple] = {}  # local path -> (stat identity, sha256) when its bytes matched
        self._values_checked: set[str] = set()  # shard paths whose bytes passed every value check
        name = self.location(MANIFEST_NAME)
        self.manifest: Manifest = parse(self._read_manifest(name), name)
        self._entries = {f["path"]: f for s in self.manifest.content["shards"] for f in s["files"]}

    def __getstate__(self) -> dict:
        # Loader workers get a copy; each opens its own filesystem (fsspec sessions are per process).
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    # -- files ----------------------------------------------------------------------------------

    def location(self, rel_path: str) -> str:
        """The full path or URL of a file inside the shard folder (for messages)."""
        if self._base is not None:
            return f"{self._base}/{rel_path}"
        return str(Path(self.root) / rel_path)

    def _read_manifest(self, name: str) -> bytes:
        """The manifest's bytes, at most the limit; a missing folder or manifest said plainly."""
        limit = limits.max_manifest_bytes()
        if self._base is None:
            folder = Path(self.root)
            if not folder.exists():
                raise SpecError("does not exist", folder)
            if not folder.is_dir():
                raise SpecError("is not a shard folder (give the folder that holds manifest.json)", folder)
            if not (folder / MANIFEST_NAME).exists():
                raise SpecError("has no manifest.json: it is not a shard folder, or its build has not finished", folder)

        def read() -> bytes:
            with self._open_raw(MANIFEST_NAME) as handle:
                return handle.read(limit + 1)

        try:
            data = read() if self._base is None else remote.with_retries(read, name)
        except FileNotFoundError:
            raise SpecError(f"not found: is {self.root} a shard folder?", name) from None
        except (OSError, ValueError) as exc:  # aiohttp errors as OSError
            raise SpecError(f"cannot be read ({remote.describe(exc)})", name) from None
        if len(data) > limit:
            raise SpecError(f"is larger than {limit} bytes (BRATS_SHARDS_MAX_MANIFEST_MB)", name)
        return data

    def _filesystem(self):
        # A forked loader worker inherits this object without pickling, and fsspec's async
        # filesystems are not fork-safe: each process opens its own.
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, self._fs_root = remote.open_filesystem(self._base, self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def _open_raw(self, rel_path: str, size: int | None = None) -> BinaryIO:
        if self._base is None:
            return open_regular(Path(self.root) / rel_path)
        fs = self._filesystem()
        path = f"{self._fs_root.rstrip('/')}/{rel_path}"
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol in ("http", "https"):
            # A plain streamed GET, no Range needed; a known size spares fsspec's HEAD request.
            return fs.open(path, "rb", block_size=0, size=size or None)
        return fs.open(path, "rb")

    def open_file(self, rel_path: str, *, verify: bool = False) -> BinaryIO:
        """A stream of one file of the shard folder.

        A file the manifest lists is never read past its listed size. With `verify`, its size and
        sha256 are checked when the stream reaches its end (a `SpecError` naming the file; read
        to the end, e.g. with `drain()`, to be sure the check ran). With a `cache_dir`, the file
        is served from the cache, fetched and verified there first if needed, so `verify` is
        implied and the check has happened before this returns.
        """
        entry = self._entries.get(rel_path)
        if entry is None:
            name = self.location(rel_path)
            if verify or self.cache_dir is not None:
                raise SpecError("is not listed in the manifest, so it cannot be verified", name)
            try:
                return self._open_raw(rel_path) if self._base is None else remote.with_retries(
                    lambda: self._open_raw(rel_path), name)
            except (OSError, ValueError) as exc:
                raise SpecError(f"cannot be read ({remote.describe(exc)})", name) from None
        if self.cache_dir is not None:
            return open_regular(self._cached(entry)[0])
        return self._stream(entry, verify=verify)

    def _cached(self, entry: dict, read: bool = False) -> tuple[Path, memoryview | None]:
        """Path of a verified cached copy of `entry`, fetched (again) when missing or changed, and
        with `read` its verified content."""
        digest = entry["sha256"]
        target = self.cache_dir / digest[:2] / digest
        if target.exists():
            try:
                return target, self._read_local(target, entry, str(target), keep=read)
            except SpecError as exc:
                problem = exc.problem
            except OSError as exc:
                problem = f"cannot be read ({remote.describe(exc)})"
            warnings.warn(f"cached copy {target} of {entry['path']} {problem}: fetching it again", stacklevel=3)
            target.unlink(missing_ok=True)
        # atomic_path's temporary name is unique: several loader workers or ranks may fetch one file at once
        with atomic_path(target) as tmp:
            with self._stream(entry, verify=True) as source, open(tmp, "wb") as out:
                while chunk := source.read(CHUNK):
                    out.write(chunk)
                source.drain()
        return target, self._read_local(target, entry, str(target), keep=read) if read else None

    def _read_local(self, path: Path, entry: dict, name: str, keep: bool = True) -> memoryview | None:
        """The whole content of a local file (with `keep`), after its size and sha256 matched
        `entry`; a file this store verified before and whose identity and times are unchanged is
        not hashed again (module doc). Raises `SpecError` naming the file."""
        started = time.time_ns()
        try:
            with open_regular(path) as handle:
                before = _identity(os.fstat(handle.fileno()))
                if before[2] != entry["bytes"]:
                    raise SpecError(f"holds {before[2]} bytes, the manifest lists {entry['bytes']}", name)
                data = _buffer(entry["bytes"])
                view, got = data, 0
                while got < len(data) and (n := handle.readinto(view[got:])):
                    got += n
                if got != len(data) or handle.read(1):
                    raise SpecError("changed while it was being read (its size differs)", name)
                after = _identity(os.fstat(handle.fileno()))
        except OSError as exc:
            raise SpecError(f"cannot be read ({remote.describe(exc)})", name) from None
        key = str(path)
        if after == before and self._verified.get(key) == (after, entry["sha256"]):
            return data if keep else None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SpecError("sha256 differs from the manifest (corrupt or changed file)", name)
        if after == before and started - after[4] > RECENT_CHANGE_S * 1e9:
            self._verified[key] = (after, entry["sha256"])
        return data if keep else None

    def _stream(self, entry: dict, *, verify: bool) -> CheckedReader:
        """The file of `entry` from the source, bounded by its size, sha256-checked with `verify`."""
        name = self.location(entry["path"])
        reopen = None if self._base is None else (lambda: self._open_raw(entry["path"], entry["bytes"]))
        try:
            raw = self._open_raw(entry["path"]) if reopen is None else remote.with_retries(reopen, name)
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot be read ({remote.describe(exc)})", name) from None
        return CheckedReader(raw, size=entry["bytes"], sha256=entry["sha256"] if verify else None, name=name,
                              reopen=reopen)

    def read_file(self, entry: dict) -> memoryview:
        """The whole content of one listed file, its size and sha256 checked before it returns.

        A local file, or a cached copy, verified by this store before and unchanged since (module
        doc) is read without hashing it again; a remote file without a cache is streamed and
        hashed every time."""
        if self.cache_dir is not None:
            return self._cached(entry, read=True)[1]
        if self._base is None:
            return self._read_local(Path(self.root) / entry["path"], entry, self.location(entry["path"]))
        data = _buffer(entry["bytes"])
        view, got = data, 0
        with self._stream(entry, verify=True) as handle:
            while got < len(data) and (n := handle.readinto(view[got:])):
                got += n
            handle.drain()  # a short file fails here, naming its size
        return data

    def values_checked(self, shard: dict) -> bool:
        """Whether the bytes the manifest lists for `shard` have passed every value check in this
        store (one complete `records` pass): bytes verified equal to them need no second scan."""
        return shard["path"] in self._values_checked

    def verify_file(self, entry: dict) -> str | None:
        """Size and sha256 check of one manifest file entry: the problem in words, or None."""
        try:
            with self._stream(entry, verify=True) as handle:
                handle.drain()
        except SpecError as exc:
            return str(exc)
        except OSError as exc:
            return f"{self.location(entry['path'])}: cannot be read ({remote.describe(exc)})"
        return None

    # -- records --------------------------------------------------------------------------------

    def records(self, shard: dict) -> Iterator[Record]:
        """Decode every record of one manifest shard entry, checked against the manifest.

        Raises `SpecError` naming the shard on anything wrong: a file that differs from the
        manifest, an undecodable or oversized member, a dtype or shape other than the manifest's,
        or counts (patients, records, slices, tumour slices) other than the manifest's. Without a
        `cache_dir` a tar is streamed and its sha256 is known only at its end, so a consumer that
        must not use bytes of a corrupt file should collect a shard's records before using them
        (`ShardDataset` does).
        """
        name = self.location(shard["path"])
        expected = self._expected_patients(shard, name)
        limit = self.byte_limit(shard)
        listed = sum(f["bytes"] for f in shard["files"])
        if listed > limit:
            raise SpecError(f"lists {listed} bytes, more than its {shard['slices']} slices can need ({limit})", name)
        reader = formats.reader(self.manifest.format)
        seen: dict[str, int] = {}
        slices = 0
        try:
            for record in reader.records(self, shard, expected, name):
                pid = self._check_record(record, expected, seen, name)
                seen[pid] = record.slices
                slices += record.slices
                yield record
        except SpecError as exc:
            if exc.path is None:
                raise SpecError(exc.problem, name) from None
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is a bad shard
            # (numpy, zarr, zlib, ... raise their own types); chained, so --debug shows where.
            raise SpecError(f"cannot be decoded ({remote.describe(exc)})", name) from exc
        missing = [pid for pid in expected.values() if pid not in seen]
        if missing:
            raise SpecError(f"lacks the record(s) of patient(s) {missing} that the manifest lists", name)
        if len(seen) != shard["records"] or slices != shard["slices"]:
            raise SpecError(
                f"holds {len(seen)} records and {slices} slices, the manifest says {shard['records']} and {shard['slices']}",
                name,
            )
        self._values_checked.add(shard["path"])

    def _expected_patients(self, shard: dict, name: str) -> dict[str, str]:
        """Record key -> patient id of the patients the manifest places in this shard."""
        patients = self.manifest.content["patients"]
        expected: dict[str, str] = {}
        for pid in shard["patients"]:
            info = patients.get(pid)
            if info is None or info["shard"] != shard["path"]:
                raise SpecError(f"manifest lists patient {pid!r} in this shard but content.patients does not agree", name)
            if info["key"] in expected:
                raise SpecError(f"manifest gives two patients the record key {info['key']!r}", name)
            expected[info["key"]] = pid
        if len(expected) != shard["records"]:
            raise SpecError(f"manifest says {shard['records']} records but lists {len(expected)} patients", name)
        return expected

    def _check_record(self, record: Record, expected: dict[str, str], seen: dict[str, int], name: str) -> str:
        pid = expected.get(record.key)
        if pid is None:
            raise SpecError(f"holds record {record.key!r}, which the manifest does not place in this shard", name)
        if pid in seen:
            raise SpecError(f"holds record {record.key!r} twice", name)
        if record.patient != pid:
            raise SpecError(f"record {record.key!r} names patient {record.patient!r}, the manifest {pid!r}", name)
        info = self.manifest.content["patients"][pid]
        tumour = int(np.count_nonzero(record.mask.reshape(record.slices, -1).any(axis=1)))
        if record.slices != info["slices"] or tumour != info["tumour_slices"]:
            raise SpecError(
                f"record {record.key!r} holds {record.slices} slices ({tumour} with tumour), the manifest says "
                f"{info['slices']} ({info['tumour_slices']})",
                name,
            )
        return pid

    def byte_limit(self, shard: dict) -> int:
        """Most bytes a shard's files can take for the slices it holds (compressed or not)."""
        channels, size = len(self.manifest.channels), self.manifest.size
        patients = self.manifest.content["patients"]
        total = 0
        for pid in shard["patients"]:
            limits = member_limits(patients[pid]["slices"], channels, size)
            total += sum(limits.values()) + 3 * 512 + 64 * patients[pid]["slices"]
        return total + FILE_OVERHEAD_BYTES * len(shard["files"])


def _identity(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file is replaced or written: device, inode, size, mtime, ctime (ns)."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _buffer(size: int) -> memoryview:
    """A writable buffer of `size` bytes, not zero-filled first (`bytearray(size)` writes every byte
    once before the file is read over them)."""
    return memoryview(np.empty(size, dtype=np.uint8))
