"""The file entries (path, bytes, sha256) the manifest lists; atomic output is `shards_spec.fileio`."""

from __future__ import annotations

from pathlib import Path

from shards_spec.fileio import TMP_SUFFIX, sha256_file, write_atomic


def file_entry(root: Path, path: Path) -> dict:
    """The manifest's description of one written file, its path relative to the shard folder."""
    size, digest = sha256_file(path)
    return {"path": path.relative_to(root).as_posix(), "bytes": size, "sha256": digest}


__all__ = ["TMP_SUFFIX", "file_entry", "sha256_file", "write_atomic"]
