"""The one progress bar of the project: fork-safe, and readable in a log file.

    with Progress(console, "epoch 3/50", total=120) as advance:
        for batch in batches:
            ...
            advance()

It is redrawn from the caller's loop, never by rich's refresh thread: loader workers and Dask
workers are forked while a bar is live, and a fork while another thread is starting or ending can
deadlock the child in CPython 3.11 (measured: a DDP rank's loader worker hung in
`PyOS_AfterFork_Child`, the bar's thread having just started).

When the console is not a terminal (a log file, a batch job), a bar would vanish or fill the log
with control codes, so a plain line `title: done/total (rate/s, elapsed, ~left)` is printed every
`LOG_EVERY_SECONDS` instead, and once at the end.
"""

from __future__ import annotations

import time
from typing import Any, Callable

REFRESH_SECONDS = 0.1
LOG_EVERY_SECONDS = 30.0


def _clock_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A progress bar over `total` steps (None: unknown); the context value advances it by `n`.

    `transient` bars disappear when done (the training loop prints its own summary line);
    `log_every` sets the plain-line interval when the console is not a terminal."""

    def __init__(self, console: Any, title: str, total: int | None, *, transient: bool = True,
                 log_every: float = LOG_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True, soft_wrap=True)
        self.title, self.total, self.transient = title, total, transient
        self.log_every, self.clock = log_every, clock
        self.done = 0
        self.started = self.drawn = self.logged = 0.0
        self.live = self.console.is_terminal and not self.console.quiet
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[..., None]:
        self.started = self.drawn = self.logged = self.clock()
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                     transient=self.transient, auto_refresh=False)
            self._task = self._bar.add_task(self.title, total=self.total)
            self._bar.start()
        return self.advance

    def describe(self, title: str) -> None:
        """Change the title (e.g. the patient being processed)."""
        self.title = title
        if self._bar is not None:
            self._bar.update(self._task, description=title)

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if self._bar is not None:
            self._bar.advance(self._task, n)
            if now - self.drawn >= REFRESH_SECONDS:
                self.drawn = now
                self._bar.refresh()
        elif now - self.logged >= self.log_every:
            self.logged = now
            self._log_line(now)

    def line(self) -> str:
        """`title: done/total (rate/s, elapsed, ~left)` as printed to a log."""
        now = self.clock()
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        left = ""
        if self.total is not None and rate > 0 and self.done < self.total:
            left = f", ~{_clock_text((self.total - self.done) / rate)} left"
        return f"{self.title}: {self.done}{of} ({rate:.2f}/s, {_clock_text(elapsed)} elapsed{left})"

    def _log_line(self, now: float) -> None:
        if not self.console.quiet:
            self.console.print(self.line(), highlight=False, markup=False, soft_wrap=True)  # whole in a log

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.refresh()
            self._bar.stop()
        elif not self.transient and exc[0] is None:
            self._log_line(self.clock())


__all__ = ["Progress", "LOG_EVERY_SECONDS"]
