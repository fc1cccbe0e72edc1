"""What a re-run keeps: the journal of finished shards, and the shards still intact on disk.

A crashed or interrupted build leaves `plan.json`, the journal and complete shards (writers
rename into place, so a final name means a whole file). The next run of the same command keeps
every shard whose journalled files still exist with their recorded size and sha256, and builds
the rest; a complete folder is re-checked the same way against its manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

from shards_spec.checked_io import parse_json
from shards_spec.codec import encode_json
from shards_spec.errors import SpecError, ToolError
from shards_spec.manifest import MANIFEST_NAME, parse

from .plan import JOURNAL_NAME, OutState
from .writers.files import sha256_file


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
            result = parse_json(line, JOURNAL_NAME)
        except SpecError:  # a torn line, or one nobody could decode
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


def recover(out: Path, plan: dict, state: OutState, root_key: str | None) -> tuple[dict[str, dict], object | None]:
    """Results of the shards that a resumed or complete folder already holds intact.

    Returns (shard path -> result, the existing manifest when every shard and root file
    (`root_key`: the writer's files outside shards) is intact, i.e. there is nothing to do).
    """
    if state is OutState.PARTIAL:
        return kept(out, plan, read_journal(out)), None
    if state is not OutState.COMPLETE:
        return {}, None
    try:
        manifest = parse((out / MANIFEST_NAME).read_bytes(), str(out / MANIFEST_NAME))
    except ToolError:
        return {}, None
    done = kept(out, plan, results_from_content(manifest.content, plan))
    root_files = manifest.content.get(root_key, []) if root_key else []
    intact = len(done) == len(plan["shards"]) and files_intact(out, root_files)
    return done, manifest if intact else None


def kept(out: Path, plan: dict, results: dict[str, dict]) -> dict[str, dict]:
    """The results whose shard is complete: planned, journalled, files present and unchanged."""
    planned = {s["path"]: s for s in plan["shards"]}
    complete = {}
    for path, result in results.items():
        spec = planned.get(path)
        if spec is None or result.get("failed") or result.get("cancelled"):
            continue
        accounted = set(result["patients"]) | {s["patient"] for s in result["skipped"]}
        if accounted != set(spec["patients"]):
            continue
        if result["patients"] and not result["files"]:
            continue
        if files_intact(out, result["files"]):
            complete[path] = result
    return complete


def results_from_content(content: dict, plan: dict) -> dict[str, dict]:
    """Task results recovered from an existing manifest (to keep its intact shards)."""
    by_path = {s["path"]: s for s in content["shards"]}
    results = {}
    for planned in plan["shards"]:
        path = planned["path"]
        shard = by_path.get(path)
        results[path] = {
            "path": path,
            "split": planned["split"],
            "files": shard["files"] if shard else [],
            "patients": {p: info for p, info in content["patients"].items() if info["shard"] == path},
            "skipped": [{k: v for k, v in s.items() if k != "shard"} for s in content["skipped"] if s.get("shard") == path],
            "failed": None,
        }
    return results
