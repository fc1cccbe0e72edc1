"""The shard formats: one reader module per format, registered by name here.

A format is one module (or any object) with

- `records(store, shard, expected, name)`: an iterator of the decoded `Record`s of one manifest
  shard entry, checked against the manifest (`store` is the `ShardStore`; `expected` maps record
  key -> patient id; `name` is the shard's location for messages);
- optionally `check_shard(shard, patients)`: the format's file layout rules for one shard entry,
  run with the manifest's validation; the problem in words, or None.

Adding a format is that module plus one line in `READERS`; `FORMATS` is derived from it and is
the one list of format names (the manifest validation and the ETL's `--format` use it).
"""

from __future__ import annotations

from types import ModuleType

from . import webdataset, zarr

READERS: dict[str, ModuleType] = {
    "webdataset": webdataset,
    "zarr": zarr,
}
FORMATS: tuple[str, ...] = tuple(READERS)


def reader(fmt: str) -> ModuleType:
    """The reader of format `fmt` (validated manifests name a registered one)."""
    from ..errors import SpecError

    try:
        return READERS[fmt]
    except KeyError:
        raise SpecError(f"format {fmt!r} has no reader; known formats: {list(FORMATS)}") from None
