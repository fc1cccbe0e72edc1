"""Running `etl` in the test process and looking at what it left: exit code and output, the one
error line, the state of a folder, a small synthetic source and a build of it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from etl.cli import app
from shards_spec.errors import run_cli

SHAPE = (48, 48, 24)
SIZE = 32


def run_etl(args: list, capsys) -> tuple[int, str, str]:
    """Run the `etl` CLI in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        run_cli(app, [str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else int(exc.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class NullCapsys:
    """`run_etl`'s capsys for a module-scoped fixture, which cannot have pytest's: nothing is
    captured (the output shows in pytest's report), so the fixture checks the exit code."""

    class _Captured:
        out = err = ""

    def readouterr(self):
        return self._Captured()


def error_line(stderr: str) -> str:
    """The one `error:` line, which must be the last line of stderr (log lines may precede it)."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def snapshot(root: Path) -> dict[str, str] | None:
    """Relative path -> sha256 (files) or 'dir': the whole state of a folder (None if missing)."""
    if not root.exists():
        return None
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        state[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def synth(tmp: Path, layout: str = "brats2020", patients: int = 4, seed: int = 0) -> Path:
    """A synthetic source of `patients` patients of SHAPE in `layout`, written to `tmp`."""
    from etl.synth import synthesize

    synthesize(tmp, patients=patients, layout=layout, shape=SHAPE, seed=seed)
    return tmp


def build(src: Path, out: Path, capsys, *extra: str) -> dict:
    """`etl build-shards` in this process at SIZE, split train/val by half; the manifest it wrote."""
    code, stdout, stderr = run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", SIZE,
                                    "--split", "train=0.5,val=0.5", *extra], capsys)
    assert code == 0, stderr
    return json.loads((out / "manifest.json").read_text())


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Every file but the manifest (whose provenance holds a time)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def find_one(src: Path, pattern: str) -> Path:
    """The one file under `src` whose name matches the regular expression `pattern`."""
    found = [p for p in src.rglob("*") if re.search(pattern, p.name)]
    assert len(found) == 1, (pattern, found)
    return found[0]
