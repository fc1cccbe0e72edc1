"""Reading a WebDataset shard: one tar (optionally gzip) of `<key>.image.npy|mask.npy|json`.

The tar is read member by member (`codec.iter_tar_records`, `tarstream`): each header's
declared size is bounded before any of its bytes are read, by `codec.member_limits` of the
largest record of this shard, and the whole (decompressed) stream by the bytes the shard's
records can need (`ShardStore.byte_limit`), so a gzip bomb stops there. Members are decoded
with the safe `.npy`/`.json` decoders.

A plain tar is read whole and verified first (`ShardStore.read_file`: size and sha256, once per
process for an unchanged local file), then parsed in memory: its arrays are views of that one
buffer, not copies, and their values are scanned only the first time these bytes are decoded
(`ShardStore.values_checked`). A `.tar.gz` is streamed through gzip, checked at its end.
"""

from __future__ import annotations

import gzip
import io
from typing import Iterator

from ..codec import Record, decode_record, iter_tar_records, member_limits
from ..errors import SpecError

READ_BUFFER = 1 << 20
"""1 MiB reads: 512-byte header reads straight from an HTTP stream would each be a round trip."""


def check_shard(shard: dict, patients: dict) -> str | None:
    """A WebDataset shard is one tar: its only file is the shard's own path."""
    if [f["path"] for f in shard["files"]] != [shard["path"]]:
        return f"shard {shard['path']} must list exactly its own tar as its file"
    return None


def records(store, shard: dict, expected: dict[str, str], name: str) -> Iterator[Record]:
    manifest = store.manifest
    patients = manifest.content["patients"]
    channels, size = len(manifest.channels), manifest.size
    largest = max((patients[pid]["slices"] for pid in expected.values()), default=0)
    limits = member_limits(largest, channels, size)
    if not shard["path"].endswith(".gz"):
        scan = not store.values_checked(shard)  # read_file verified the bytes before any is decoded
        archive = store.read_file(shard["files"][0])
        yield from _decoded(archive, expected, limits, store.byte_limit(shard), name, channels, size, scan)
        return
    with store.open_file(shard["path"], verify=True) as raw:
        buffered = io.BufferedReader(raw, READ_BUFFER) if isinstance(raw, io.RawIOBase) else raw
        try:
            yield from _decoded(gzip.GzipFile(fileobj=buffered, mode="rb"), expected, limits, store.byte_limit(shard),
                                name, channels, size, True)
            drain = getattr(raw, "drain", None)  # a streamed (not cached) file: padding and sha256
            if drain is not None:
                drain()
        except (OSError, EOFError) as exc:  # gzip errors
            raise SpecError(f"cannot be decompressed ({type(exc).__name__}: {exc})", name) from None


def _decoded(archive, expected: dict[str, str], limits: dict[str, int], max_total: int, name: str, channels: int,
             size: int, scan: bool) -> Iterator[Record]:
    count = 0
    for key, members in iter_tar_records(archive, max_bytes=limits, max_total=max_total, name=name):
        count += 1
        if count > len(expected):
            raise SpecError(f"holds more than the {len(expected)} records the manifest lists", name)
        yield decode_record(key, members, channels=channels, size=size, scan=scan)
