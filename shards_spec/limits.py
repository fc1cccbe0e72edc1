"""The reader's limits: how big untrusted things may be and how long a remote read may take.

Every size a reader takes from an untrusted header (a manifest field, a tar or PAX header, an
`.npy` header, a zstd frame) is checked against a limit before anything is allocated or
decompressed. Most limits are derived from the manifest (a record's slices × channels × size² ×
dtype); the manifest's own numbers are bounded by the values below, so a lying manifest cannot
ask for more either. Each value can be changed through an environment variable, read when it is
used, so it also reaches loader workers and ranks:

| variable | default | what it bounds |
|---|---|---|
| `BRATS_SHARDS_MAX_MANIFEST_MB` | 64 | size of `manifest.json` (a 1,251-patient Zarr manifest is ~6 MB) |
| `BRATS_SHARDS_MAX_RECORD_MB` | 2048 | decoded bytes of one patient record (image + mask); BraTS at 240² is ~71 MB |
| `BRATS_SHARDS_MAX_SIZE` | 2048 | `preprocessing.size`, the slice side in pixels |
| `BRATS_SHARDS_MAX_SLICES` | 4096 | slices of one patient (the source depth) |
| `BRATS_SHARDS_CONNECT_TIMEOUT` | 10 | seconds to connect to a remote shard folder |
| `BRATS_SHARDS_READ_TIMEOUT` | 60 | seconds a remote read may stall (no byte received) |
| `BRATS_SHARDS_RETRIES` | 3 | further attempts after a failed remote open or read |
| `BRATS_SHARDS_BACKOFF` | 1 | seconds before the first retry, doubled each time |
"""

from __future__ import annotations

import os

from .errors import SpecError

ENV_PREFIX = "BRATS_SHARDS_"
DEFAULTS: dict[str, float] = {
    "MAX_MANIFEST_MB": 64,
    "MAX_RECORD_MB": 2048,
    "MAX_SIZE": 2048,
    "MAX_SLICES": 4096,
    "CONNECT_TIMEOUT": 10,
    "READ_TIMEOUT": 60,
    "RETRIES": 3,
    "BACKOFF": 1,
}
MAX_COUNT = 2**53
"""Largest count or byte size any manifest field may hold (exact in every JSON reader)."""
MAX_TAR_HEADER_BYTES = 64 << 10
"""A PAX extended header or GNU long name: ours write none; another writer's name fits in far less."""


def get(name: str, defaults: dict[str, float] = DEFAULTS) -> float:
    """The limit `name` (a key of `defaults`: the reader's `DEFAULTS`, or another stage's table
    such as `train.runfiles.checkpoint.LIMITS`), from `BRATS_SHARDS_<name>` when that is set."""
    variable = ENV_PREFIX + name
    text = os.environ.get(variable)
    if text is None or not text.strip():
        return defaults[name]
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise SpecError(f"environment variable {variable}={text!r} must be a number >= 0 (default {defaults[name]:g})")
    return value


def max_manifest_bytes() -> int:
    return int(get("MAX_MANIFEST_MB") * (1 << 20))


def max_record_bytes() -> int:
    return int(get("MAX_RECORD_MB") * (1 << 20))


def retries() -> int:
    return int(get("RETRIES"))
