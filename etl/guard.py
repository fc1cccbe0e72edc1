"""Putting the out folder back: what a failed build removes, and what `--overwrite` sets aside.

A build that fails on bad data leaves the out folder exactly as it was before the command. An
`--overwrite` build first checks that the folder holds only what a previous build wrote
(`foreign_files`: anything else is refused, never deleted), moves it into a stash inside the out
folder (`STASH_NAME`), and deletes the stash only once the new manifest is written: the stash is
renamed (`DISCARD_NAME`) and then deleted, so a stash found later is always a good previous
build. An interrupted `--overwrite` (Ctrl-C, a kill, a power cut) is put right by the next
`build-shards` on the folder (`recover_stash`): it resumes the new build with the stash still
kept if it is the same command, and otherwise puts the previous build back first.
Temporary files of a crashed run (names ending in `TMP_SUFFIX`) are removed by the next run.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from shards_spec.errors import SpecError, ToolError
from shards_spec.lock import LOCK_NAME
from shards_spec.manifest import MANIFEST_NAME, PLAN_NAME

from .plan import BOOKKEEPING, DISCARD_NAME, JOURNAL_NAME, STASH_NAME, STOP_NAME, OutputError, read_json
from .writers.files import TMP_SUFFIX

TEMPORARY = re.compile(r"^\..+\.\d+-[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + "$")
"""`shards_spec.fileio.temporary_name`: a file or zarr group a build was writing when it stopped."""
SHOWN = 4


def _tree(root: Path) -> set[str]:
    if not root.exists():
        return set()
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.name != LOCK_NAME}


class OutputGuard:
    """Remembers the out folder as it was, so a failed build can put it back exactly.

    `stash()` (for --overwrite) moves the old content aside into `STASH_NAME`; `rollback()`
    deletes every path this run added and moves stashed content back; `commit()` drops the
    stash. Files that existed before are never rewritten by a build except with identical bytes
    (plan, zarr group metadata, a rebuilt shard) or appended to (the journal, cut back to its
    old length), so this restores the folder. The lock file is left to its owner.
    """

    def __init__(self, out: Path, stashed: bool = False) -> None:
        self.out = out
        self.existed = out.exists() and bool(_tree(out))
        self.before = _tree(out)
        journal = out / JOURNAL_NAME
        self.journal_size = journal.stat().st_size if journal.exists() else None  # appended to by this run
        self.stashed = stashed  # True: adopting the stash of an interrupted --overwrite (`recover_stash`)

    def stash(self) -> None:
        stash = self.out / STASH_NAME
        stash.mkdir()  # never an old stash: `recover_stash` has put any back first
        for entry in sorted(self.out.iterdir()):
            if entry.name not in (STASH_NAME, LOCK_NAME):
                os.replace(entry, stash / entry.name)
        self.stashed = True

    def rollback(self) -> None:
        out = self.out
        keep = set() if self.stashed or not self.existed else self.before
        _remove_all_but(out, keep)
        if self.journal_size is not None and not self.stashed and self.existed:
            with open(out / JOURNAL_NAME, "r+b") as handle:
                handle.truncate(self.journal_size)
        if self.stashed:
            _unstash(out)
            self.stashed = False

    def commit(self) -> None:
        """The new build's manifest is written: the stash is no longer needed."""
        if (self.out / STASH_NAME).exists():
            drop_stash(self.out)
        self.stashed = False


def _remove_all_but(out: Path, keep: set[str]) -> None:
    """Delete every path under `out` that is not in `keep` (nor the stash, nor the lock)."""
    for path in sorted(_tree(out), key=lambda p: p.count("/"), reverse=True):
        if path.split("/")[0] in (STASH_NAME, DISCARD_NAME) or path in keep:
            continue
        full = out / path
        if full.is_dir() and not full.is_symlink():
            shutil.rmtree(full, ignore_errors=True)
        else:
            full.unlink(missing_ok=True)


def _unstash(out: Path) -> None:
    stash = out / STASH_NAME
    for entry in sorted(stash.iterdir()):
        os.replace(entry, out / entry.name)
    stash.rmdir()


def drop_stash(out: Path) -> None:
    """Delete a stash whose new build is committed: renamed first, so it is never half a stash."""
    os.replace(out / STASH_NAME, out / DISCARD_NAME)
    shutil.rmtree(out / DISCARD_NAME, ignore_errors=True)


