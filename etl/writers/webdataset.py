"""WebDataset shard writer: one uncompressed (or gzip) tar per shard, byte-reproducible.

Headers are normalised by `shards_spec.codec.write_tar` (fixed mtime, owner and mode; members in
record order), and the optional gzip stream is written with mtime 0 and no file name, so the same
records always give the same bytes. A shard's records are kept until `finish` and written as one
tar (a tar cannot be renamed into place member by member).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

from .base import ShardOutput, Writer
from .files import file_entry, write_atomic

COMPRESSIONS = ("none", "gz")
"""`--compress` values: the tar as is, or gzip-compressed (`.tar.gz`)."""


def shard_name(split: str, index: int, compression: str = "none") -> str:
    """`<split>/<split>-NNNNNN.tar[.gz]`: basenames unique across splits (webdataset caches by basename)."""
    suffix = ".tar.gz" if compression == "gz" else ".tar"
    return f"{split}/{split}-{index:06d}{suffix}"


def write_shard(root: Path, path: str, records: list[tuple], compression: str = "none") -> list[dict]:
    """Write `records` (key, patient id, slices) as the tar `root/path`; return its file entries."""
    from shards_spec.codec import encode_record, write_tar

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {compression!r}")
    buffer = io.BytesIO()
    write_tar(buffer, [(key, encode_record(patient, slices)) for key, patient, slices in records])
    data = buffer.getvalue()
    if compression == "gz":
        packed = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0, compresslevel=6) as stream:
            stream.write(data)
        data = packed.getvalue()
    target = root / path
    write_atomic(target, data)
    return [file_entry(root, target)]


class _TarOutput(ShardOutput):
    def __init__(self, root: Path, path: str, compression: str) -> None:
        self.root, self.path, self.compression = root, path, compression
        self.records: list[tuple] = []

    def add(self, key: str, patient: str, slices) -> None:
        self.records.append((key, patient, slices))

    def finish(self) -> list[dict]:
        if not self.records:  # every patient was skipped: no file
            return []
        return write_shard(self.root, self.path, self.records, self.compression)


class WebDatasetWriter(Writer):
    name = "webdataset"
    compressions = COMPRESSIONS

    def shard_path(self, split: str, index: int, compression: str) -> str:
        return shard_name(split, index, compression)

    def open_shard(self, root: Path, path: str, split: str, compression: str) -> ShardOutput:
        return _TarOutput(root, path, compression)


WRITER = WebDatasetWriter()
