"""`--threads`: how many intra-op threads a CPU run computes with, and following what other work
leaves of the CPU.

On a CPU that other processes share, two intra-op threads on two cores lose to one: a parallel
region ends only when its slowest thread does, and a busy process beside the run takes a core
from one of them for whole time slices. Measured on this project's 2-core Xeon beside one busy
process (bench/BENCHMARKS.md, section `shared-cpu-threads`): v2 in float32 made 2.65 steps/s with
two threads and 3.40 with threads that follow the load (one, there); in bf16, 0.75 and 1.07. Quiet,
two threads are faster (4.1 against 3.4 steps/s with one, `bench/shared_cpu.py --setting
"one=OMP_WAIT_POLICY=PASSIVE,threads=1"`).

So `ThreadGovernor` measures, every few seconds, the CPU time that processes other than this run
(and its loader workers) used on the cores this process may run on, and sets torch's intra-op
threads to the cores they leave free (at least 1, at most the count it started with). Linux only
(`/proc`); elsewhere `read_usage` returns None and the count stays as it started.

A run's numbers depend on its thread count in the last bits (a reduction's order), so a run
whose threads follow the load does not repeat bit for bit. Hence `auto` follows the load only
when the run's length already does (`--time-budget`), on the CPU, in one process, and when
OMP_NUM_THREADS does not pin the count; `--threads follow` always follows; `--threads N` pins N.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Callable

CHOICES = "auto, follow or a number of threads"
INTERVAL_S = 5.0
"""Seconds of CPU use each decision is made from: long enough to span many scheduler time slices,
short enough to follow a job that starts or ends within an epoch."""


def threads_problem(value: object) -> str | None:
    """The spelling of `--threads` (None when it is fine)."""
    if value in ("auto", "follow"):
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024:
        return None
    return f"must be {CHOICES} (1..1024), got {value!r}"


@dataclass(frozen=True)
class Usage:
    """Cumulative CPU seconds at one moment: all processes on `cores` CPUs, and this run's share."""

    busy: float
    ours: float
    cores: int


def _process_seconds(pid: int | str, ticks: float, proc: str) -> tuple[int, float]:
    """(parent pid, user + system CPU seconds) of one process, from /proc/PID/stat."""
    with open(f"{proc}/{pid}/stat", "rb") as handle:
        text = handle.read().decode("ascii", "replace")
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks


def _child_seconds(proc: str, ticks: float) -> dict[int, float]:
    """CPU seconds of each of this process's children now, by pid (raises OSError without /proc)."""
    me, found = os.getpid(), {}
    for entry in os.listdir(proc):
        if entry.isdigit() and int(entry) != me:
            try:
                parent, seconds = _process_seconds(entry, ticks, proc)
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile, or unreadable
            if parent == me:
                found[int(entry)] = seconds
    return found


def children(proc: str = "/proc") -> frozenset[int]:
    """The pids of this process's children now (empty where /proc cannot tell)."""
    try:
        return frozenset(_child_seconds(proc, 1.0))
    except OSError:
        return frozenset()


def read_usage(proc: str = "/proc", foreign: frozenset[int] = frozenset()) -> Usage | None:
    """This moment's `Usage`, or None where /proc cannot tell (not Linux, no permission). This run
    is this process and its children (loader workers) except the `foreign` ones, children that
    were there before the run (a harness's busy process is other work)."""
    try:
        ticks = float(os.sysconf("SC_CLK_TCK"))
        allowed = {f"cpu{n}" for n in os.sched_getaffinity(0)}
        busy = 0.0
        with open(f"{proc}/stat", "rb") as handle:
            for line in handle.read().decode("ascii", "replace").splitlines():
                name, *values = line.split()
                if name in allowed:
                    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
                    numbers = [int(v) for v in values[:8]] + [0] * max(0, 8 - len(values))
                    busy += (sum(numbers) - numbers[3] - numbers[4]) / ticks
        ours = _process_seconds(os.getpid(), ticks, proc)[1]
        ours += sum(seconds for pid, seconds in _child_seconds(proc, ticks).items() if pid not in foreign)
        return Usage(busy=busy, ours=ours, cores=len(allowed))
    except (OSError, ValueError, AttributeError):
        return None


def free_cores(before: Usage, after: Usage, seconds: float) -> float:
    """Cores that other processes left free between two readings `seconds` apart."""
    others = max(0.0, (after.busy - before.busy) - (after.ours - before.ours)) / max(seconds, 1e-9)
    return max(0.0, after.cores - others)


class ThreadGovernor:
    """Sets torch's intra-op threads to the cores other work leaves free (module docstring).

    `poll()` after every step is cheap: it reads /proc only once `INTERVAL_S` has passed, and
    returns the new thread count when it changed it (else None). The reader, clock and setter
    are injectable for tests."""

    def __init__(self, ceiling: int, *, read: Callable[[], Usage | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 set_threads: Callable[[int], None] | None = None, interval: float = INTERVAL_S) -> None:
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.ceiling, self.threads = max(1, ceiling), max(1, ceiling)
        self.read = read if read is not None else functools.partial(read_usage, foreign=children())
        self.clock, self.set_threads, self.interval = clock, set_threads, interval
        self.last = (self.clock(), self.read())

    def poll(self) -> int | None:
        now = self.clock()
        then, before = self.last
        if now - then < self.interval:
            return None
        after = self.read()
        self.last = (now, after)
        if before is None or after is None:
            return None
        wanted = max(1, min(self.ceiling, int(free_cores(before, after, now - then) + 0.5)))
        if wanted == self.threads:
            return None
        self.threads = wanted
        self.set_threads(wanted)
        return wanted


def plan(value: str, *, device_type: str, budgeted: bool, distributed: bool,
         environ: dict[str, str] | None = None) -> tuple[int | None, bool]:
    """What `--threads VALUE` means for this run: (threads to set now or None to keep torch's,
    whether a `ThreadGovernor` follows the load from there)."""
    environ = os.environ if environ is None else environ
    if value not in ("auto", "follow"):
        return int(value), False
    if device_type != "cpu" or distributed:
        return None, False
    if value == "follow":
        return None, True
    return None, budgeted and not environ.get("OMP_NUM_THREADS")


__all__ = ["CHOICES", "INTERVAL_S", "ThreadGovernor", "Usage", "free_cores", "plan", "read_usage", "threads_problem"]
