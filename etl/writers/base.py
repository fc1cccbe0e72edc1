"""What a shard format is on the writing side: the interface every writer implements.

The orchestrator never asks which format it writes; it asks the format's writer (`etl.writers`
registry) for the few things that differ between formats:

* `shard_path`  where shard number `index` of a split goes (the plan lists these paths);
* `open_shard`  a `ShardOutput` that takes the shard's patients one at a time (`add`) and, on
                `finish`, returns the manifest's entries (path, bytes, sha256) of every file it wrote;
* `patient_fields`  per-patient manifest fields that locate the patient inside its shard;
* `write_root` / `root_key`  files written once per build outside any shard, and the content
                key that lists them (zarr's group metadata: `zarr_groups`); `finish_root` rewrites
                them once every shard is written (zarr's consolidated metadata);
* `storage`  the text the manifest records under `preprocessing.compression`;
* `owned_paths`  what a plan's build writes (files, or folders written whole), so that
                `--overwrite` can tell a previous build's files from the user's;
* `compressions`  the `--compress` values the format accepts.

Every file is written under a temporary name and renamed when whole (`shards_spec.fileio`), so
a final name always means a complete file; that is what lets a crashed build be resumed.
"""

from __future__ import annotations

from pathlib import Path


class ShardOutput:
    """One shard being written: `add` each patient's slices in plan order, then `finish`.

    A shard abandoned without `finish` (a patient failed) must leave no final file that a later
    `finish` of another output would not overwrite; temporary files are cleaned by the build."""

    def add(self, key: str, patient: str, slices) -> None:
        raise NotImplementedError

    def about(self, key: str, info: dict) -> None:
        """What the next `add` of `key` holds (`etl.task.patient_about`: channels, labels, spacing),
        for a format that stores it beside the data (zarr attributes); others ignore it."""

    def finish(self) -> list[dict]:
        """Write what is pending; return the file entries of the whole shard."""
        raise NotImplementedError


class Writer:
    """A shard format's writer; register an instance in `etl.writers.WRITERS` under `name`."""

    name: str = ""
    compressions: tuple[str, ...] = ("none",)
    compression_refused: str = ""
    """The one-line reason given when `--compress` names a value this format does not take."""
    root_key: str | None = None

    def shard_path(self, split: str, index: int, compression: str) -> str:
        raise NotImplementedError

    def open_shard(self, root: Path, path: str, split: str, compression: str) -> ShardOutput:
        raise NotImplementedError

    def patient_fields(self, split: str, key: str) -> dict:
        return {}

    def write_root(self, root: Path, splits: list[str]) -> list[dict]:
        return []

    def finish_root(self, root: Path, splits: list[str], files: list[str]) -> list[dict] | None:
        """Called once every shard is written (`files`: every shard file, relative to `root`), before
        the manifest: the root files' final entries, or None to keep `write_root`'s."""
        return None

    def storage(self, compression: str) -> str:
        return compression

    def owned_paths(self, shards: list[dict], splits: list[str]) -> set[str]:
        """Paths (files, or folders with everything in them) that building `shards` writes."""
        return {shard["path"] for shard in shards}


__all__ = ["ShardOutput", "Writer"]
