"""Atomic file output and file digests: the one home of both for the whole project.

Every file this project writes for a user (shards, manifests, plans, checkpoints, metrics,
reports, predictions) goes through `write_atomic` or `atomic_path`: the bytes go to a temporary
name in the target's folder, are flushed and fsynced, and only then renamed over the target, so
a crash, a full disk or a size limit leaves the old file or the new one, never half of one.

The temporary name is `.<name>.<pid>-<8 hex>.partial[<suffix>]` (`TEMPORARY` matches it), with
`<name>` cut short when the whole would pass the folder's NAME_MAX (255 bytes), so any output
name the file system accepts can be written. `etl` recognises (and removes) what a crashed build
left behind by it; any other writer removes the stale temporaries of its own output when it next
writes that output (`atomic_path`): one whose writer process is gone and that is older than the
current process, so a killed `train predict` or `train export` leaves nothing for long.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".partial"
CHUNK = 1 << 20
NAME_MAX = 255
"""Bytes in one file name on common file systems (ext4, xfs, btrfs, APFS, NTFS); the folder's own
limit (`pathconf`) is used where the system reports one."""
PID_WIDTH = 10
"""Digits kept free for the pid, so a name is cut the same way whatever process writes it."""
TEMPORARY = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + r"(?P<suffix>.*)$",
                       re.DOTALL)
"""A temporary name of `temporary_name`, with the (possibly cut) output name, the writer's pid and the suffix."""

_STARTED = time.time()  # this module is imported before this process writes anything through it
_stale: dict[str, dict[tuple[str, str], list[str]]] = {}  # folder -> (stem, suffix) -> stale temporaries
_stale_lock = threading.Lock()


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that `folder` accepts."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no such folder yet, or no pathconf (Windows)
        return NAME_MAX


def _cut(name: str, limit: int) -> str:
    """`name` cut to at most `limit` bytes (as the file system stores it), never inside a character."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:  # a name that is not UTF-8 stays bytes (surrogate escapes)
        return os.fsdecode(raw[:limit])
    return raw[:limit].decode("utf-8", "ignore")


def _stem(path: Path, suffix: str) -> str:
    fixed = len(os.fsencode(f"..{'0' * PID_WIDTH}-{'0' * 8}{TMP_SUFFIX}{suffix}"))
    return _cut(path.name, max(1, name_max(path.parent) - fixed))


def temporary_name(path: Path, suffix: str = "") -> Path:
    """A unique temporary sibling of `path` (same folder, so the rename is atomic) whose name fits
    the folder's NAME_MAX: `.<name>.<pid>-<8 hex>.partial<suffix>`, `<name>` cut short if need be."""
    path = Path(path)
    return path.with_name(f".{_stem(path, suffix)}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}{suffix}")


def _writer_gone(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows: keep the file
        return False
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, someone else's
        return False
    return False


def _find_stale(folder: str) -> dict[tuple[str, str], list[str]]:
    """The temporaries in `folder` that no running writer will finish: its writer process is gone
    (or it bears this process's pid but predates it: a container run again) and it is older than
    this process (so a writer on another machine sharing the folder, whose pid means nothing here,
    is left alone while it writes). Looked for once per folder per process."""
    found: dict[tuple[str, str], list[str]] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        match = TEMPORARY.match(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        ours = pid == os.getpid()
        if mtime < _STARTED - (1.0 if ours else 0.0) and (ours or _writer_gone(pid)):
            found.setdefault((match["stem"], match["suffix"]), []).append(entry.path)
    return found


def remove_stale_temporaries(path: Path, suffix: str = "") -> list[Path]:
    """Delete the stale temporaries (`_find_stale`) of the output `path` written with `suffix`;
    return them. `atomic_path` calls this, so a writer cleans what a killed run of it left."""
    path = Path(path)
    folder = os.path.abspath(path.parent)
    with _stale_lock:
        if folder not in _stale:
            _stale[folder] = _find_stale(folder)
        names = _stale[folder].pop((_stem(path, suffix), suffix), [])
    removed = []
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name)
            removed.append(Path(name))
    return removed


def refusal(exc: OSError) -> str:
    """Why a write was refused, for a one-line message: "No space left on device [ENOSPC]"."""
    code = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}" + (f" [{code}]" if code else "")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write `path` through (by any library: torch, nibabel, ...);
    on success fsync it and rename it into place, on any exception remove it.

    `suffix` is appended to the temporary name for libraries that choose a format by extension
    (nibabel: `.nii.gz`). A refused write is raised as an `OSError` naming `path`, never the
    temporary, with the system's one-line reason (also when a library wrapped it in its own error,
    `_refusal_of`); a name longer than the folder accepts is ENAMETOOLONG before anything is written.
    Stale temporaries of `path` (a killed earlier writer's) are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(os.fsencode(path.name)) > name_max(path.parent):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))
    remove_stale_temporaries(path, suffix)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        refused = _refusal_of(exc, tmp)
        if refused is None:
            raise
        raise OSError(refused.errno, os.strerror(refused.errno), str(path)) from (None if refused is exc else exc)
    finally:
        tmp.unlink(missing_ok=True)


REFUSED = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO})
"""The errors of a write the system refused (full disk, size limit, quota, read-only, device)."""


def _refusal_of(exc: BaseException, tmp: Path) -> OSError | None:
    """The error to report as the output's own: `exc` when it is an OSError about the temporary (or
    about no file); for a library that wraps a refused write in its own error (torch's zip writer,
    h5py's close: RuntimeError), the refusal (`REFUSED`) in its chain; None for anything else."""
    if isinstance(exc, OSError):
        return exc if exc.errno is not None and (exc.filename is None or str(exc.filename) == str(tmp)) else None
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in REFUSED:
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (text is UTF-8) to `path` atomically and durably; see the module doc."""
    payload = data.encode() if isinstance(data, str) else data
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)
    return path


def sha256_file(path: str | Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


__all__ = ["NAME_MAX", "REFUSED", "TEMPORARY", "TMP_SUFFIX", "atomic_path", "name_max", "refusal",
           "remove_stale_temporaries", "sha256_file", "temporary_name", "write_atomic"]
