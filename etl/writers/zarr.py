"""Zarr v3 shard writer: an array group per patient, each array one sharding-codec shard.

Layout (SPEC.md): `<split>/<patient key>/{image,mask,slice_index,class_voxels,brain_voxels}`.
Each array is chunked by 16 slices and stored as a single zarr shard, so a patient is a handful of
files and one task writes all of them: two writers never share a zarr shard, which would silently
lose data (a shard is read-modify-written whole). The patient group is written under a temporary
folder name and renamed when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from shards_spec.preprocess import Slices

from .files import TMP_SUFFIX, file_entry

ZSTD_LEVEL = 3
CHUNK_SLICES = 16
"""Slices per inner chunk: one-slice chunks cost zarr ~1 ms of per-chunk overhead per slice on
read, and readers take a patient whole anyway (random single-slice reads are slow regardless)."""


def _array(group, name: str, data: np.ndarray, chunk_rows: int = CHUNK_SLICES) -> None:
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
    """Group metadata of the root and of each split (written once, by the orchestrator)."""
    import zarr

    zarr.open_group(str(root), mode="a")
    for split in splits:
        zarr.open_group(str(root / split), mode="a")
    files = [root / "zarr.json"] + [root / split / "zarr.json" for split in splits]
    return [file_entry(root, f) for f in files]


def write_patient(root: Path, split: str, key: str, slices: Slices) -> list[dict]:
    """Write one patient's group atomically; return the entries of every file in it."""
    import zarr

    final = root / split / key
    tmp = root / split / (key + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w")
    _array(group, "image", slices.image.astype("<f2"))
    _array(group, "mask", slices.mask.astype("|u1"))
    _array(group, "slice_index", np.asarray(slices.slice_index, dtype="<i4"), chunk_rows=max(len(slices.slice_index), 1))
    _array(group, "class_voxels", np.asarray(slices.class_voxels, dtype="<i8").reshape(-1, 4), chunk_rows=max(len(slices.slice_index), 1))
    _array(group, "brain_voxels", np.asarray(slices.brain_voxels, dtype="<i8"), chunk_rows=max(len(slices.slice_index), 1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    files = sorted(p for p in final.rglob("*") if p.is_file())
    return [file_entry(root, f) for f in files]


ARRAYS = ("image", "mask", "slice_index", "class_voxels", "brain_voxels")


def array_paths(split: str, key: str) -> dict[str, str]:
    """Paths of a patient's arrays relative to the root (the manifest lists them for HTTP)."""
    return {name: f"{split}/{key}/{name}" for name in ARRAYS}
