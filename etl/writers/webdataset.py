"""WebDataset shard writer: one uncompressed (or gzip) tar per shard, byte-reproducible.

Headers are normalised by `shards_spec.codec.write_tar` (fixed mtime, owner and mode; members in
record order), and the optional gzip stream is written with mtime 0 and no file name, so the same
records always give the same bytes.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

from shards_spec.codec import encode_record, write_tar
from shards_spec.preprocess import Slices

from .files import file_entry, write_atomic

COMPRESSIONS = ("none", "gz")


def shard_name(split: str, index: int, compression: str = "none") -> str:
    """`<split>/<split>-NNNNNN.tar[.gz]`: basenames unique across splits (webdataset caches by basename)."""
    suffix = ".tar.gz" if compression == "gz" else ".tar"
    return f"{split}/{split}-{index:06d}{suffix}"


def write_shard(root: Path, path: str, records: list[tuple[str, str, Slices]], compression: str = "none") -> list[dict]:
    """Write `records` (key, patient id, slices) as the tar `root/path`; return its file entries."""
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
