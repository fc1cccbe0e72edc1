"""Fault injection for tests: environment variables that make a build crash at a chosen point.

Crash recovery is only tested honestly if the crash is real and lands where it matters, not
after a timer. These hooks are read from the environment (so a test can set them on a
subprocess) and do nothing when unset:

* `ETL_FAULT_AFTER_SHARDS=N`: the orchestrator stops as if it crashed after N shards of a run
  (raises `InjectedFault`: no roll-back runs, as after a crash);
* `ETL_FAULT_KILL=1`, with the above: it SIGKILLs itself there instead (nothing of Python's
  clean-up runs, as after `kill -9` or the OOM killer); `ETL_FAULT_KILL=INT` (or `TERM`, any
  signal name) sends itself that signal instead, as a Ctrl-C (or `kill`) at that moment would;
  with `ETL_FAULT_KILL_GROUP=1` the signal goes to its whole process group, Dask workers
  included, as a terminal sends Ctrl-C (start the build in a process group of its own);
* `ETL_FAULT_KILL_WORKER=PATH`: the first task to create PATH (O_EXCL) SIGKILLs its own process
  after writing its shard and before returning, so a Dask worker dies mid-run with its output
  on disk.
"""

from __future__ import annotations

import os
import signal

AFTER_SHARDS_ENV = "ETL_FAULT_AFTER_SHARDS"
KILL_ENV = "ETL_FAULT_KILL"
KILL_WORKER_ENV = "ETL_FAULT_KILL_WORKER"
KILL_GROUP_ENV = "ETL_FAULT_KILL_GROUP"


class InjectedFault(RuntimeError):
    """Raised by the `ETL_FAULT_AFTER_SHARDS` hook to simulate a crash (no roll-back)."""


def after_shard(built: int, done: int, total: int) -> None:
    """The orchestrator's hook, called after each shard it journals (`built` in this run)."""
    value = os.environ.get(AFTER_SHARDS_ENV)
    if not value or built < int(value) or done >= total:
        return
    kill = os.environ.get(KILL_ENV)
    if kill:
        signum = signal.SIGKILL if kill == "1" else signal.Signals["SIG" + kill.upper()]
        if os.environ.get(KILL_GROUP_ENV):
            os.killpg(os.getpgrp(), signum)
        else:
            os.kill(os.getpid(), signum)
        return  # a handled signal (SIGINT: KeyboardInterrupt) has been raised by now
    raise InjectedFault(f"{AFTER_SHARDS_ENV}={value}: stopping after {built} shard(s)")


def task_finished() -> None:
    """The shard task's hook, called after its files are written and before it returns."""
    marker = os.environ.get(KILL_WORKER_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
