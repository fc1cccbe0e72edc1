"""Recipe helpers of the `Trainer` that need no trainer: the learning-rate schedule and the
output layer's starting bias, each measured with bench/quality.py (docs/quality.md)."""

from __future__ import annotations

import math
from typing import Any

MIN_LR_FRACTION = 0.01
"""The cosine schedule ends at this fraction of --lr."""


def warmup_rate(lr: float, step: int, warmup: int) -> float:
    """The linear warm-up's rate at step `step` (< `warmup`)."""
    return lr * (step + 1) / (warmup + 1)


def decay_rate(schedule: str, lr: float, t: float) -> float:
    """The rate after the warm-up, `t` in [0, 1] the fraction of the decay done: cosine to
    `MIN_LR_FRACTION` x lr, or poly (1 - t)^0.9."""
    t = min(max(t, 0.0), 1.0)
    if schedule == "poly":
        return lr * (1.0 - t) ** 0.9
    return lr * (MIN_LR_FRACTION + (1.0 - MIN_LR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * t)))


def schedule_rate(schedule: str, lr: float, step: int, total: int, warmup: int) -> float:
    """Learning rate of global step `step` (0-based) of `total`: a linear warm-up over `warmup`
    steps (at most a tenth of the schedule), then the decay (`decay_rate`)."""
    total = max(int(total), 1)
    warmup = min(int(warmup), total // 10)
    if step < warmup:
        return warmup_rate(lr, step, warmup)
    return decay_rate(schedule, lr, max(step - warmup, 0) / max(total - warmup, 1))


def budget_progress(elapsed: float, usable: float, before: float = 0.0) -> float:
    """`--time-budget`'s decay progress: the fraction of the training time that has passed, this
    process's `elapsed` of its `usable` seconds, after `before` seconds of the earlier processes of
    a resumed run (so the schedule spans all of it, and a resumed run goes on from part-way).

    A function of the clock rather than of a step count planned from a measured speed: the speed
    changes (a slow first minute, other work on the machine coming and going, a pause), and a plan
    made from the first steps ended the decay after a sixth of the budget in a measured run (0.19
    steps/s while the machine was busy, 2.3 steps/s after); the clock cannot be wrong about how much
    of the budget is left."""
    return min(max((before + elapsed) / max(before + usable, 1e-9), 0.0), 1.0)


def class_priors(manifest: Any, splits: list[str], target: str) -> list[float] | None:
    """Fraction of the training slices' pixels in each output channel (from the manifest's per-patient
    label counts on the shard grid): NEC/NET, ED, ET or WT, TC, ET; None when the manifest lacks them."""
    counts = [0, 0, 0, 0]
    for pid in (p for split in splits for p in manifest.patients_of(split)):
        voxels = manifest.content["patients"][pid].get("class_voxels")
        if voxels is None:
            return None
        for label, n in enumerate(voxels):
            counts[label] += int(n)
    total = max(sum(counts), 1)
    nec, ed, et = counts[1], counts[2], counts[3]
    channels = (nec, ed, et) if target == "classes" else (nec + ed + et, nec + et, et)
    return [c / total for c in channels]


def init_head_bias(model: Any, priors: list[float] | None) -> None:
    """Start every output channel at its class prior, bias log(p / (1 - p)) (RetinaNet's and
    nnU-Net-style practice for rare classes): with a zero bias every pixel starts at p = 0.5, and
    the loss on the overwhelming background first drives the rare channels (NEC/NET, ~0.1 % of
    pixels) to zero, where measured runs stayed for hundreds of steps. Models without a `head`
    convolution are left as they are."""
    import torch

    head = getattr(model, "head", None)
    bias = getattr(head, "bias", None)
    if priors is None or bias is None or bias.numel() != len(priors):
        return
    with torch.no_grad():
        for i, p in enumerate(priors):
            p = min(max(p, 1e-6), 0.5)
            bias[i] = math.log(p / (1 - p))


__all__ = ["MIN_LR_FRACTION", "budget_progress", "class_priors", "decay_rate", "init_head_bias", "schedule_rate",
           "warmup_rate"]
