"""Time budget and stop requests: when the training loop must end, and how.

Two ways a run ends early, on purpose different:

- `--time-budget 12h` (Colab's limit; also `90m`, `600s`, `1h30m`, `1.5h`): before every step
  the loop asks `Pace.out_of_time`: would the step (as long as the steps measured so far), then
  a validation (the longest measured, or an estimate) and a checkpoint still end before the
  limit? When not, it validates and writes a checkpoint in the middle of the epoch, resumable
  exactly with `--resume`; so the budget holds within one step plus the final validation,
  whatever the epoch length (an earlier rule that only refused whole epochs ran a 10-minute
  budget for 22 minutes when one epoch was longer than the budget).
- SIGINT / SIGTERM (Ctrl-C, a scheduler's pre-emption): `StopSignal` records the signal and the
  loop stops after the current step, keeping the checkpoint of the last completed epoch; the
  partial epoch is lost, and the process exits 128 + signal (130, 143). A second SIGINT raises
  `KeyboardInterrupt` at once.

The clock is injectable (`Budget(limit, clock=fake)`) and a stop can be requested by a hook
(`StopSignal.request`), so tests never race a timer.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from typing import Callable

from ..config.durations import format_duration

SAFETY_SECONDS = 5.0
"""Kept free after the final validation, for the checkpoint write and scheduler jitter."""


class Budget:
    """A wall-clock limit measured from construction (the start of this process's training)."""

    def __init__(self, limit_seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit_seconds
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return float("inf") if self.limit is None else self.limit - self.elapsed()


class Pace:
    """What this process measured of its own speed, for `--time-budget` decisions: the wall-clock
    interval of every training step (data wait and hooks included), against a validation's
    measured seconds.

    Decisions read the *recent* pace (`RECENT_SECONDS` of steps, at least `RECENT_STEPS`), not the
    mean since the start: the first steps of a process are slow (cold caches, allocator, a loader
    warming up, cuDNN autotuning) and a machine's other work comes and goes, so a rate measured
    once is wrong for the rest of the run (measured: planned from 0.19 steps/s in its first steps,
    a 10-minute run went on at 2.3 steps/s and spent five sixths of its budget at the floor rate).
    The very first step of the process is left out of the recent pace for the same reason."""

    RECENT_SECONDS = 30.0
    RECENT_STEPS = 5

    def __init__(self, batch_size: int, val_slices: int) -> None:
        self.batch_size, self.val_slices = batch_size, val_slices
        self.steps, self.train_seconds = 0, 0.0
        self.recent: deque[float] = deque()
        self._recent_sum = 0.0

    def record(self, seconds: float) -> None:
        """One training step took `seconds` of wall clock."""
        self.steps += 1
        self.train_seconds += seconds
        if self.steps == 1:
            return
        self.recent.append(seconds)
        self._recent_sum += seconds
        while len(self.recent) > self.RECENT_STEPS and self._recent_sum - self.recent[0] >= self.RECENT_SECONDS:
            self._recent_sum -= self.recent.popleft()

    def recent_total(self) -> tuple[int, float]:
        """(steps, seconds) of the recent pace, or of every step until there is a recent one."""
        if self.recent:
            return len(self.recent), self._recent_sum
        return max(self.steps, 1), self.train_seconds

    def step_seconds(self) -> float:
        """Seconds per step at the recent pace (the mean of all steps until there is a recent one)."""
        steps, seconds = self.recent_total()
        return seconds / steps if self.steps else 0.0

    def reserve(self, val_seconds: float) -> float:
        """What must still fit after the next step: a validation and a checkpoint (the longest
        measured validation, or before the first one an estimate from the training speed: a
        forward pass is about a third of a training step; half of one is taken), with a margin."""
        validation = val_seconds
        if not validation and self.steps and self.train_seconds > 0:
            validation = 0.5 * self.step_seconds() / self.batch_size * self.val_slices
        return validation * 1.2 + SAFETY_SECONDS

    def out_of_time(self, budget: Budget, val_seconds: float) -> bool:
        """Whether one more step, then a validation and a checkpoint, would pass the budget."""
        return budget.limit is not None and budget.remaining() < self.step_seconds() + self.reserve(val_seconds)


def projection_line(steps: int, seconds: float, steps_per_epoch: int, epochs_left: int,
                    budget: Budget | None = None) -> str:
    """'12.3 steps/s; 40 epochs x 500 steps ~ 27m 06s (training steps only)' after the first steps."""
    rate = steps / seconds if seconds > 0 else float("inf")
    total = steps_per_epoch * epochs_left / rate if rate > 0 else float("inf")
    line = (f"{rate:.2f} steps/s; {epochs_left} epoch(s) x {steps_per_epoch} steps ~ "
            f"{format_duration(total)} (training steps only, validation adds to it)")
    if budget is not None and budget.limit is not None:
        line += f"; time budget left {format_duration(budget.remaining())}"
        if total > budget.remaining():
            line += " - the budget will end the run early, with a checkpoint where it stops (--resume continues)"
    return line


class StopRequested(Exception):
    """Raised by the loop when a stop signal arrived; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(signal.Signals(signum).name)


class StopSignal:
    """Context manager catching SIGINT and SIGTERM into a flag the loop polls every step.

    States: idle -> (signal or `request`) -> requested; a second SIGINT while requested raises
    KeyboardInterrupt. Handlers are installed only in the main thread and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def request(self, signum: int = signal.SIGTERM) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handler(self, signum: int, frame: object) -> None:
        self.request(signum)

    def __enter__(self) -> StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
