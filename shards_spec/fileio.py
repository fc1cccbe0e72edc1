"""Atomic file output and file digests: the one home of both for the whole project.

Every file this project writes for a user (shards, manifests, plans, checkpoints, metrics,
reports, predictions) goes through `write_atomic` or `atomic_path`: the bytes go to a temporary
name in the target's folder, are flushed and fsynced, and only then renamed over the target, so
a crash, a full disk or a size limit leaves the old file or the new one, never half of one.
The temporary name ends in `TMP_SUFFIX`, which is how `etl` recognises (and removes) what a
crashed run left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".partial"
CHUNK = 1 << 20


def temporary_name(path: Path) -> Path:
    """A unique temporary sibling of `path` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write `path` through (by any library: torch, nibabel, ...);
    on success fsync it and rename it into place, on any exception remove it.

    `suffix` is appended to the temporary name for libraries that choose a format by extension
    (nibabel: `.nii.gz`). A refused write is re-raised as an `OSError` naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    if suffix:
        tmp = tmp.with_name(tmp.name + suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # name the target, not the temporary (an error without an errno stays as raised)
        if exc.errno is not None and (exc.filename is None or str(exc.filename) == str(tmp)):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (text is UTF-8) to `path` atomically and durably; see the module doc."""
    payload = data.encode() if isinstance(data, str) else data
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)
    return path


def sha256_file(path: str | Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


__all__ = ["TMP_SUFFIX", "atomic_path", "sha256_file", "temporary_name", "write_atomic"]
