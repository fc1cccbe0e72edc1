"""What training and evaluation share: the autocast choice, loaders and their batches, and the
validation pass. `train.training.trainer` and `train.apply.evaluate` both import this module, never each other.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..data import ShardLoader
from ..metrics import THRESHOLD, UNDEFINED, confusion_counts, expand_labels, probs_to_labels, scores_from_counts
from ..runtime import distributed
from ..runtime.devices import cpu_has_native_bf16
from .budget import StopRequested, StopSignal


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, stream), independent of call history."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def autocast_dtype(amp: bool, amp_dtype: str, device: Any) -> Any:
    """The autocast dtype of training and shard-grid validation; None = full float32. `auto`
    (with --amp, the default): fp16 on CUDA, bf16 on a CPU with native bf16 (`cpu_has_native_bf16`;
    measured in bench/quality.py: the same minutes give twice the steps), float32 on other CPUs and
    on MPS. Losses and scores are computed in float32 either way."""
    import torch

    if not amp:
        return None
    if amp_dtype == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    return getattr(torch, amp_dtype)


def prepare_model(model: Any, device: Any) -> Any:
    """`model` on `device`; on a CPU in channels-last memory format, which oneDNN's convolutions run
    ~25 % faster (float32) and ~12 % faster (bf16) at v2's CPU defaults (measured on a 2-core Xeon). The
    values are the same tensors; a checkpoint loads back into either format."""
    import torch

    model = model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(device: Any, dtype: Any) -> Any:
    """`torch.autocast` for `dtype`, or a no-op context for None."""
    import torch

    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def loader_worker_init(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which stops after the current
    step and shuts them down (a worker killed by Ctrl-C would otherwise break the last fetch);
    one thread each, since they only decode."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def make_loader(dataset: Any, batch_size: int, workers: int, device: Any, seed: int,
                persistent: bool = False) -> Any:
    """A DataLoader over a `ShardDataset` (a `data.ShardLoader`: float16 batches from the workers,
    converted here); the order comes from the dataset (seed, epoch, rank, worker), the loader's own
    generator only from `seed`, never from the global RNG.

    `persistent` keeps the worker processes for the whole run: they are forked once, instead of
    at every epoch and validation, while other threads (gloo, the previous loader's queue feeder
    shutting down) may be mid-start or mid-exit, which can deadlock a forked child in CPython
    3.11 (measured: a DDP rank's validation worker hung in `PyOS_AfterFork_Child`). The epoch
    reaches persistent workers through the dataset's shared-memory epoch (`set_epoch`)."""
    import torch


    generator = torch.Generator().manual_seed(seed)
    return ShardLoader(
        dataset, batch_size=batch_size, num_workers=workers, prefetch_factor=2 if workers > 0 else None,
        pin_memory=device.type == "cuda", generator=generator, worker_init_fn=loader_worker_init,
        persistent_workers=persistent and workers > 0)


@contextlib.contextmanager
def batches(dataloader: Any) -> Iterator[Any]:
    """Iterate a DataLoader; a non-persistent loader's worker processes are always shut down, also
    when the loop raises (a bad shard) or stops: they ignore SIGTERM (`loader_worker_init`), so
    workers left to the interpreter's exit would be waited for forever (measured: `train run`
    hung on a corrupt shard). Persistent workers are shut down by `close_loader`."""
    persistent = getattr(dataloader, "persistent_workers", False)
    iterator = iter(dataloader)
    try:
        yield iterator
    except BaseException:
        close_loader(dataloader) if persistent else close_iterator(iterator)
        raise
    if not persistent:
        close_iterator(iterator)


def close_iterator(iterator: Any) -> None:
    shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
    if shutdown is not None:
        shutdown()


def close_loader(dataloader: Any) -> None:
    """Shut down a persistent loader's workers (its iterator is kept by the DataLoader)."""
    iterator = getattr(dataloader, "_iterator", None)
    if iterator is not None:
        close_iterator(iterator)
        dataloader._iterator = None


@dataclass
class Validation:
    """One validation pass: per-channel TP/FP/FN (int64, rows tp, fp, fn) summed over the split
    (and all-reduced), the loss summed slice by slice, the slices seen; with `--target regions`
    also the NEC/NET, ED, ET counts of the same label maps (`class_counts`), so that every run
    reports the seed's per-class columns."""

    counts: Any  # torch int64 (3, 3)
    loss_sum: float
    slices: int
    class_counts: Any = None  # torch int64 (3, 3) for a regions target; None when the target is the classes

    @property
    def loss(self) -> float:
        return self.loss_sum / self.slices if self.slices else math.nan

    def scores(self, classes: bool = False) -> dict[str, np.ndarray]:
        """Every registered count score per channel of the target (or, `classes`, per class NEC/NET,
        ED, ET), dataset-level (empty channel -> NaN)."""

        counts = self.class_counts if classes and self.class_counts is not None else self.counts
        return scores_from_counts(counts[0], counts[1], counts[2], empty=UNDEFINED)

    def mean_dice(self) -> float:
        dice = self.scores()["dice"]
        return math.nan if np.all(np.isnan(dice)) else float(np.nanmean(dice))


def validate(model: Any, loader: Any, loss_fn: Any, device: Any, amp_dtype: Any, dist: distributed.Dist,
             target: str, stop: StopSignal | None = None, brain_channels: int | None = None) -> Validation:
    """Loss (mean over validation slices) and per-channel TP/FP/FN of `loader`, all-reduced over ranks.

    The counts score the label maps users get: the sigmoid probabilities decided by the one label
    rule (`train.metrics.probs_to_labels`, the rule of `predict` and `evaluate`), zero where the
    shards store background (every channel 0; with 2.5D input, of the first `brain_channels`: the
    slice's own), then expanded to the target's three channels. So
    the best checkpoint is the best by what a user's segmentation scores.

    The loss is computed slice by slice: the training Dice is taken over the batch, so a batched
    value would depend on how slices fall into batches (batch size, loader workers, ranks)."""
    import torch


    model.eval()
    counts = torch.zeros(3, 3, dtype=torch.int64, device=device)
    class_counts = torch.zeros(3, 3, dtype=torch.int64, device=device) if target == "regions" else None
    loss_sum = torch.zeros((), dtype=sum_dtype(device), device=device)
    seen = torch.zeros((), dtype=sum_dtype(device), device=device)
    with torch.no_grad():
        for image, mask in loader:
            image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = model(image)
            loss_sum += slice_losses(loss_fn, logits, mask).to(loss_sum.dtype).sum()
            seen += image.shape[0]
            centre = image if brain_channels is None else image[:, :brain_channels]
            labels = predicted_labels(logits, centre, target)
            counts += torch.stack(confusion_counts(expand_labels(labels, target), mask > 0.5))
            if class_counts is not None:  # the regions are nested: the truth's label map is exact
                truth = probs_to_labels(mask.float(), "regions", threshold=0.5, channel_axis=1)
                class_counts += torch.stack(confusion_counts(expand_labels(labels, "classes"),
                                                             expand_labels(truth, "classes")))
            if stop is not None and stop.requested and not dist.enabled:
                raise StopRequested(stop.signum or 15)
    for tensor in (counts, loss_sum, seen, *([class_counts] if class_counts is not None else [])):
        distributed.all_reduce_sum(dist, tensor)
    if stop is not None and distributed.agree(dist, stop.requested, device):
        raise StopRequested(stop.signum or 15)
    return Validation(counts=counts.cpu(), loss_sum=float(loss_sum.item()), slices=int(seen.item()),
                      class_counts=class_counts.cpu() if class_counts is not None else None)


def sum_dtype(device: Any) -> Any:
    """float64 for loss sums (exact enough over an epoch), float32 on MPS, which has no float64."""
    import torch

    return torch.float32 if device.type == "mps" else torch.float64


def slice_losses(loss_fn: Any, logits: Any, mask: Any) -> Any:
    """The loss of each slice on its own (B,): one definition for training and validation curves."""
    import torch

    return torch.stack([loss_fn(logits[i:i + 1], mask[i:i + 1]) for i in range(logits.shape[0])])


def predicted_labels(logits: Any, image: Any, target: str) -> Any:
    """(B, H, W) uint8: the label map the label rule gives, 0 on background."""
    import torch


    labels = probs_to_labels(torch.sigmoid(logits.float()), target, threshold=THRESHOLD, channel_axis=1)
    return torch.where((image != 0).any(dim=1), labels, torch.zeros_like(labels))


__all__ = ["Validation", "autocast", "autocast_dtype", "batches", "close_loader", "cpu_has_native_bf16",
           "loader_worker_init", "make_loader", "mix_seed", "predicted_labels",
           "prepare_model", "slice_losses",
           "sum_dtype", "validate"]
