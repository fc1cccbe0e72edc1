"""The folder lock: a forked child (a loader worker) does not keep a dead holder's lock alive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from shards_spec.lock import FolderLock

HOLDER = """
import multiprocessing, os, sys, time
from shards_spec.lock import FolderLock

def worker():  # a loader worker's stand-in: lets go of the test's pipes, then lives on
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(30)

lock = FolderLock(sys.argv[1], "test holder")
lock.acquire()
child = multiprocessing.get_context("fork").Process(target=worker)
child.start()
print(child.pid, flush=True)
os._exit(0)  # the holder dies without releasing, as under kill -9; its forked child lives on
"""


def test_a_forked_child_does_not_hold_a_dead_holders_lock(tmp_path):
    folder = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", HOLDER, str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    child = int(done.stdout.split()[0])
    try:
        os.kill(child, 0)  # the holder is gone, its forked child is alive (this raises if not)
        with FolderLock(folder, "test taker") as lock:  # at once: no wait for the child to go
            assert lock.stale is not None and lock.stale["owner"] == "test holder"
    finally:
        os.kill(child, signal.SIGKILL)
