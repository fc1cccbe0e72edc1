"""Atomic file output and the file entries (path, bytes, sha256) the manifest lists."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TMP_SUFFIX = ".partial"
CHUNK = 1 << 20


def sha256_file(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def file_entry(root: Path, path: Path) -> dict:
    """The manifest's description of one written file, its path relative to the shard folder."""
    size, digest = sha256_file(path)
    return {"path": path.relative_to(root).as_posix(), "bytes": size, "sha256": digest}


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes under a temporary name, fsync, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or a size limit: no partial file, and the error names the file
        tmp.unlink(missing_ok=True)
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
