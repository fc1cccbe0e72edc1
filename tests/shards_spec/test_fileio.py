"""The one atomic write: whole new file or the old one, never a temporary left behind."""

from __future__ import annotations

import os
import resource

import pytest

from shards_spec.fileio import TMP_SUFFIX, atomic_path, sha256_file, write_atomic


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
