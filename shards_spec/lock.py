"""One writer per folder: an exclusive lock that a dead process cannot leave behind.

    with FolderLock(out, "etl build-shards"):      # refuses a second writer with one line
        ...

The lock is `fcntl.flock` on a file inside the folder (`LOCK_NAME`), taken without waiting.
The kernel drops a `flock` when its process dies however it dies (`kill -9`, the OOM killer), so
a lock file left by a dead process is never mistaken for a live writer: it is taken over (and
`stale` says whose it was). The file holds the holder's pid, host, command and start time, so
the refusal can say who holds it. After taking the lock, the file on disk is checked to be the
one locked (a holder that released and unlinked it at that moment would otherwise let two
writers in). `flock` works on local file systems and on NFS (Linux maps it to NFS byte-range
locks); where locks are not supported at all, the lock is refused with the reason.

A folder that did not exist is created for the lock and removed again on release if it is then
empty, so a command that fails before writing anything leaves no trace.

A forked child (a DataLoader worker) closes its inherited copy of the lock's descriptor at once:
the lock belongs to the open file, so a child still holding a copy kept a killed holder's lock
alive until the child noticed and exited (measured: a second `train run` was refused for ~1 s
after `kill -9` of a run with a loader worker).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .checked_io import refuse_broken_link
from .errors import ToolError

LOCK_NAME = ".brats-shards.lock"
"""The lock file in a locked folder; readers and folder checks ignore it."""

_HELD: set[int] = set()
"""Descriptors of the locks this process holds (closed in forked children)."""


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class LockedError(ToolError):
    """Another live process is writing into the folder."""


class FolderLock:
    """Exclusive lock on `folder` for the lifetime of the `with` block (or `acquire`/`release`)."""

    def __init__(self, folder: str | Path, owner: str) -> None:
        self.folder = Path(folder)
        self.owner = owner
        self.path = self.folder / LOCK_NAME
        self.created = False
        self.stale: dict | None = None  # the holder recorded by a dead process's lock file, if any
        self._fd: int | None = None
        self._pid = 0

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        import fcntl

        refuse_broken_link(self.folder)  # else mkdir says "File exists" for a link to nowhere
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self.created = True
        for _ in range(10):  # retried only when a releasing holder unlinked the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                self._drop_created()
                raise LockedError(f"is being written by another {holder.get('owner', 'process')} "
                                  f"({_describe(holder)}); wait for it to finish", self.folder) from None
            except OSError as exc:
                os.close(fd)
                self._drop_created()
                raise LockedError(f"cannot be locked for writing ({exc.strerror or exc}); "
                                  "use a folder on a file system that supports locks", self.folder) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:
            raise LockedError("cannot be locked: its lock file keeps being replaced", self.folder)
        previous = _read(fd)
        self.stale = previous or None
        _write(fd, {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self._fd, self._pid = fd, os.getpid()
        _HELD.add(fd)

    def release(self) -> None:
        if self._fd is None or self._pid != os.getpid():  # a forked child closed its copy at the fork
            return
        try:
            self.path.unlink(missing_ok=True)  # unlink first, then unlock: see the module docstring
        finally:
            _HELD.discard(self._fd)
            os.close(self._fd)
            self._fd = None
        self._drop_created()

    def _drop_created(self) -> None:
        if self.created:
            try:
                self.folder.rmdir()  # only when empty: a failed command leaves no new folder behind
            except OSError:
                pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data else {}
    except (OSError, ValueError, RecursionError):  # 4 KB of '[' nests past the recursion limit
        return {}
    return holder if isinstance(holder, dict) else {}


def _write(fd: int, holder: dict) -> None:
    data = json.dumps(holder, sort_keys=True).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that has not yet said who it is"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


__all__ = ["FolderLock", "LOCK_NAME", "LockedError"]
