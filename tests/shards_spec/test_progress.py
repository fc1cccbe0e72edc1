"""The shared progress bar: plain lines when the console is not a terminal."""

from __future__ import annotations

import io
import threading

from rich.console import Console

from shards_spec.progress import Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_every_interval_and_at_the_end_when_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    clock = FakeClock()
    with Progress(console, "epoch 1/2", total=10, transient=False, log_every=5.0, clock=clock) as advance:
        for _ in range(10):
            clock.now += 1.0
            advance()
    lines = out.getvalue().splitlines()
    # after 5 s and 10 s (interval), then once more at the end
    assert lines[0] == "epoch 1/2: 5/10 (1.00/s, 0:05 elapsed, ~0:05 left)"
    assert lines[1] == "epoch 1/2: 10/10 (1.00/s, 0:10 elapsed)"
    assert len(lines) == 3 and lines[2] == lines[1]


def test_terminal_bar_starts_no_refresh_thread():
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    before = threading.active_count()
    with Progress(console, "x", total=3) as advance:
        assert threading.active_count() == before  # no rich refresh thread while loader workers fork
        advance(3)
    assert threading.active_count() == before
