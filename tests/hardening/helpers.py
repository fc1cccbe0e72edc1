"""Helpers of the hardening suite: run a CLI and split its output, snapshot a folder, tamper with
a shard folder the way an attacker who controls both the shards and the manifest would.

`run_cli_inprocess` runs the real console entry point (`shards_spec.errors.run_cli` around the
typer app), so exit codes and the one-line policy are those of the installed `etl` / `train`
commands; `run_subprocess` runs the installed command itself where a real process matters
(signals, resource limits, `--debug` tracebacks).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

BIN = Path(sys.executable).parent
MARKER_ENV = "HARDENING_MARKER"


def run_cli_inprocess(tool: str, args: list, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `etl ARGS` / `train ARGS` run in this process."""
    from shards_spec.errors import run_cli

    if tool == "etl":
        from etl.cli import app
    else:
        from train.cli import app
    capsys.readouterr()
    try:
        run_cli(app, [str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else (exc.code if isinstance(exc.code, int) else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_subprocess(tool: str, args: list, *, env: dict | None = None, timeout: float = 240,
                   preexec_fn=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
    return subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=timeout, preexec_fn=preexec_fn)


RSS_MARGIN_MB = 100
"""How much more peak RSS than on the good input a refused hostile input may cost."""
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_measured(tool: str, args: list, env: dict | None = None, timeout: float = 240) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS in MB) of the installed command in a child process of its own."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(BIN / tool), *map(str, args)], stdout=out, stderr=err,
                                env={**CHILD_ENV, **(env or {})})
        timer = threading.Timer(timeout, proc.kill)  # a hang fails the test, it does not block it
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        assert proc.returncode != -9, f"{tool} {args} was killed after {timeout} s"
        return proc.returncode, err.read().decode(), usage.ru_maxrss / 1024  # Linux: KiB


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` message: its first line and any continuation lines after it."""
    lines = stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, stderr
    return lines[starts[0]:]


def assert_one_line(code: int, stderr: str, *fragments: str) -> str:
    """Non-zero exit, no traceback, exactly one `error:` line (the last line), naming every fragment."""
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    line = lines[0]
    for fragment in fragments:  # "a|b": either words
        assert any(f.lower() in line.lower() for f in fragment.split("|")), (fragment, line)
    return line


def snapshot(root: Path) -> dict[str, str] | None:
    """Relative path -> sha256 of the bytes (or 'dir'/'link'): the whole state of a folder."""
    root = Path(root)
    if not root.exists():
        return None
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


# ------------------------------------------------------------------------------- tampering


def load_manifest(root: Path) -> tuple[dict, dict]:
    data = json.loads((Path(root) / "manifest.json").read_text())
    return data["content"], data["provenance"]


def save_manifest(root: Path, content: dict, provenance: dict) -> None:
    """Write a manifest exactly as the tool would (canonical bytes), without validating it."""
    (Path(root) / "manifest.json").write_bytes(
        (json.dumps({"content": content, "provenance": provenance}, sort_keys=True, indent=1) + "\n").encode())


def reseal(root: Path) -> None:
    """Make the manifest's sizes and sha256 match the files as they are now (what an attacker does)."""
    content, provenance = load_manifest(root)
    for shard in content["shards"]:
        for entry in shard["files"]:
            path = Path(root) / entry["path"]
            if path.is_file():
                data = path.read_bytes()
                entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        shard["bytes"] = sum(e["bytes"] for e in shard["files"])
    save_manifest(root, content, provenance)


class Payload:
    """An object whose unpickling creates the file named by $HARDENING_MARKER (if it ever ran)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(Payload(str(marker)), protocol=2)
