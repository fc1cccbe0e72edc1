"""Putting the out folder back: what a failed build removes, and what `--overwrite` sets aside.

A build that fails on bad data leaves the out folder exactly as it was before the command; an
`--overwrite` build moves the previous build's files into a stash inside the out folder and
deletes them only once the new manifest is written. Temporary files of a crashed run (names
ending in `TMP_SUFFIX`) are removed by the next run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .plan import JOURNAL_NAME, STASH_NAME, STOP_NAME
from .writers.files import TMP_SUFFIX


def _tree(root: Path) -> set[str]:
    if not root.exists():
        return set()
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


class OutputGuard:
    """Remembers the out folder as it was, so a failed build can put it back exactly.

    `snapshot()` records every path under `out`; `stash()` (for --overwrite) moves the old
    content aside into `STASH_NAME`; `rollback()` deletes every path this run added and moves
    stashed content back; `commit()` drops the stash. Files that existed before are never
    rewritten by a build except with identical bytes (plan, zarr group metadata, a rebuilt shard)
    or appended to (the journal, cut back to its old length), so this restores the folder.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.existed = out.exists()
        self.before = _tree(out)
        journal = out / JOURNAL_NAME
        self.journal_size = journal.stat().st_size if journal.exists() else None  # appended to by this run
        self.stashed = False

    def stash(self) -> None:
        stash = self.out / STASH_NAME
        shutil.rmtree(stash, ignore_errors=True)  # a crashed earlier --overwrite: its content was replaced already
        stash.mkdir()
        for entry in sorted(self.out.iterdir()):
            if entry.name != STASH_NAME:
                os.replace(entry, stash / entry.name)
        self.stashed = True

    def rollback(self) -> None:
        out = self.out
        if not self.existed:
            shutil.rmtree(out, ignore_errors=True)
            return
        keep = set() if self.stashed else self.before
        for path in sorted(_tree(out), key=lambda p: p.count("/"), reverse=True):
            if path == STASH_NAME or path.startswith(STASH_NAME + "/") or path in keep:
                continue
            full = out / path
            if full.is_dir() and not full.is_symlink():
                shutil.rmtree(full, ignore_errors=True)
            else:
                full.unlink(missing_ok=True)
        if self.journal_size is not None and not self.stashed:
            with open(out / JOURNAL_NAME, "r+b") as handle:
                handle.truncate(self.journal_size)
        if self.stashed:
            stash = out / STASH_NAME
            for entry in sorted(stash.iterdir()):
                os.replace(entry, out / entry.name)
            stash.rmdir()
            self.stashed = False

    def commit(self) -> None:
        shutil.rmtree(self.out / STASH_NAME, ignore_errors=True)
        self.stashed = False


def remove_partials(out: Path) -> None:
    """Delete what a crashed run left behind: temporary files and folders (`*.partial`), a stop file."""
    if not out.exists():
        return
    (out / STOP_NAME).unlink(missing_ok=True)
    for path in sorted(out.rglob("*" + TMP_SUFFIX), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
