"""Zarr v3 shard writer: an array group per patient, each array one sharding-codec shard.

Layout (SPEC.md): `<split>/<patient key>/{image,mask,slice_index,class_voxels,brain_voxels}`.
Each array is chunked by 16 slices and stored as a single zarr shard, so a patient is a handful of
files and one task writes all of them: two writers never share a zarr shard, which would silently
lose data (a shard is read-modify-written whole). The patient group is written under a temporary
folder name and renamed when complete; a "shard" of the plan is the set of its patients' groups,
written one patient at a time so that one patient's arrays are in memory at once.
"""

from __future__ import annotations

from pathlib import Path

from .base import ShardOutput, Writer
from .files import atomic_folder, file_entry, temporary_name, write_atomic

ZSTD_LEVEL = 3
CHUNK_SLICES = 16
"""Slices per inner chunk: one-slice chunks cost zarr ~1 ms of per-chunk overhead per slice on
read, and readers take a patient whole anyway (random single-slice reads are slow regardless)."""
STORAGE = "zstd level 3, sharding codec: one shard per array, one chunk per slice, crc32c index"
"""What the manifest records as the storage of zarr shards. Kept word for word as the first
builds wrote it (it is part of the content digest); the chunking is `CHUNK_SLICES` slices."""
ARRAYS = ("image", "mask", "slice_index", "class_voxels", "brain_voxels")


def _array(group, name: str, data, chunk_rows: int = CHUNK_SLICES) -> None:
    import numpy as np
    from zarr.codecs import ZstdCodec

    data = np.ascontiguousarray(data)
    shape = data.shape
    rows = min(chunk_rows, max(shape[0], 1))
    chunks = (rows,) + shape[1:]
    shards = (-(-max(shape[0], 1) // rows) * rows,) + shape[1:]  # whole inner chunks
    array = group.create_array(
        name, shape=shape, dtype=data.dtype, chunks=chunks, shards=shards,
        compressors=ZstdCodec(level=ZSTD_LEVEL), fill_value=0,
    )
    if data.size:
        array[...] = data


def write_root(root: Path, splits: list[str]) -> list[dict]:
    """Group metadata of the root and of each split (written once, by the orchestrator).

    zarr writes them in a temporary folder; each `zarr.json` is then written into place
    atomically, so a crash never leaves a torn one that a resumed build could not open."""
    import shutil

    import zarr

    scratch = temporary_name(root / "groups")
    try:
        zarr.open_group(str(scratch), mode="w")
        for split in splits:
            zarr.open_group(str(scratch / split), mode="w")
        names = ["zarr.json"] + [f"{split}/zarr.json" for split in splits]
        for name in names:
            write_atomic(root / name, (scratch / name).read_bytes())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [file_entry(root, root / name) for name in names]


def write_patient(root: Path, split: str, key: str, slices) -> list[dict]:
    """Write one patient's group atomically; return the entries of every file in it."""
    import numpy as np
    import zarr

    final = root / split / key
    with atomic_folder(final) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        rows = max(len(slices.slice_index), 1)
        _array(group, "image", slices.image.astype("<f2"))
        _array(group, "mask", slices.mask.astype("|u1"))
        _array(group, "slice_index", np.asarray(slices.slice_index, dtype="<i4"), chunk_rows=rows)
        _array(group, "class_voxels", np.asarray(slices.class_voxels, dtype="<i8").reshape(-1, 4), chunk_rows=rows)
        _array(group, "brain_voxels", np.asarray(slices.brain_voxels, dtype="<i8"), chunk_rows=rows)
    files = sorted(p for p in final.rglob("*") if p.is_file())
    return [file_entry(root, f) for f in files]


def array_paths(split: str, key: str) -> dict[str, str]:
    """Paths of a patient's arrays relative to the root (the manifest lists them for HTTP)."""
    return {name: f"{split}/{key}/{name}" for name in ARRAYS}


class _GroupsOutput(ShardOutput):
    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split = root, split
        self.files: list[dict] = []

    def add(self, key: str, patient: str, slices) -> None:
        self.files += write_patient(self.root, self.split, key, slices)

    def finish(self) -> list[dict]:
        return self.files


class ZarrWriter(Writer):
    name = "zarr"
    compression_refused = "--compress applies to webdataset tars; zarr arrays are always zstd-compressed"
    root_key = "zarr_groups"

    def shard_path(self, split: str, index: int, compression: str) -> str:
        return f"{split}/{split}-{index:06d}"

    def open_shard(self, root: Path, path: str, split: str, compression: str) -> ShardOutput:
        return _GroupsOutput(root, split)

    def patient_fields(self, split: str, key: str) -> dict:
        return {"arrays": array_paths(split, key)}

    def write_root(self, root: Path, splits: list[str]) -> list[dict]:
        return write_root(root, splits)

    def storage(self, compression: str) -> str:
        return STORAGE

    def owned_paths(self, shards: list[dict], splits: list[str]) -> set[str]:
        groups = {f"{shard['split']}/{pid}" for shard in shards for pid in shard["patients"]}
        return groups | {"zarr.json"} | {f"{split}/zarr.json" for split in splits}


WRITER = ZarrWriter()
