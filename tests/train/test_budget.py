"""Duration parsing, the epoch projection with a fake clock, and the stop-signal state."""

from __future__ import annotations

import os
import signal

import pytest

from train.config.durations import format_duration, parse_duration
from train.training.budget import Budget, StopRequested, StopSignal, projection_line


@pytest.mark.parametrize("text,seconds", [
    ("12h", 43200), ("90m", 5400), ("600s", 600), ("1h30m", 5400), ("1.5h", 5400), ("2d", 172800),
    ("600", 600), (" 11H 30M ", 41400), (45, 45), (".5m", 30),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "12", "h", "12x", "1h-30m", "-5m", "0s", "inf", "nan", "1h30", True])
def test_parse_duration_refuses(text):
    if text == "12":
        assert parse_duration(text) == 12  # a plain number is seconds
        return
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration():
    assert format_duration(3 * 3600 + 5 * 60) == "3h 05m"
    assert format_duration(750) == "12m 30s"
    assert format_duration(42) == "42s"


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_pace_stops_while_the_final_validation_still_fits():
    """Simulated on a fake clock: steps of 2 s, a 30 s validation after every 50 steps; where the
    pace refuses the next step, the budget stop's validation and checkpoint still fit, and it did
    not give up more than a step and a validation early."""
    from train.training.budget import SAFETY_SECONDS, Pace

    clock = FakeClock()
    budget = Budget(1000.0, clock=clock)
    pace = Pace(batch_size=4, val_slices=40)
    step, validation, measured = 2.0, 30.0, 0.0
    assert not pace.out_of_time(budget, measured)  # nothing measured: the first step starts
    while not pace.out_of_time(budget, measured):
        clock.now += step
        pace.steps, pace.train_seconds = pace.steps + 1, pace.train_seconds + step
        if pace.steps % 50 == 0:
            clock.now += validation
            measured = validation
    assert budget.remaining() >= validation + SAFETY_SECONDS
    assert budget.remaining() < 2 * (step + validation) + SAFETY_SECONDS
    assert not pace.out_of_time(Budget(None, clock=clock), measured)  # no budget, never out of time


def test_pace_estimates_a_validation_before_measuring_one():
    """A forward pass is about a third of a training step, so 40 validation slices at 2 s per step
    of 4 take ~40 / 4 x 2 / 3 s; the estimate must not be below that, and a measured one counts."""
    from train.training.budget import SAFETY_SECONDS, Pace

    pace = Pace(batch_size=4, val_slices=40)
    pace.steps, pace.train_seconds = 10, 20.0
    assert pace.reserve(0.0) >= 40 / 4 * 2.0 / 3 + SAFETY_SECONDS
    assert pace.reserve(30.0) >= 30.0 + SAFETY_SECONDS


def test_the_recent_pace_forgets_slow_first_steps_and_a_pause():
    """Decisions read the recent pace: the first step (cold caches) is never in it, and slow
    steps drop out once newer steps fill its window."""
    from train.training.budget import Pace

    pace = Pace(batch_size=4, val_slices=40)
    pace.record(60.0)  # the first step of the process
    for _ in range(4):
        pace.record(10.0)  # a busy minute
    assert pace.step_seconds() == 10.0
    for _ in range(200):
        pace.record(0.4)  # the steady pace
    assert pace.step_seconds() == pytest.approx(0.4)
    assert pace.steps == 205 and pace.train_seconds == pytest.approx(60 + 40 + 80)  # totals keep every step
    steps, seconds = pace.recent_total()
    assert seconds >= Pace.RECENT_SECONDS - 0.4 and steps == round(seconds / 0.4)


def test_projection_line_mentions_rate_total_and_budget():
    clock = FakeClock()
    budget = Budget(400.0, clock=clock)
    line = projection_line(steps=10, seconds=5.0, steps_per_epoch=100, epochs_left=10, budget=budget)
    assert line.startswith("2.00 steps/s") and "8m 20s" in line and "will end the run early" in line
    assert "early" not in projection_line(10, 5.0, 10, 1, Budget(600.0, clock=clock))


def test_stop_signal_catches_sigterm_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        stopped = StopRequested(stop.signum)
        assert stopped.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before
    assert StopRequested(signal.SIGINT).exit_code == 130


def test_second_sigint_interrupts_at_once():
    with StopSignal() as stop:
        stop.request(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    stop = StopSignal()
    stop.request(signal.SIGTERM)
    stop.request(signal.SIGINT)  # the first signal is the one reported
    assert stop.signum == signal.SIGTERM
