"""The learning-rate schedules of `--schedule`, a registry like the losses' (measured with
bench/quality.py, docs/quality.md).

Two kinds. A per-step schedule is a decay `decay(lr, t) -> rate`, t in [0, 1] the fraction of the
decay done; the `Trainer` warms up linearly over `--warmup` steps first, and t counts the steps
after it (or, under `--time-budget`, the larger of that and the budget's elapsed fraction,
`budget_progress`). A per-validation schedule (`plateau`) is a factory `make(optimizer, config)`
of a torch scheduler stepped with the validation mean Dice after each epoch.

    from train.recipe.schedules import register_schedule
    register_schedule("linear", decay=lambda lr, t: lr * (1.0 - t))   # then: train run --schedule linear
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

MIN_LR_FRACTION = 0.01
"""The cosine schedule ends at this fraction of --lr."""


def warmup_rate(lr: float, step: int, warmup: int) -> float:
    """The linear warm-up's rate at step `step` (< `warmup`)."""
    return lr * (step + 1) / (warmup + 1)


@dataclass(frozen=True)
class Schedule:
    """One `--schedule`: `decay` for a per-step schedule, or `per_validation` for one stepped with
    the validation score (exactly one of the two)."""

    decay: Callable[[float, float], float] | None = None
    per_validation: Callable[[Any, Any], Any] | None = None


SCHEDULES: dict[str, Schedule] = {}
"""Schedule name -> `Schedule`; `train run --schedule NAME`."""


def register_schedule(name: str, decay: Callable[[float, float], float] | None = None, *,
                      per_validation: Callable[[Any, Any], Any] | None = None) -> Schedule:
    """Register `decay(lr, t) -> rate` (t in [0, 1]) or `per_validation(optimizer, config) -> scheduler`
    (its `step(score)` is called after each validation, `state_dict()` goes into the checkpoint)."""
    if name in SCHEDULES:
        raise ValueError(f"a schedule named {name!r} is registered already")
    if (decay is None) == (per_validation is None):
        raise ValueError("give a schedule either decay(lr, t) or per_validation(optimizer, config), not both")
    SCHEDULES[name] = Schedule(decay, per_validation)
    return SCHEDULES[name]


def cosine(lr: float, t: float) -> float:
    """Cosine from `lr` to `MIN_LR_FRACTION` x lr."""
    return lr * (MIN_LR_FRACTION + (1.0 - MIN_LR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * t)))


def poly(lr: float, t: float) -> float:
    """nnU-Net's polynomial decay, lr (1 - t)^0.9."""
    return lr * (1.0 - t) ** 0.9


def plateau(optimizer: Any, config: Any) -> Any:
    """The seed's ReduceLROnPlateau on the validation mean Dice (`--plateau-factor`, `--plateau-patience`)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=config.plateau_factor,
                                                      patience=config.plateau_patience)


register_schedule("cosine", cosine)
register_schedule("poly", poly)
register_schedule("plateau", per_validation=plateau)


def decay_rate(schedule: str, lr: float, t: float) -> float:
    """The rate after the warm-up, `t` in [0, 1] the fraction of the decay done (clipped)."""
    decay = SCHEDULES[schedule].decay
    if decay is None:
        raise ValueError(f"--schedule {schedule} is stepped by validation, not per step")
    return decay(lr, min(max(t, 0.0), 1.0))


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


__all__ = ["MIN_LR_FRACTION", "SCHEDULES", "Schedule", "budget_progress", "cosine", "decay_rate",
           "plateau", "poly", "register_schedule", "schedule_rate", "warmup_rate"]
