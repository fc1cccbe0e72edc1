"""Shard writers, one module per format, registered by name (the reading side is `shards_spec.formats`).

A format is a module holding a `Writer` subclass (see `base.py` for what it provides) and one
line in `WRITERS`. Format names are defined once, by the readers' registry
(`shards_spec.formats.FORMATS`): a format the tool writes must be one it can read, which
`check_registries` asserts (at import, and in the tests).
"""

from __future__ import annotations

from shards_spec.errors import ToolError
from shards_spec.formats import FORMATS

from . import webdataset, zarr
from .base import ShardOutput, Writer

WRITERS: dict[str, Writer] = {
    "webdataset": webdataset.WRITER,
    "zarr": zarr.WRITER,
}


def compressions() -> tuple[str, ...]:
    """Every `--compress` value some format accepts, in registry order."""
    return tuple(dict.fromkeys(c for w in WRITERS.values() for c in w.compressions))


def writer(fmt: str) -> Writer:
    """The writer of format `fmt`, or a ToolError naming the formats there are."""
    try:
        return WRITERS[fmt]
    except KeyError:
        raise ToolError(f"--format must be one of {', '.join(WRITERS)}, got {fmt!r}") from None


def check_registries() -> None:
    """Every writer is registered under its own name, and every format read has a writer."""
    for name, registered in WRITERS.items():
        if registered.name != name:
            raise RuntimeError(f"writer {type(registered).__name__} is registered as {name!r} but named {registered.name!r}")
    missing = [fmt for fmt in FORMATS if fmt not in WRITERS]
    if missing:
        raise RuntimeError(f"shard format(s) {missing} have a reader (shards_spec.formats) but no writer (etl.writers)")


check_registries()

__all__ = ["WRITERS", "ShardOutput", "Writer", "check_registries", "compressions", "writer"]
