"""Reading a WebDataset shard: one tar (optionally gzip) of `<key>.image.npy|mask.npy|json`.

The tar is streamed member by member (`codec.iter_tar_records`, `tarstream`): each header's
declared size is bounded before any of its bytes are read, by `codec.member_limits` of the
largest record of this shard, and the whole (decompressed) stream by the bytes the shard's
records can need (`ShardStore.byte_limit`), so a gzip bomb stops there. Members are decoded
with the safe `.npy`/`.json` decoders.
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
    with store.open_file(shard["path"], verify=True) as raw:
        buffered = io.BufferedReader(raw, READ_BUFFER) if isinstance(raw, io.RawIOBase) else raw
        stream = gzip.GzipFile(fileobj=buffered, mode="rb") if shard["path"].endswith(".gz") else buffered
        count = 0
        try:
            for key, members in iter_tar_records(stream, max_bytes=limits, max_total=store.byte_limit(shard), name=name):
                count += 1
                if count > len(expected):
                    raise SpecError(f"holds more than the {len(expected)} records the manifest lists", name)
                yield decode_record(key, members, channels=channels, size=size)
            drain = getattr(raw, "drain", None)  # a streamed (not cached) file: padding and sha256
            if drain is not None:
                drain()
        except (OSError, EOFError) as exc:  # gzip errors
            raise SpecError(f"cannot be decompressed ({type(exc).__name__}: {exc})", name) from None
