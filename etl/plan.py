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
once the manifest is written (`etl.resume`). Setting old content aside and putting it back is
`etl.guard`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterator
from pathlib import Path

from shards_spec import checked_io, limits
from shards_spec.errors import SpecError, ToolError
from shards_spec.lock import LOCK_NAME
from shards_spec.manifest import MANIFEST_NAME, PLAN_NAME, SPEC_VERSION

from .writers.files import write_atomic

PLAN_VERSION = 1
JOURNAL_NAME = ".build-journal.jsonl"
STOP_NAME = ".build-stop"
"""Created by the orchestrator when a task failed: tasks that have not started return at once."""
STASH_NAME = ".build-previous"
"""Where `--overwrite` sets the old content aside until the new build has succeeded."""
DISCARD_NAME = ".build-discarded"
"""The stash, renamed once the new build is committed, while it is being deleted."""
BOOKKEEPING = (PLAN_NAME, MANIFEST_NAME, JOURNAL_NAME, STOP_NAME, STASH_NAME, DISCARD_NAME, LOCK_NAME)
"""Names a build keeps at the top of the out folder, besides the shards."""


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


def plan_shards(patients_of_split: dict[str, list[str]], fmt: str, compression: str,
                patients_per_shard: int) -> list[dict]:
    """Patients of each split (in split order, each sorted by id), `patients_per_shard` at a time,
    as shards [{path, split, patients}] at the paths the format's writer gives."""
    from .writers import writer

    layout = writer(fmt)
    shards = []
    for split, patients in patients_of_split.items():
        for index, start in enumerate(range(0, len(patients), patients_per_shard)):
            shards.append({"path": layout.shard_path(split, index, compression), "split": split,
                           "patients": patients[start:start + patients_per_shard]})
    return shards


def plan_bytes(plan: dict) -> bytes:
    return (json.dumps(plan, sort_keys=True, indent=1) + "\n").encode()


def read_json(path: Path) -> dict | None:
    """A JSON object from `path` (a plan or manifest in an out folder, which may come from anyone),
    None when the file is missing; unreadable, larger than a manifest may be, or malformed is a
    SpecError (`checked_io.read_json`)."""
    if not os.path.lexists(path):
        return None
    obj = checked_io.read_json(path, int(limits.get("MAX_MANIFEST_MB")) << 20, SpecError)
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


def entries(out: Path) -> list[Path]:
    """What `out` holds at its top, but the lock of the build that is looking."""
    return [p for p in out.iterdir() if p.name != LOCK_NAME]


@contextlib.contextmanager
def locked(lock, log: Callable[[str], None], what: str) -> Iterator:
    """Hold `lock` (a `shards_spec.lock.FolderLock`) for the block: a folder that cannot hold it
    (its path runs through a file, no permission) is one `OutputError`, and taking over the lock
    of a writer (`what`: 'a build', 'an export') that died is said through `log`."""
    try:
        lock.acquire()
    except OSError as exc:
        raise OutputError(f"cannot be written ({exc.strerror or exc})", exc.filename or lock.folder) from None
    try:
        if lock.stale:
            log(f"{lock.folder}: taking over the lock of {what} that is no longer running "
                f"(pid {lock.stale.get('pid')} on {lock.stale.get('host')})")
        yield lock
    finally:
        lock.release()


def refuse_file(out: Path) -> None:
    checked_io.refuse_broken_link(out, OutputError)
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a folder", out)


def refuse_foreign(out: Path) -> None:
    """Refuse a non-empty folder that no build made (the FOREIGN state), whatever the options."""
    refuse_file(out)
    ours = [name for name in (PLAN_NAME, MANIFEST_NAME, STASH_NAME) if (out / name).exists()]
    if out.is_dir() and entries(out) and not ours:
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
    if not entries(out):
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


def write_plan(out: Path, plan: dict) -> None:
    write_atomic(out / PLAN_NAME, plan_bytes(plan))
