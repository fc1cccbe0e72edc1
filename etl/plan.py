"""The build plan, the out-folder states it allows, resume and roll-back.

`plan.json` is written before any shard. It holds everything that decides the shard bytes (the
options, the source fingerprint, and patients -> shards), so a re-run can tell whether the folder
was started by the same command and which of its shards it may keep.

States of the out folder and what `build-shards` does in each (`inspect_out`):

    EMPTY      missing or empty                        -> build everything
    PARTIAL    plan.json equal to ours, no manifest     -> resume: keep complete shards, build the rest
    COMPLETE   plan.json equal to ours and a manifest   -> re-verify the listed files; leave them, or
                                                           rebuild only the shards that fail
    OTHER      plan.json differs (or a manifest without -> refused; with --overwrite the old content is
               a plan): another build's folder             set aside, and deleted only on success
    FOREIGN    non-empty, neither plan nor manifest     -> refused, even with --overwrite

A shard is complete when its final file(s) exist (writers rename into place, so a final name
means a whole file) and the journal holds its task result with file checksums that still match.
The journal (`.build-journal.jsonl`, one canonical JSON line per finished shard, appended and
fsynced by the orchestrator) carries the per-patient metadata the manifest needs; it is removed
once the manifest is written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from shards_spec.codec import encode_json
from shards_spec.errors import SpecError, ToolError
from shards_spec.manifest import MANIFEST_NAME, PLAN_NAME, SPEC_VERSION

from .writers.files import TMP_SUFFIX, sha256_file, write_atomic

PLAN_VERSION = 1
JOURNAL_NAME = ".build-journal.jsonl"
STOP_NAME = ".build-stop"
"""Created by the orchestrator when a task failed: tasks that have not started return at once."""
STASH_NAME = ".build-previous"
"""Where `--overwrite` sets the old content aside until the new build has succeeded."""


class OutputError(ToolError):
    """An out folder that this build may not write into."""


class OutState(Enum):
    EMPTY = "empty"
    PARTIAL = "partial"
    COMPLETE = "complete"
    OTHER = "other"
    FOREIGN = "foreign"


def make_plan(*, options: dict, fingerprint: str, shards: list[dict], skipped: list[dict]) -> dict:
    """The plan: byte-deciding options, source fingerprint, shards [{path, split, patients}]."""
    return {
        "spec_version": SPEC_VERSION,
        "plan_version": PLAN_VERSION,
        "options": options,
        "source_fingerprint": fingerprint,
        "shards": shards,
        "skipped": skipped,
    }


def plan_bytes(plan: dict) -> bytes:
    return (json.dumps(plan, sort_keys=True, indent=1) + "\n").encode()


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, None when the file is missing; unreadable is a SpecError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"is not valid JSON ({type(exc).__name__})", path) from None
    if not isinstance(obj, dict):
        raise SpecError("does not hold a JSON object", path)
    return obj


def plan_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two plans (option by option, then the rest)."""
    diffs = []
    old_opts, new_opts = old.get("options", {}), new.get("options", {})
    if isinstance(old_opts, dict):
        for key in sorted(set(old_opts) | set(new_opts)):
            if old_opts.get(key) != new_opts.get(key):
                diffs.append(f"{key}: {json.dumps(old_opts.get(key))} -> {json.dumps(new_opts.get(key))}")
    for key in ("spec_version", "plan_version", "source_fingerprint"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} differs")
    if not diffs and old != new:
        diffs.append("the patients or their shards differ")
    return diffs


def refuse_foreign(out: Path) -> None:
    """Refuse a non-empty folder that no build made (the FOREIGN state), whatever the options."""
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN_NAME).exists() and not (out / MANIFEST_NAME).exists():
        raise OutputError("is not empty and was not made by build-shards (no plan.json); choose an empty folder", out)


@dataclass
class OutInfo:
    state: OutState
    differences: list[str] = field(default_factory=list)


def inspect_out(out: Path, plan: dict) -> OutInfo:
    """Which state `out` is in with respect to `plan` (see the module docstring)."""
    if not out.exists():
        return OutInfo(OutState.EMPTY)
    if not out.is_dir():
        raise OutputError("exists and is not a folder", out)
    entries = [p for p in out.iterdir()]
    if not entries:
        return OutInfo(OutState.EMPTY)
    try:
        old = read_json(out / PLAN_NAME)
    except SpecError:
        return OutInfo(OutState.OTHER, ["plan.json is unreadable"])
    has_manifest = (out / MANIFEST_NAME).exists()
    if old is None:
        if has_manifest:
            return OutInfo(OutState.OTHER, ["it holds a manifest but no plan.json"])
        return OutInfo(OutState.FOREIGN)
    if old != plan:
        return OutInfo(OutState.OTHER, plan_differences(old, plan))
    return OutInfo(OutState.COMPLETE if has_manifest else OutState.PARTIAL)


# ---------------------------------------------------------------------------------------------
# journal of finished shards


def append_journal(out: Path, result: dict) -> None:
    """Append one finished shard's result (canonical JSON line), fsynced."""
    with open(out / JOURNAL_NAME, "ab") as handle:
        handle.write(encode_json(result) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_journal(out: Path) -> dict[str, dict]:
    """Shard path -> last recorded result; a torn last line (a crash mid-write) is ignored."""
    results: dict[str, dict] = {}
    try:
        lines = (out / JOURNAL_NAME).read_bytes().splitlines()
    except FileNotFoundError:
        return results
    for line in lines:
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and isinstance(result.get("path"), str):
            results[result["path"]] = result
    return results


def files_intact(out: Path, files: list[dict]) -> bool:
    """Every listed file exists with the recorded size and sha256."""
    for entry in files:
        path = out / entry["path"]
        try:
            if path.stat().st_size != entry["bytes"]:
                return False
        except FileNotFoundError:
            return False
        if sha256_file(path) != (entry["bytes"], entry["sha256"]):
            return False
    return True


def write_plan(out: Path, plan: dict) -> None:
    write_atomic(out / PLAN_NAME, plan_bytes(plan))


# ---------------------------------------------------------------------------------------------
# roll-back


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
