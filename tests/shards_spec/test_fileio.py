"""The one atomic write: whole new file or the old one, never a temporary left behind."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from shards_spec.fileio import TEMPORARY, TMP_SUFFIX, atomic_path, sha256_file, temporary_name, write_atomic


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_atomic(target, "old")
    write_atomic(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_failed_write_keeps_the_old_file_and_names_the_target(tmp_path):
    target = tmp_path / "out.bin"
    write_atomic(target, b"old")

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    import subprocess
    import sys

    code = ("import sys; from shards_spec.fileio import write_atomic\n"
            "try:\n    write_atomic(sys.argv[1], b'x' * 5000)\n"
            "except OSError as exc:\n    print(exc.filename); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code, str(target)], preexec_fn=limited, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == str(target)
    assert target.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]


def test_atomic_path_removes_the_temporary_on_an_exception(tmp_path):
    target = tmp_path / "img.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target, suffix=".nii.gz") as tmp:
            assert tmp.name.endswith(TMP_SUFFIX + ".nii.gz") and tmp.parent == tmp_path
            tmp.write_bytes(b"half")
            raise RuntimeError("library failed")
    assert list(tmp_path.iterdir()) == []


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    data = os.urandom(3 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == (len(data), hashlib.sha256(data).hexdigest())


# ------------------------------------------------------------------ long names, stale temporaries

LIMITED_WRITE = ("import sys; from shards_spec.fileio import write_atomic\n"
                 "try:\n    write_atomic(sys.argv[1], b'x' * 5000)\n"
                 "except OSError as exc:\n    print(exc.filename); sys.exit(3)\n")


@pytest.mark.parametrize("name", ["a" * 226, "b" * 240 + ".nii.gz", "c" * 255, "é" * 127, "ü" * 120 + ".nii.gz"])
def test_names_up_to_name_max_are_written_and_their_temporary_fits(tmp_path, name):
    """Output names of 230-255 bytes used to fail on the longer temporary name."""
    target = tmp_path / name
    assert len(os.fsencode(name)) > 225
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ""
    with atomic_path(target, suffix=suffix) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255 and tmp.name.endswith(TMP_SUFFIX + suffix)
        assert TEMPORARY.match(tmp.name)["pid"] == str(os.getpid())
        tmp.write_bytes(b"payload")
    assert target.read_bytes() == b"payload"
    write_atomic(target, "again")  # write_atomic too, over the existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and target.read_text() == "again"


def test_a_name_longer_than_the_folder_accepts_names_the_output(tmp_path):
    target = tmp_path / ("d" * 256)
    with pytest.raises(OSError) as raised:
        write_atomic(target, b"x")
    assert raised.value.errno == errno.ENAMETOOLONG and raised.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_write_of_a_long_name_names_the_output_not_the_temporary(tmp_path):
    target = tmp_path / ("e" * 250)
    write_atomic(target, b"old")
    done = subprocess.run([sys.executable, "-c", LIMITED_WRITE, str(target)], preexec_fn=_limit_1000,
                          capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == str(target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def _limit_1000() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temporary(folder, output: str, pid: int, suffix: str = "", age: float = 3600.0):
    path = folder / f".{output}.{pid}-{os.urandom(4).hex()}{TMP_SUFFIX}{suffix}"
    path.write_bytes(b"half")
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_stale_temporaries_of_the_output_are_removed_and_no_others(tmp_path):
    """Only a temporary of the same output whose writer is gone and that predates this process."""
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        stale = _temporary(tmp_path, "seg.nii.gz", dead, ".nii.gz")
        long_name = tmp_path / ("f" * 250)  # its temporaries bear the name cut short
        long_stale = temporary_name(long_name).with_name(temporary_name(long_name).name.replace(f".{os.getpid()}-",
                                                                                                 f".{dead}-"))
        long_stale.write_bytes(b"half")
        os.utime(long_stale, (time.time() - 3600,) * 2)
        kept = [_temporary(tmp_path, "seg.nii.gz", alive.pid, ".nii.gz"),  # its writer still runs
                _temporary(tmp_path, "seg.nii.gz", dead, ".nii.gz", age=-60),  # newer than this process
                _temporary(tmp_path, "other.nii.gz", dead, ".nii.gz")]  # another output's
        with atomic_path(tmp_path / "seg.nii.gz", suffix=".nii.gz") as tmp:
            tmp.write_bytes(b"new")
        assert not stale.exists() and all(p.exists() for p in kept)
        assert (tmp_path / "seg.nii.gz").read_bytes() == b"new"
        assert long_stale.exists()
        write_atomic(long_name, b"x")
        assert not long_stale.exists() and all(p.exists() for p in kept)
    finally:
        alive.kill()
        alive.wait()


KILLED_WRITER = """
import os, signal, sys
from shards_spec.fileio import atomic_path
with atomic_path(sys.argv[1], suffix=".nii.gz") as tmp:
    tmp.write_bytes(b"half written")
    os.kill(os.getpid(), signal.SIGKILL)
"""
NEXT_WRITER = """
import sys
from shards_spec.fileio import atomic_path
with atomic_path(sys.argv[1], suffix=".nii.gz") as tmp:
    tmp.write_bytes(b"whole")
"""


def test_the_next_run_removes_what_a_killed_writer_left(tmp_path):
    """A SIGKILLed writer (`train predict` / `train export` killed mid-write) leaves its temporary;
    the next process writing the same output removes it."""
    target = tmp_path / "seg.nii.gz"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and TEMPORARY.match(left[0]) and not target.exists()
    done = subprocess.run([sys.executable, "-c", NEXT_WRITER, str(target)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"] and target.read_bytes() == b"whole"


def test_a_refusal_a_library_wraps_in_its_own_error_names_the_output(tmp_path):
    """torch's zip writer and h5py's close raise RuntimeError over the refused write: reported as
    the system's one-line reason about the output; a library error of another kind stays itself."""
    target = tmp_path / "volume.h5"
    with pytest.raises(OSError) as raised:
        with atomic_path(target) as tmp:
            try:
                raise OSError(errno.ENOSPC, f"Can't write data (file write failed: filename = '{tmp}', ...)")
            except OSError:
                raise RuntimeError("Can't decrement id ref count (unable to extend file properly)")
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    with pytest.raises(RuntimeError):  # control: a failure that is not a refused write
        with atomic_path(target):
            try:
                raise FileNotFoundError(errno.ENOENT, "an input", "in.h5")
            except OSError:
                raise RuntimeError("bad input")
    assert list(tmp_path.iterdir()) == []
