"""Fault injection for tests that run `train run` as a subprocess (torchrun), where no Python
hook can be passed in: the one place such hooks live on the training side.

`TRAIN_FAULT_SIGTERM_AT="EPOCH:STEP:RANK"` (0-based) makes that rank send itself SIGTERM after
that training step: the real signal path, at a known step, never a race against a timer.
"""

from __future__ import annotations

import os
from typing import Any, Callable

SIGTERM_AT_ENV = "TRAIN_FAULT_SIGTERM_AT"


def sigterm_hook(rank: int) -> Callable[[int, int, Any], None] | None:
    """The `TRAIN_FAULT_SIGTERM_AT` hook for this rank (an `after_step` callable), or None."""
    value = os.environ.get(SIGTERM_AT_ENV)
    if not value:
        return None
    epoch, step, target = (int(v) for v in value.split(":"))
    if target != rank:
        return None

    def deliver(at_epoch: int, at_step: int, stop: Any) -> None:
        if (at_epoch, at_step) == (epoch, step):
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    return deliver


__all__ = ["SIGTERM_AT_ENV", "sigterm_hook"]
