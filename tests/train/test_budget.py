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


def test_budget_refuses_an_epoch_that_would_not_fit():
    clock = FakeClock()
    budget = Budget(1000.0, clock=clock)
    assert budget.allows_epoch([])  # nothing measured yet: the first epoch always starts
    clock.now += 400
    assert budget.remaining() == 600
    # projected: longest measured epoch * 1.05 + 5 s
    assert Budget.projected_epoch([300.0, 400.0]) == pytest.approx(425.0)
    assert budget.allows_epoch([300.0, 400.0])
    clock.now += 200  # 400 s left
    assert not budget.allows_epoch([300.0, 400.0])
    assert budget.allows_epoch([100.0])
    assert Budget(None, clock=clock).allows_epoch([1e9])


def test_projection_line_mentions_rate_total_and_budget():
    clock = FakeClock()
    budget = Budget(400.0, clock=clock)
    line = projection_line(steps=10, seconds=5.0, steps_per_epoch=100, epochs_left=10, budget=budget)
    assert line.startswith("2.00 steps/s") and "8m 20s" in line and "will stop the run early" in line
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
