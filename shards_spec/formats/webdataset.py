"""Reading a WebDataset shard: one tar (optionally gzip) of `<key>.image.npy|mask.npy|json`.

The tar is streamed member by member (`codec.iter_tar_records`); each member's declared size is
bounded by `codec.member_limits` before any of its bytes are read, and decoded with the safe
`.npy`/`.json` decoders.
"""

from __future__ import annotations

import gzip
from typing import Iterator

from ..codec import Record, decode_record, iter_tar_records, member_limits
from ..errors import SpecError


def records(store, shard: dict, expected: dict[str, str], name: str) -> Iterator[Record]:
    manifest = store.manifest
    if len(shard["files"]) != 1 or shard["files"][0]["path"] != shard["path"]:
        raise SpecError("a WebDataset shard must list exactly its own tar as its file", name)
    limits = member_limits(manifest.max_record_slices(), len(manifest.channels), manifest.size)
    with store.open_file(shard["path"], verify=True) as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if shard["path"].endswith(".gz") else raw
        count = 0
        try:
            for key, members in iter_tar_records(stream, max_bytes=limits, name=name):
                count += 1
                if count > len(expected):
                    raise SpecError(f"holds more than the {len(expected)} records the manifest lists", name)
                yield decode_record(key, members, channels=len(manifest.channels), size=manifest.size)
            drain = getattr(raw, "drain", None)  # a streamed (not cached) file: padding and sha256
            if drain is not None:
                drain()
        except (OSError, EOFError) as exc:  # gzip errors
            raise SpecError(f"cannot be decompressed ({type(exc).__name__}: {exc})", name) from None
