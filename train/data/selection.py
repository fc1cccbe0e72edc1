"""Which shards and channels a reader takes: the split names, the channels by name, this process's rank."""

from __future__ import annotations

from shards_spec.errors import SpecError
from shards_spec.labels import check_channels
from shards_spec.read import ShardStore


def resolve_dist(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            rank = td.get_rank() if rank is None else rank
            world_size = td.get_world_size() if world_size is None else world_size
    rank, world_size = int(rank or 0), int(world_size or 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, world_size={world_size}")
    return rank, world_size


def split_names(split: str | list[str]) -> list[str]:
    splits = [split] if isinstance(split, str) else list(split)
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"split must be a split name or a list of distinct names, got {split!r}")
    return splits


def channel_index(store: ShardStore, channels: list[str] | None) -> list[int]:
    available = store.manifest.channels
    if channels is None:
        return list(range(len(available)))
    names = check_channels(channels)
    missing = [c for c in names if c not in available]
    if missing:
        raise SpecError(f"channel(s) {missing} are not in this dataset; it has {available}", store.location("manifest.json"))
    return [available.index(c) for c in names]


__all__ = ["channel_index", "resolve_dist", "split_names"]
