"""The learning-rate schedules of `--schedule` (measured with bench/quality.py, docs/quality.md)."""

from __future__ import annotations

import math

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


__all__ = ["MIN_LR_FRACTION", "budget_progress", "decay_rate", "schedule_rate",
           "warmup_rate"]
