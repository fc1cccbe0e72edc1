"""The lines `train run` prints: what will run, the speed projection, skipped shards, each epoch.
Pure functions of their arguments, so a caller with another console or logger can reuse them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .budget import Budget, projection_line


def autocast_name(amp_dtype: Any) -> str:
    """"bfloat16", "float16" or "off": the autocast a run uses, for its first lines and config.json."""
    return str(amp_dtype).replace("torch.", "") if amp_dtype else "off"


def plan_lines(config: Any, parameters: int, device: Any, amp_dtype: Any, dist: Any, train_splits: list[str],
               train_slices: int, val_slices: int, done_epochs: int, run_dir: Path, threads: str = "") -> list[str]:
    """What will run, first of all where: without --out the run folder is a new runs/<variant>-<time>."""
    amp = autocast_name(amp_dtype)
    per_rank = " per rank" if dist.enabled else ""
    return [
        f"run folder {run_dir}" + (f" (continuing after epoch {done_epochs})" if done_epochs else ""),
        f"{config.variant}: {config.model} ({parameters:,} parameters), channels {','.join(config.channels)}"
        + (f" + {config.context} neighbour(s) each side" if config.context else "")
        + f", loss {config.loss}, augmentation {config.augment}, target {config.target}, device {device}, "
        f"autocast {amp}, ranks {dist.world_size}",
        f"sizes: base {config.base}, depth {config.depth}, stem {config.stem}, batch {config.batch_size}, "
        f"{config.workers} loader worker(s){threads}; schedule {config.schedule}, lr {config.lr:g}, "
        f"tumour slices x{config.oversample_tumour}",
        f"train on {'+'.join(train_splits)} ({train_slices} slices{per_rank}), validate on {config.val_split} "
        f"({val_slices} slices{per_rank}); epochs {done_epochs + 1}..{config.epochs}",
    ]


def projection_lines(steps: int, seconds: float, steps_per_epoch: int, epochs_left: int, budget: Budget,
                     memory_bound: int, device: Any) -> list[str]:
    lines = [projection_line(steps, seconds, steps_per_epoch, epochs_left, budget)]
    line = f"host memory bound of the training stream: {memory_bound / 2**20:.0f} MiB"
    if device.type == "cuda":
        import torch

        line += f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return lines + [line]


def skipped_line(epoch: int, counts: list[list[int]]) -> str:
    """`counts`: [[train shards, train slices], [val shards, val slices]] skipped this epoch."""
    (train_shards, train_slices), (val_shards, val_slices) = counts
    return (f"epoch {epoch}: skipped {train_shards + val_shards} bad shard(s) ({train_slices + val_slices} "
            f"slices): train {train_shards} ({train_slices} slices), validation {val_shards} ({val_slices} slices)"
            + ("; the warnings above name them" if train_shards + val_shards else ""))


def summary_line(row: dict, names: tuple[str, ...], epochs: int, improved: bool) -> str:
    per_class = " ".join(f"{n} {row['dice_' + n]:.3f}" for n in names)
    empty = [n for n in names if math.isnan(row["dice_" + n])]
    note = f" ({', '.join(empty)}: empty in prediction and truth, left out of the mean)" if empty else ""
    return (f"epoch {row['epoch']:g}/{epochs}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
            f"dice {row['mean_dice']:.4f} [{per_class}]{note}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
            + ("  *best" if improved else ""))


__all__ = ["plan_lines", "projection_lines", "skipped_line", "summary_line"]
