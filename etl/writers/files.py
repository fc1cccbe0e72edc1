"""The file entries (path, bytes, sha256) the manifest lists, and a whole folder written atomically.

Single files go through `shards_spec.fileio` (`write_atomic`, `atomic_path`), the project's one
atomic write. A zarr patient group is a folder that the zarr library writes file by file, so it
is written under a temporary folder name, its files fsynced, and the folder renamed into place:
`atomic_folder`, built on the same temporary naming (`TMP_SUFFIX`, which the build's clean-up
recognises).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from shards_spec.fileio import TMP_SUFFIX, atomic_path, sha256_file, temporary_name, write_atomic


def file_entry(root: Path, path: Path) -> dict:
    """The manifest's description of one written file, its path relative to the shard folder."""
    size, digest = sha256_file(path)
    return {"path": path.relative_to(root).as_posix(), "bytes": size, "sha256": digest}


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success fsync its files and rename it over `path`
    (replacing a previous folder of that name), on any exception remove it."""
    tmp = temporary_name(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["TMP_SUFFIX", "atomic_folder", "atomic_path", "file_entry", "sha256_file", "temporary_name", "write_atomic"]
