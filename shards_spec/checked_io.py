"""Untrusted files and paths: a size- and sha256-checked reader, local regular files only, the
one bounded JSON/TOML reader for files a user hands over, and output paths that lead nowhere.

`CheckedReader` never reads past the size the manifest lists for a file and compares size and
sha256 at its end; for a remote file it resumes after a transient error within the file's retry
budget (`remote.Attempts`). `open_regular` refuses a FIFO, device or folder in place of a file,
since opening a FIFO blocks until a writer appears and a device can stream forever.

`read_json` / `read_toml` (and `parse_json` for bytes already in hand) are how every user file is
decoded (a `--config`, a `splits_final.json`, an MSD `dataset.json`, a run's `config.json`, a
plan): bounded in size (`read_small`), strict (UTF-8, no NaN/Infinity, no key twice in one object)
and nested at most `MAX_DEPTH` deep, so whatever the decoder can raise (`RecursionError` for a
file nested 100,000 deep, `ValueError`, `UnicodeDecodeError`) is one error naming the file, and a
caller that walks, prints or re-encodes the value cannot hit Python's recursion limit either.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

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


MAX_DEPTH = 64
"""Nesting a user's JSON or TOML file may have (nnU-Net's and our files nest 2 to 5 deep)."""


def parse_json(data: bytes | str, where: object, error: type[ToolError] = SpecError) -> Any:
    """The value of strict JSON `data`, or one `error` naming `where` (see the module docstring)."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=unique_keys)
    except RecursionError:
        raise error(f"is not valid JSON (nested more than {MAX_DEPTH} deep)", where) from None
    except UnicodeDecodeError:
        raise error("is not UTF-8 text", where) from None
    except ValueError as exc:  # json.JSONDecodeError, a repeated key, NaN, an integer of > 4300 digits
        raise error(f"is not valid JSON ({_reason(exc)})", where) from None
    _check_depth(value, where, error, "JSON")
    return value


def read_json(path: str | Path, limit: int, error: type[ToolError] = SpecError, note: str = "") -> Any:
    """The value of the JSON file `path`, read bounded (`read_small`) and parsed strictly (`parse_json`)."""
    return parse_json(read_small(path, limit, error, note), path, error)


def read_toml(path: str | Path, limit: int, error: type[ToolError] = SpecError, note: str = "") -> dict:
    """The table of the TOML file `path`, read bounded (`read_small`); TOML itself refuses a key
    given twice."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    raw = read_small(path, limit, error, note)
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except RecursionError:
        raise error(f"is not valid TOML (nested more than {MAX_DEPTH} deep)", path) from None
    except UnicodeDecodeError:
        raise error("is not UTF-8 text", path) from None
    except ValueError as exc:  # tomllib.TOMLDecodeError, an integer of > 4300 digits
        raise error(f"is not valid TOML ({_reason(exc)})", path) from None
    _check_depth(table, path, error, "TOML")
    return table


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are unique (`object_pairs_hook`): with a repeated key, json keeps
    the last silently, so two readers of one file could disagree on its meaning."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {shown(repeated)} appears twice in one object")
    return obj


def shown(value: Any, width: int = 60) -> str:
    """`repr(value)` cut to `width` characters, for an error line that echoes a user's value
    (a value can be megabytes long, or an integer too long for `repr`)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than sys.get_int_max_str_digits() digits
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= width else text[: width - 3] + "..."


def cut(text: str, width: int = 120) -> str:
    """A user's text (a case id, a decoder's message) cut to `width` characters for an error line."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _reason(exc: ValueError) -> str:
    lines = str(exc).splitlines()
    return cut(lines[0] if lines else type(exc).__name__)


def _check_depth(value: Any, where: object, error: type[ToolError], kind: str) -> None:
    """Refuse a value nested deeper than `MAX_DEPTH` (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise error(f"is not valid {kind} (nested more than {MAX_DEPTH} deep)", where)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def refuse_broken_link(path: str | Path, error: type[ToolError] = ToolError) -> None:
    """Refuse an output path that is a symbolic link leading nowhere (dangling) or that is, or runs
    through, a loop of links: creating a folder there fails with a misleading "File exists", and
    resolving it raises RuntimeError. A missing path (to be created) or an existing one passes."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise error("is a symbolic link to a path that does not exist (a dangling link); create its "
                        "target or give another folder", path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error("is, or runs through, a loop of symbolic links; give another folder", path) from None


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
