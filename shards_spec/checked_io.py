"""Streams of untrusted files: a size- and sha256-checked reader, and local regular files only.

`CheckedReader` never reads past the size the manifest lists for a file and compares size and
sha256 at its end; for a remote file it resumes after a transient error within the file's retry
budget (`remote.Attempts`). `open_regular` refuses a FIFO, device or folder in place of a file,
since opening a FIFO blocks until a writer appears and a device can stream forever.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

from . import remote
from .errors import SpecError, ToolError

CHUNK = 1 << 20


def open_regular(path: str | Path) -> BinaryIO:
    """Open a local file for reading only if it is a regular file.

    Opening a FIFO blocks until a writer appears, and a device can stream forever: opened
    non-blocking and checked with `fstat` on the open descriptor (no window for a swap).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise SpecError(f"is {kind}, not a regular file: refused", path)
        if flags & getattr(os, "O_NONBLOCK", 0):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: str | Path, limit: int, error: type[ToolError] = SpecError, note: str = "") -> bytes:
    """The bytes of a small local file a user hands over (dataset.json, splits_final.json, a
    `--config` file): a regular file (`open_regular`: never a FIFO or a device) of at most `limit`
    bytes, read no further than that; anything else is one `error` naming the file (`note` says
    after "larger than" what such a file usually holds)."""
    try:
        with open_regular(path) as handle:
            raw = handle.read(limit + 1)
    except FileNotFoundError:
        raise error("does not exist", path) from None
    except SpecError as exc:  # not a regular file
        raise error(exc.problem, path) from None
    except OSError as exc:
        raise error(f"cannot be read ({exc.strerror or exc})", path) from None
    if len(raw) > limit:
        raise error(f"is larger than {limit >> 20} MiB{note}", path)
    return raw


class CheckedReader(io.RawIOBase):
    """A read-only stream that refuses more than `size` bytes and checks size and sha256 at EOF.

    With `reopen` (remote files), a transient read error reopens the file and skips what was
    already read, checking that those bytes are unchanged, within the file's retry budget.
    """

    def __init__(self, raw: BinaryIO, *, size: int, sha256: str | None, name: str, reopen=None) -> None:
        self._raw, self._size, self._sha256, self._name = raw, size, sha256, name
        self._reopen = reopen
        self._attempts = remote.Attempts(name) if reopen is not None else None
        self._digest = hashlib.sha256()
        self._seen = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        # Ask for one byte past the listed size at most, so an over-long file is noticed early.
        want = min(len(view), self._size + 1 - self._seen)
        data = self._read(want) if want > 0 else b""
        if self._seen + len(data) > self._size:
            raise SpecError(f"holds more than the {self._size} bytes the manifest lists", self._name)
        view[: len(data)] = data
        self._digest.update(data)
        self._seen += len(data)
        if not data and len(view):
            self._finish()
        return len(data)

    def _read(self, want: int) -> bytes:
        while True:
            try:
                return self._raw.read(want)
            except Exception as exc:  # OSError, or a network library's own error type (aiohttp, botocore)
                if self._attempts is None:
                    raise SpecError(f"cannot be read ({remote.describe(exc)})", self._name) from None
                self._attempts.failed(exc)
                self._resume()

    def _resume(self) -> None:
        """Reopen after a failed read and skip the bytes already read, which must not have changed."""
        try:
            self._raw.close()
        except Exception:  # noqa: BLE001 - the old connection is broken anyway
            pass
        self._raw = self._reopen()
        again = hashlib.sha256()
        left = self._seen
        while left:
            chunk = self._raw.read(min(CHUNK, left))
            if not chunk:
                raise OSError("the file ended early on a retry")
            again.update(chunk)
            left -= len(chunk)
        if again.digest() != self._digest.copy().digest():
            raise SpecError("changed while it was being read (its first bytes differ on a retry)", self._name)

    def _finish(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self._seen != self._size:
            raise SpecError(f"holds {self._seen} bytes, the manifest lists {self._size}", self._name)
        if self._sha256 is not None and self._digest.hexdigest() != self._sha256:
            raise SpecError("sha256 differs from the manifest (corrupt or changed file)", self._name)

    def drain(self) -> None:
        """Read to the end, so the size and sha256 checks run."""
        while self.read(CHUNK):
            pass
        self._finish()

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def check_local(path: Path, entry: dict) -> str | None:
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"holds {size} bytes, the manifest lists {entry['bytes']}"
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != entry["sha256"]:
        return "has a sha256 other than the manifest's"
    return None
