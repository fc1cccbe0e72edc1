"""Streaming slices from a shard folder: the dataset `train run` uses, and the public Python API.

    ds = ShardDataset("shards/", split="train", channels=["t1ce", "flair"], shuffle_buffer=2000, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=2)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for image, mask in loader:   # image float32 (B, C, H, W); mask float32 (B, 3, H, W)
            ...

An epoch, step by step (every rank and loader worker computes the same plan from the manifest,
nothing is exchanged between processes):

1. the split's shards (one patient each by default) in manifest order; with `shuffle`, permuted
   by a generator seeded with (seed, epoch) — the same permutation on every rank;
2. dealt to ranks (each shard to the rank with the fewest samples so far, ties to the lower rank),
   then each rank's list dealt round-robin to its loader workers
   (`torch.utils.data.get_worker_info()`);
3. each worker decodes its shards one at a time (`shards_spec.read.ShardStore.records`: checked
   against the manifest and its sha256 before any of its slices is used), selects the requested
   channels by name (with `context` K > 0, followed by the same channels of the slices K above and
   below, `stack_context`: 2.5D input), and emits each slice once, slices with any tumour label
   `oversample_tumour` times;
4. with `shuffle`, slices pass through a shuffle buffer of `shuffle_buffer` slices per worker,
   seeded by (seed, epoch, rank, worker) — never by pid or time, so an epoch is reproducible;
5. each slice leaves as float32 tensors: the image (C, H, W) and the label map expanded to three
   binary channels (`shards_spec.labels.expand`: NEC/NET, ED, ET, or the regions WT, TC, ET).
   `ShardLoader` (what `train run` and `train evaluate` use) gives the same batches faster: each
   worker packs its slices B at a time as float16 images and uint8 label maps in shared memory
   (`iter_batches`), and the main process makes the float32 image and mask once per batch.

Reading a shard costs one sha256 per file the first time a process reads it, not at every epoch
(`shards_spec.read`: an unchanged local file or cached copy is not hashed again), and a shard's
values are scanned for NaN/inf and labels > 3 the first time its verified bytes are decoded.

Without cutting (one process, or `shuffle=False` for validation) an epoch is every slice of the
split exactly once (tumour slices `oversample_tumour` times); validation reads shards in manifest
order with no buffer, split across ranks and workers as above, every slice once.

DDP cut (training, `shuffle=True` and `world_size > 1`). Uneven shards would give ranks different
numbers of batches and hang the gradient all-reduce, so every rank runs the same number of full
batches. Shards are dealt to ranks in the epoch's order, each to the rank with the fewest samples
so far, then round-robin to the W loader workers (W is the same on every rank). With B =
`batch_size` (1 when not given), the samples n[r][w] that worker w of rank r would emit are known
from the manifest (per-patient `slices` and `tumour_slices`), and

    cap[r][w] = floor(n[r][w] / B) * B          Q = min over ranks r of sum_w cap[r][w]

every rank yields exactly Q samples in Q / B full batches: worker w of rank r yields q[r][w] <=
cap[r][w], a multiple of B, trimmed one batch at a time from the largest (then the last) worker
until the rank's quotas sum to Q. A DataLoader batches each worker's samples separately, so each
rank gets sum_w q[r][w] / B = Q / B batches, all full. The samples cut are the last ones out of the
shuffle buffer; since the shard order changes every epoch, so does the remainder. With
`policy="skip"`, a worker whose skipped shards leave it short of its quota fills up by reading
its good shards again, so batch counts still agree.

Error policy: `policy="fail"` raises the `SpecError` naming the bad shard; `policy="skip"` skips
the whole shard (its records are only used once the shard has checked out), counts it in
`skipped` and logs the skipped shards at the end of the worker's epoch. `skipped` counts what the
current process saw; with loader workers each worker logs its own, and `skip_counts()` is the total
over this process and all of its loader workers: each process adds to its own row of a
shared-memory tensor (row 0 without workers, row 1 + worker id in a worker; rows are never
written by two processes at once, so no lock is needed, and the counts are complete once the
loader's iterator is exhausted). The totals grow over epochs; `train run` reports the difference
after each epoch.

`set_epoch(epoch)` writes the epoch into a shared-memory tensor, so it also reaches persistent
loader workers.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shards_spec.codec import IMAGE_DTYPE, MASK_DTYPE
from shards_spec.errors import SpecError
from shards_spec.labels import TARGETS, expand
from shards_spec.read import ShardStore

from ..config.options import MAX_CONTEXT, POLICIES, stacked_channels
from .selection import channel_index, resolve_dist, split_names
from .slices import stack_context

log = logging.getLogger(__name__)

SKIP_ROWS = 1 + 64
"""Rows of the shared skip counter: this process, then one per loader worker (ids beyond 63 share
rows, where simultaneous skips could be lost from the count)."""


class ShardDataset(IterableDataset):
    """Slices of one or more splits, streamed from a shard folder with bounded host memory.

    Why it exists: a BraTS split is far larger than a free-tier machine's RAM once decoded, so
    slices are streamed shard by shard and mixed in a bounded shuffle buffer (as TorchIO's
    `Queue` mixes patches), never loaded whole. The buffer length is the RAM trade-off: a longer
    buffer mixes slices of more patients into each batch (less correlated batches) at
    `memory_bound()` bytes; a buffer of 0 or 1 only shuffles the order of patients.

    Args:
        shards: the shard folder, a local path or any fsspec URL (`http(s)://`, `s3://`, ...).
        split: a split name, or a list of them (their shards are concatenated).
        channels: channel names in the order wanted (default: all, in the manifest's order).
        target: `"classes"` (NEC/NET, ED, ET) or `"regions"` (WT, TC, ET).
        shuffle: training order (shuffled patients and buffer, DDP cut); False for validation:
            manifest order, no buffer, no cut.
        shuffle_buffer: slices held per loader worker to shuffle them.
        seed: seeds every random choice together with the epoch, rank and worker.
        cache_dir: fetch each file once into this folder (keyed by sha256, verified before use).
        policy: `"fail"` raises on a bad shard; `"skip"` skips and counts it.
        oversample_tumour: emit slices with any tumour label this many times per epoch.
        rank, world_size: this process's place in DDP (default: torch.distributed's, or 0 of 1).
        batch_size: the loader's batch size, so the DDP cut keeps whole batches (see module doc).
        storage_options: passed to fsspec for URLs (credentials, endpoint).
        context: 2.5D input: each slice's channels followed by those of its K neighbours on each
            side (`stack_context`), (2K + 1) x C channels in all.
    """

    def __init__(
        self,
        shards: str | Path | ShardStore,
        split: str | list[str],
        channels: list[str] | None = None,
        target: str = "classes",
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        policy: str = "fail",
        oversample_tumour: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int | None = None,
        storage_options: dict | None = None,
        context: int = 0,
    ) -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
        if shuffle_buffer < 0 or oversample_tumour < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError("shuffle_buffer must be >= 0, oversample_tumour >= 1 and batch_size >= 1")
        if not 0 <= context <= MAX_CONTEXT:
            raise ValueError(f"context must be in 0..{MAX_CONTEXT}, got {context}")
        self.context = int(context)
        self.store = shards if isinstance(shards, ShardStore) else ShardStore(
            shards, cache_dir=cache_dir, storage_options=storage_options
        )
        manifest = self.store.manifest
        self.splits = split_names(split)
        self.shards: list[dict] = [s for name in self.splits for s in manifest.shards_of(name)]
        self.channel_index = channel_index(self.store, channels)
        self.channels = [manifest.channels[i] for i in self.channel_index]
        self.target, self.shuffle, self.shuffle_buffer = target, bool(shuffle), int(shuffle_buffer)
        self.seed, self.policy, self.oversample_tumour = int(seed), policy, int(oversample_tumour)
        self.rank, self.world_size = resolve_dist(rank, world_size)
        self.batch_size = batch_size
        self.cut = self.shuffle and self.world_size > 1
        if self.cut and len(self.shards) < self.world_size:
            raise ValueError(
                f"split(s) {self.splits} hold {len(self.shards)} shards, fewer than the {self.world_size} ranks: "
                "some ranks would have no data"
            )
        patients = manifest.content["patients"]
        self.shard_samples = [
            sum(patients[p]["slices"] + (self.oversample_tumour - 1) * patients[p]["tumour_slices"] for p in s["patients"])
            for s in self.shards
        ]
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.skipped = {"shards": 0, "slices": 0}
        self.skipped_problems: list[str] = []
        self._skip_rows = torch.zeros((SKIP_ROWS, 2), dtype=torch.int64).share_memory_()

    # -- the epoch plan (pure, from the manifest) ------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and shuffle to use (call before each epoch)."""
        self._epoch.fill_(int(epoch))

    def shard_order(self, epoch: int | None = None) -> list[int]:
        """Indices into `self.shards` in this epoch's order (the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return list(range(len(self.shards)))
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.shards)).tolist()

    def rank_shards(self, epoch: int | None = None) -> list[list[int]]:
        """[rank] -> shard indices: in this epoch's order, each shard to the rank with the fewest
        samples so far (ties to the lower rank), so ranks get nearly equal sample counts."""
        loads = [0] * self.world_size
        out: list[list[int]] = [[] for _ in range(self.world_size)]
        for i in self.shard_order(epoch):
            r = loads.index(min(loads))
            out[r].append(i)
            loads[r] += self.shard_samples[i]
        return out

    def assignment(self, num_workers: int = 0, epoch: int | None = None) -> list[list[list[int]]]:
        """[rank][worker] -> shard indices: `rank_shards`, then dealt round-robin to workers."""
        workers = max(num_workers, 1)
        return [[shards[w::workers] for w in range(workers)] for shards in self.rank_shards(epoch)]

    def quotas(self, num_workers: int = 0, epoch: int | None = None) -> list[int]:
        """Samples each loader worker of this rank emits this epoch (see the DDP cut above)."""
        counts = [[sum(self.shard_samples[i] for i in shards) for shards in rank] for rank in self.assignment(num_workers, epoch)]
        if not self.cut:
            return counts[self.rank]
        b = self.batch_size or 1
        caps = [[n // b * b for n in rank] for rank in counts]
        total = min(sum(rank) for rank in caps)
        quota = list(caps[self.rank])
        while sum(quota) > total:  # trim whole batches from the largest quota (ties: the last worker)
            w = max(range(len(quota)), key=lambda k: (quota[k], k))
            quota[w] -= b
        return quota

    def samples_per_epoch(self, num_workers: int = 0, epoch: int | None = None) -> int:
        """Samples this rank yields in one epoch (with `num_workers` loader workers)."""
        return sum(self.quotas(num_workers, epoch))

    @property
    def num_slices(self) -> int:
        """Samples this rank yields in the current epoch without loader workers."""
        return self.samples_per_epoch(0)

    def __len__(self) -> int:
        """`num_slices`: the slices this rank yields in the current epoch, so `len(DataLoader(ds,
        batch_size=B))` is ceil(len(ds) / B). With loader workers a DataLoader batches each
        worker's share apart (and, under the DDP cut, each worker's quota is whole batches), so its
        real count is `batches_per_epoch(B, workers)`, which `len(ShardLoader(...))` gives."""
        return self.num_slices

    def batches_per_epoch(self, batch_size: int, num_workers: int = 0, drop_last: bool = False, epoch: int | None = None) -> int:
        """Batches a DataLoader with this batch size and these workers gives this rank in one epoch."""
        rounding = math.floor if drop_last else math.ceil
        return sum(rounding(q / batch_size) for q in self.quotas(num_workers, epoch))

    def memory_bound(self, num_workers: int = 0, prefetch_factor: int = 2, batch_size: int | None = None) -> int:
        """Upper bound in bytes of the host memory that data in flight can take.

        With C selected channels (x (2K + 1) with `context` K) of the manifest's Ca, size H = W,
        b = batch size:

        - a buffered slice: C·H·W·2 (float16 image) + H·W (uint8 label map);
        - a decoded shard: the largest shard's samples × (Ca·H·W·2 + H·W), counted twice (its raw
          bytes are held while it is decoded);
        - a yielded sample: (C + 3)·H·W·4 (float32 image and three mask channels);
        - per worker process (at least one): shuffle_buffer buffered slices (0 without shuffle)
          + a decoded shard ×2 + one batch being collated;
        - batches waiting in the loader: num_workers·prefetch_factor, + 2: the one in use by the
          loop and the next one being made (stacked, or converted by `ShardLoader`).

        `ShardLoader`'s batches travel at (2C + 1)·H·W bytes a slice; each worker packs into RING
        of them in shared memory, at most 4·b·(2C + 1)·H·W, less than the float32 batch being
        collated plus the prefetched ones above count for it (8·b·(C + 3)·H·W at the least).

        The bound does not depend on the dataset's size. It excludes what is not data: the
        interpreter, torch and library memory of each worker process, and pinned-memory copies.
        """
        b = batch_size or self.batch_size or 1
        hw = self.store.manifest.size ** 2
        c, c_all = stacked_channels(len(self.channel_index), self.context), len(self.store.manifest.channels)
        patients = self.store.manifest.content["patients"]
        largest = max((sum(patients[p]["slices"] for p in s["patients"]) for s in self.shards), default=0)
        buffered = c * hw * IMAGE_DTYPE.itemsize + hw * MASK_DTYPE.itemsize
        shard = largest * (c_all * hw * IMAGE_DTYPE.itemsize + hw * MASK_DTYPE.itemsize)
        sample = (c + 3) * hw * 4
        buffer = self.shuffle_buffer if self.shuffle else 0
        per_worker = buffer * buffered + 2 * shard + b * sample
        in_loader = (num_workers * prefetch_factor + 2) * b * sample
        return max(num_workers, 1) * per_worker + in_loader

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 0)
        return self.iter_worker(worker, num_workers)

    def iter_worker(self, worker: int, num_workers: int, epoch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """What loader worker `worker` of `num_workers` (0: no workers) yields in an epoch."""
        for image, mask in self._worker_slices(worker, num_workers, epoch):
            yield self._tensors(image, mask)

    def iter_batches(self, batch_size: int, worker: int, num_workers: int, drop_last: bool = False,
                     epoch: int | None = None, buffers: Callable | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """`iter_worker`'s slices packed `batch_size` at a time, as a DataLoader packs them, before
        conversion: image float16 (B, C, H, W) and label map uint8 (B, H, W), in shared memory inside
        a loader worker (so they reach the main process without a copy, at 2C + 1 bytes a pixel
        instead of the 4 (C + 3) of float32 image and mask). `ShardLoader` converts them there.

        `buffers(image_shape, labels_shape)` -> (image, labels, *extra) gives the tensors to pack
        each full-size batch into (a last, shorter batch is their first rows; a float32 image is
        converted while packed), and what else to yield with it; by default new tensors."""
        buffers = buffers or (lambda image_shape, labels_shape: (empty_batch(image_shape, torch.float16),
                                                                  empty_batch(labels_shape, torch.uint8)))
        slices = self._worker_slices(worker, num_workers, epoch)
        while True:
            items = list(itertools.islice(slices, batch_size))
            if not items or (drop_last and len(items) < batch_size):
                return
            image, labels, *extra = buffers((batch_size, *items[0][0].shape), (batch_size, *items[0][1].shape))
            image, labels = image[:len(items)], labels[:len(items)]
            labels_np = labels.numpy()
            for k, (slice_image, slice_mask) in enumerate(items):
                image[k].copy_(torch.from_numpy(slice_image))  # also into float32: torch casts 9x faster than numpy
                labels_np[k] = slice_mask
            yield image, labels, *extra

    def _worker_slices(self, worker: int, num_workers: int, epoch: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The (image float16 (C, H, W), label map uint8 (H, W)) slices that worker `worker` of
        `num_workers` emits in an epoch, in order (module doc, steps 1-4 and the DDP cut)."""
        epoch = self.epoch if epoch is None else epoch
        shard_ids = self.assignment(num_workers, epoch)[self.rank][worker]
        quota = self.quotas(num_workers, epoch)[worker] if self.cut else None
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        skipped_before = len(self.skipped_problems)
        good: list[int] = []
        emitted = 0
        for item in self._mixed(self._slices(shard_ids, good), rng):
            if quota is not None and emitted >= quota:
                break
            yield item
            emitted += 1
        while quota is not None and emitted < quota:  # skipped shards left this worker short
            if not good:
                raise SpecError(f"every shard of rank {self.rank} worker {worker} was skipped; the epoch cannot be filled")
            again, good = good, []
            for item in self._mixed(self._slices(again, good), rng):
                if emitted >= quota:
                    break
                yield item
                emitted += 1
        problems = self.skipped_problems[skipped_before:]
        if problems:
            log.warning("epoch %d rank %d worker %d skipped %d bad shard(s): %s", epoch, self.rank, worker,
                        len(problems), "; ".join(problems))

    def _slices(self, shard_ids: list[int], good: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Slices (image float16 (C, H, W) copy, label map uint8 (H, W)) of whole, checked shards."""
        for i in shard_ids:
            records = self._decode(i)
            if records is None:
                continue
            good.append(i)
            for record in records:
                positions = {int(z): j for j, z in enumerate(record.slice_index)}
                for s in range(record.slices):
                    # `take` copies: no view keeps the record alive
                    image = stack_context(record.image, record.slice_index, positions, s, self.channel_index,
                                          self.context)
                    mask = record.mask[s].copy()
                    for _ in range(self.oversample_tumour if self.oversample_tumour > 1 and mask.any() else 1):
                        yield image, mask
            records = record = None  # free this shard before decoding the next (the memory bound counts one)

    def _decode(self, i: int) -> list | None:
        shard = self.shards[i]
        try:
            return list(self.store.records(shard))  # all or nothing: the sha256 is known at the end
        except SpecError as exc:
            if self.policy == "fail":
                raise
            self.skipped["shards"] += 1
            self.skipped["slices"] += shard["slices"]
            info = get_worker_info()
            row = self._skip_rows[0 if info is None else 1 + info.id % (SKIP_ROWS - 1)]
            row += torch.tensor([1, shard["slices"]], dtype=torch.int64)
            self.skipped_problems.append(str(exc))
            return None

    def skip_counts(self) -> dict[str, int]:
        """Shards and slices skipped so far (policy "skip") by this process and its loader workers."""
        shards, slices = (int(v) for v in self._skip_rows.sum(dim=0))
        return {"shards": shards, "slices": slices}

    def _mixed(self, samples: Iterator, rng: np.random.Generator) -> Iterator:
        """Samples through the shuffle buffer (training), or as they come (validation).

        The buffer starts giving samples once it holds an eighth of its length, and keeps filling
        while it gives (webdataset's `initial`): waiting for a full buffer held the first batch of
        every epoch until a worker had decoded its whole share (~3 s an epoch, measured)."""
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from samples
            return
        initial = max(1, self.shuffle_buffer // 8)
        samples = iter(samples)
        buffer: list = []
        for item in samples:
            buffer.append(item)
            if len(buffer) < self.shuffle_buffer:  # take two for each one given, until full
                extra = next(samples, None)
                if extra is not None:
                    buffer.append(extra)
            if len(buffer) < initial:
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
        for j in rng.permutation(len(buffer)):
            yield buffer[j]

    def _tensors(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(image).float(),  # 9x faster than numpy's float16 -> float32 cast
            torch.from_numpy(expand(mask, self.target).astype(np.float32)),
        )

def empty_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory inside a loader worker (as `default_collate`
    allocates its batches there): sending it to the main process then copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)
