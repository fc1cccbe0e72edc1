"""Whole patients from shards, for patient-level (3D) evaluation and the report's pictures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from shards_spec.read import ShardStore

from .selection import channel_index, resolve_dist, split_names


@dataclass
class PatientSlices:
    """One patient's decoded slices, for patient-level (3D) evaluation."""

    patient: str
    image: np.ndarray  # float16 (S, C, H, W), the selected channels in the requested order
    mask: np.ndarray  # uint8 (S, H, W) label map 0..3
    slice_index: list[int]  # index of each slice along the source volume's third axis
    info: dict  # the manifest's patient entry: source_shape, spacing, affine, ...


def iter_patients(
    shards: str | Path | ShardStore,
    split: str | list[str],
    channels: list[str] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    cache_dir: str | Path | None = None,
    storage_options: dict | None = None,
) -> Iterator[PatientSlices]:
    """Whole patients of the split(s) in manifest order (this rank's share: shard i % world_size).

    Every record is checked as `ShardDataset` checks it; a bad shard raises `SpecError`.
    """
    store = shards if isinstance(shards, ShardStore) else ShardStore(shards, cache_dir=cache_dir, storage_options=storage_options)
    index = channel_index(store, channels)
    resolve_dist(rank, world_size)
    shard_list = [s for name in split_names(split) for s in store.manifest.shards_of(name)]
    patients = store.manifest.content["patients"]
    for shard in shard_list[rank::world_size]:
        for record in list(store.records(shard)):
            yield PatientSlices(
                patient=record.patient,
                image=np.ascontiguousarray(record.image[:, index]),
                mask=record.mask,
                slice_index=record.slice_index,
                info=patients[record.patient],
            )


__all__ = ["PatientSlices", "iter_patients"]
