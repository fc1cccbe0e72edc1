"""Duration parsing, the epoch projection with a fake clock, and the stop-signal state."""

from __future__ import annotations

import os
import signal

import pytest

from train.budget import Budget, StopRequested, StopSignal, format_duration, parse_duration, projection_line


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


def test_pace_refuses_a_step_when_it_and_a_validation_would_not_fit():
    from train.budget import SAFETY_SECONDS, Pace

    clock = FakeClock()
    budget = Budget(1000.0, clock=clock)
    pace = Pace(batch_size=4, val_slices=40)
    assert not pace.out_of_time(budget, val_seconds=0.0)  # nothing measured: the first step starts
    pace.steps, pace.train_seconds = 10, 20.0  # 2 s a step; a step's forward ~ a third, so validation
    # of 40 slices is estimated at 0.5 * 2 / 4 * 40 = 10 s before one is measured
    assert pace.reserve(0.0) == pytest.approx(10 * 1.2 + SAFETY_SECONDS)
    assert pace.reserve(30.0) == pytest.approx(30 * 1.2 + SAFETY_SECONDS)  # a measured validation wins
    clock.now = budget.start + 1000 - (2 + 30 * 1.2 + SAFETY_SECONDS) - 0.1  # just enough left
    assert not pace.out_of_time(budget, 30.0)
    clock.now += 0.2
    assert pace.out_of_time(budget, 30.0)
    assert not pace.out_of_time(Budget(None, clock=clock), 30.0)
    # a fresh budget of 1000 s holds (2 s x 50 steps + reserve) per epoch of 50 steps
    fresh = Budget(1000.0, clock=clock)
    per_epoch = 2 * 50 + 30 * 1.2 + SAFETY_SECONDS
    assert pace.steps_that_fit(fresh, 30.0, 50) == int(1000 / per_epoch * 50)


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
