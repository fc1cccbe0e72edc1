"""The shard formats: one reader module per format, registered by name here.

A format is one module exposing `records(store, shard, expected, name)`, an iterator of decoded
`Record`s of one manifest shard entry, checked against the manifest (`store` is the
`ShardStore`; `expected` maps record key -> patient id; `name` is the shard's location for
messages). Adding a format is that module plus one line in `READERS`; `FORMATS` is derived from
it and is the one list of format names (the manifest validation and the ETL's `--format` use it).
"""

from __future__ import annotations

from typing import Callable, Iterator

from ..codec import Record
from . import webdataset, zarr

Reader = Callable[..., Iterator[Record]]

READERS: dict[str, Reader] = {
    "webdataset": webdataset.records,
    "zarr": zarr.records,
}
FORMATS: tuple[str, ...] = tuple(READERS)


def reader(fmt: str) -> Reader:
    """The reader of format `fmt` (validated manifests name a registered one)."""
    from ..errors import SpecError

    try:
        return READERS[fmt]
    except KeyError:
        raise SpecError(f"format {fmt!r} has no reader; known formats: {list(FORMATS)}") from None