def recover_stash(out: Path, plan: dict, log) -> bool:
    """Finish what an interrupted `--overwrite` left; True when its stash is adopted by this build.

    * a stash being deleted (`DISCARD_NAME`): its build was committed; finish deleting it;
    * a stash and the new build's manifest: the new build was committed; drop the stash;
    * a stash and the new build's plan equal to this build's: the same command again; resume it
      and keep the stash until this build is committed (True);
    * a stash otherwise: remove what the interrupted build wrote (refusing files it did not
      write) and put the previous build back.
    """
    shutil.rmtree(out / DISCARD_NAME, ignore_errors=True)
    if not (out / STASH_NAME).is_dir():
        return False
    if (out / MANIFEST_NAME).exists():
        drop_stash(out)
        return False
    try:
        current = read_json(out / PLAN_NAME)
    except SpecError:
        current = None
    if current == plan:
        log(f"resuming the interrupted --overwrite in {out} (the previous build stays set aside until it succeeds)")
        return True
    refuse_foreign_files(out, "an interrupted --overwrite left its previous build set aside, but")
    _remove_all_but(out, set())
    _unstash(out)
    log(f"{out}: put back the previous build that an interrupted --overwrite had set aside")
    return False


# ---------------------------------------------------------------------------------------------
# what a previous build wrote, and what it did not


def refuse_foreign_files(out: Path, why: str = "--overwrite replaces only what a previous build-shards wrote, but") -> None:
    """Raise OutputError naming a few files in `out` that no build of this tool wrote."""
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:SHOWN]) + (", ..." if len(foreign) > SHOWN else "")
        raise OutputError(f"{why} it also holds {len(foreign)} other file(s) or folder(s): {shown}; "
                          "move them elsewhere or choose another --out", out)


def foreign_files(out: Path) -> list[str]:
    """Paths under `out` (relative, sorted) that no build of this tool wrote.

    A build's own: its bookkeeping files at the top (`plan.BOOKKEEPING`), every file its manifest,
    its plan or its journal names (through the format's writer, `Writer.owned_paths`), the
    folders holding them, and its temporary files. What cannot be read (a damaged plan) owns
    nothing, so more is refused.
    """
    owned = _owned(out)
    foreign: list[str] = []

    def visit(folder: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            rel = prefix + entry.name
            if (not prefix and entry.name in BOOKKEEPING) or TEMPORARY.match(entry.name) or _owned_path(rel, owned):
                continue
            if entry.is_dir(follow_symlinks=False) and _holds_owned(rel, owned):
                visit(Path(entry.path), rel + "/")  # a folder of the build (a split): look inside
                continue
            foreign.append(rel)

    visit(out, "")
    return foreign


def _owned_path(rel: str, owned: set[str]) -> bool:
    return rel in owned or any(rel.startswith(prefix + "/") for prefix in owned)


def _holds_owned(rel: str, owned: set[str]) -> bool:
    return any(path.startswith(rel + "/") for path in owned)


def _owned(out: Path) -> set[str]:
    """Paths a previous build's manifest, plan and journal say it wrote."""
    from .resume import read_journal
    from .writers import WRITERS, writer

    owned: set[str] = set()
    try:
        manifest = read_json(out / MANIFEST_NAME) or {}
    except SpecError:
        manifest = {}
    content = manifest.get("content") if isinstance(manifest.get("content"), dict) else {}
    for shard in _dicts(content.get("shards")):
        owned |= {f["path"] for f in _dicts(shard.get("files")) if isinstance(f.get("path"), str)}
    for key in {w.root_key for w in WRITERS.values() if w.root_key}:
        owned |= {f["path"] for f in _dicts(content.get(key)) if isinstance(f.get("path"), str)}
    try:
        plan = read_json(out / PLAN_NAME) or {}
        shards = [s for s in _dicts(plan.get("shards")) if isinstance(s.get("path"), str)]
        splits = sorted({s.get("split") for s in shards if isinstance(s.get("split"), str)})
        owned |= writer(str((plan.get("options") or {}).get("format"))).owned_paths(shards, splits)
    except (SpecError, ToolError, AttributeError, KeyError, TypeError):
        pass
    for result in read_journal(out).values():
        owned |= {f["path"] for f in _dicts(result.get("files")) if isinstance(f.get("path"), str)}
    return {p for p in owned if isinstance(p, str) and p and not p.startswith(("/", "../")) and "/../" not in p}


def _dicts(value) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


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
