"""`etl build-shards`: source folder -> shard folder, one Dask task per output shard.

The recipe, top to bottom (`build_shards`):

1. scan the source (layout, patients, headers); bad patients stop the build before anything is
   written, unless `--skip-bad` (`etl.scan`);
2. assign patients to splits (`etl.split`: seeded hash, stable when patients are added);
3. plan the shards (patients of one split, sorted by id, `--patients-per-shard` at a time) and
   compare the plan with the out folder (`etl.plan`): build, resume, leave, or refuse;
4. write `plan.json`, then run one task per missing shard (`etl.task.build_shard`: load ->
   preprocess -> write, paths in, small metadata out; run by `etl.runner`), journalling each
   finished shard (`etl.resume`);
5. assemble the manifest's `content` from the plan and the task results (`etl.assemble`: sorted,
   so it is byte-identical whatever the number of workers) and write `manifest.json` last,
   atomically.

A data problem found inside a task (NaN, a bad label, a truncated file) stops the build and
removes everything this run wrote, so the out folder is as it was before the command (`etl.guard`);
a crash or an interrupt leaves complete shards for the next run of the same command to keep.
Nothing here depends on the shard format or the source layout: those are the registries
`etl.writers` and `etl.sources`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from shards_spec.errors import SourceError
from shards_spec.manifest import MANIFEST_NAME, content_digest, to_bytes

from . import faults
from . import plan as planlib
from .assemble import assemble_content, make_provenance
from .guard import OutputGuard, recover_stash, refuse_foreign_files, remove_partials
from .options import BuildOptions
from .resume import append_journal, recover
from .runner import Runner
from .scan import scan_patients
from .sources.base import require_folder
from .split import SplitSpec, assign, over_patients
from .task import ShardTask

__all__ = ["BuildOptions", "BuildSummary", "Reporter", "build_shards"]


def build_shards(opts: BuildOptions, reporter: Reporter | None = None) -> BuildSummary:
    """Run `etl build-shards` (see the module docstring for the recipe)."""
    from shards_spec.lock import FolderLock

    reporter = reporter or Reporter()
    spec = opts.validate()
    src = require_folder(opts.src).resolve()  # absolute source paths: workers may run elsewhere
    planlib.refuse_file(opts.out)
    with planlib.locked(FolderLock(opts.out, "etl build-shards"), reporter.log, "a build"):  # one writer per out folder
        return _build(opts, spec, src, reporter)


def _build(opts: BuildOptions, spec: SplitSpec, src: Path, reporter: Reporter) -> BuildSummary:
    from .sources import source_fingerprint
    from .writers import writer

    started = time.time()
    out = opts.out
    planlib.refuse_foreign(out)  # cheap, before the scan

    # 1. scan
    found = scan_patients(src, opts.layout, opts.skip_bad, reporter.log, opts.max_patient_bytes)
    scan, refs, layout = found.scan, found.refs, found.scan.layout

    # 2. split and 3. plan, checked against the out folder
    spec = over_patients(spec, set(refs) | {s["patient"] for s in found.skipped}, set(refs))  # a --split-file's
    assignment = assign({pid: ref.grade for pid, ref in refs.items()}, spec)
    for warning in assignment.warnings:
        reporter.log(f"warning: {warning}")
    split_info = spec.describe(assignment.stratify)
    shards = planlib.plan_shards({split: assignment.patients_of(split) for split in spec.names}, opts.format,
                                 opts.compression, opts.patients_per_shard)
    plan = planlib.make_plan(options=opts.plan_options(layout, split_info), fingerprint=source_fingerprint(scan),
                             shards=shards, skipped=found.skipped)
    adopted = recover_stash(out, plan, reporter.log)  # an interrupted --overwrite is put right first
    state = _out_state(out, plan, opts.overwrite)
    done, complete = recover(out, plan, state, writer(opts.format).root_key)
    if complete is not None:
        reporter.log(f"{out} is already built with these options; its files match the manifest")
        return BuildSummary(out, "up to date", complete.content, complete.provenance, shards_kept=len(done),
                            unlabelled=list(scan.unlabelled), notes=list(scan.notes), seconds=time.time() - started)
    if state in (planlib.OutState.PARTIAL, planlib.OutState.COMPLETE):
        remove_partials(out)

    # 4. the plan, then the missing shards; a data error puts the folder back as it was
    guard = OutputGuard(out, stashed=adopted)
    if state is planlib.OutState.OTHER:
        reporter.log(f"--overwrite: replacing the shards in {out} (kept aside until this build succeeds)")
        guard.stash()
    try:
        root_files = _start_out(out, plan, state, opts.format, spec, guard)
        tasks = make_tasks(plan, done, refs, opts, src, out, layout)
        built, execution = run_shards(tasks, opts, out, done, len(plan["shards"]), reporter, guard)

        # 5. the manifest, last (after the format's last word on its root files)
        files = [f["path"] for result in done.values() for f in result["files"]]
        root_files = writer(opts.format).finish_root(out, spec.names, files) or root_files
        content = assemble_content(plan, done, opts, layout, split_info, root_files)
        for s in content["skipped"]:
            reporter.log(f"skipped {s['patient']}: {s.get('file') or ''}: {s['problem']}")
        provenance = make_provenance(opts, src, layout, plan, scan, execution, built, started)
        _write_manifest(out, content, provenance, guard)
    except KeyboardInterrupt:  # Ctrl-C: complete shards stay for a resume, but an --overwrite puts the old build back
        if guard.stashed:
            guard.rollback()
        raise
    action = {planlib.OutState.PARTIAL: "resumed", planlib.OutState.COMPLETE: "repaired"}.get(state, "built")
    warnings = [f"{p}: {w}" for p, i in content["patients"].items() for w in i["warnings"]]
    return BuildSummary(out, action, content, provenance, shards_built=built, shards_kept=len(plan["shards"]) - built,
                        unlabelled=provenance["unlabelled"], notes=list(scan.notes),
                        warnings=assignment.warnings + warnings, seconds=time.time() - started)


# ---------------------------------------------------------------------------------------------
# the steps


def _out_state(out: Path, plan: dict, overwrite: bool) -> planlib.OutState:
    """Step 3: what the out folder holds with respect to `plan`; refuse what we may not touch."""
    info = planlib.inspect_out(out, plan)
    if info.state is planlib.OutState.FOREIGN:
        raise planlib.OutputError("is not empty and was not made by build-shards (no plan.json); choose an empty folder", out)
    if info.state is planlib.OutState.OTHER and not overwrite:
        shown = "; ".join(info.differences[:4]) + ("; ..." if len(info.differences) > 4 else "")
        raise planlib.OutputError(f"holds shards built with other options ({shown}); add --overwrite to replace them", out)
    if info.state is planlib.OutState.OTHER:
        refuse_foreign_files(out)  # --overwrite replaces a previous build, never the user's files
    return info.state


def _start_out(out: Path, plan: dict, state: planlib.OutState, fmt: str, spec: SplitSpec,
               guard: OutputGuard) -> list[dict]:
    """Step 4a: the out folder, `plan.json` (for a new build) and the format's root files."""
    from .writers import writer

    try:
        out.mkdir(parents=True, exist_ok=True)
        if state in (planlib.OutState.EMPTY, planlib.OutState.OTHER):
            planlib.write_plan(out, plan)
        return writer(fmt).write_root(out, spec.names)
    except OSError as exc:
        raise write_failed(exc, out, guard) from None


def make_tasks(plan: dict, done: dict, refs: dict, opts: BuildOptions, src: Path, out: Path,
               layout: str) -> list[ShardTask]:
    """One task per planned shard that is not already complete."""
    options = tuple(sorted(opts.resolved_source_options(layout).items()))
    return [
        ShardTask(root=str(out.resolve()), path=s["path"], split=s["split"], format=opts.format,
                  refs=tuple(refs[p] for p in s["patients"]), size=opts.size, channels=tuple(opts.channels),
                  norm=opts.norm, keep_empty=opts.keep_empty, compression=opts.compression,
                  source_options=options, skip_bad=opts.skip_bad, max_patient_bytes=opts.max_patient_bytes,
                  src=str(src), stop_file=planlib.STOP_NAME)
        for s in plan["shards"] if s["path"] not in done
    ]


def run_shards(tasks: list[ShardTask], opts: BuildOptions, out: Path, done: dict[str, dict], total: int,
               reporter: Reporter, guard: OutputGuard) -> tuple[int, dict]:
    """Step 4b: run the tasks, journalling each finished shard into `done`; (built, how they ran).

    A task's `SourceError` stops the others (a stop file makes unstarted tasks return at once),
    and once every running task has finished the folder is rolled back and the error raised.
    """
    built = 0
    reporter.start(total, len(done))
    try:
        with Runner(opts.workers, opts.scheduler, reporter.log, out / planlib.STOP_NAME) as runner:
            execution = runner.describe()
            for result in runner.run(tasks):
                if result.get("failed"):
                    runner.stop()
                    failed = result["failed"]
                    raise SourceError(failed["problem"], failed.get("path") or failed["patient"])
                append_journal(out, result)
                done[result["path"]] = result
                built += 1
                reporter.advance(result)
                faults.after_shard(built, len(done), total)
    except SourceError:
        reporter.finish()
        guard.rollback()
        raise
    except OSError as exc:
        reporter.finish()
        raise write_failed(exc, out, guard) from None
    finally:
        reporter.finish()
    return built, execution


def _write_manifest(out: Path, content: dict, provenance: dict, guard: OutputGuard) -> None:
    """Step 5: `manifest.json` last and atomically; then the build is committed."""
    from .writers.files import write_atomic

    try:
        write_atomic(out / MANIFEST_NAME, to_bytes(content, provenance))
    except OSError as exc:
        raise write_failed(exc, out, guard) from None
    (out / planlib.JOURNAL_NAME).unlink(missing_ok=True)
    guard.commit()


def write_failed(exc: OSError, out: Path, guard: OutputGuard) -> planlib.OutputError:
    """A full disk, a quota, a size limit or a permission while writing: like a crash, the complete
    shards stay (journalled, for the next run of the same command) and temporary files go; no
    manifest is written, so `etl verify` calls the folder unfinished. An --overwrite build puts
    the previous complete shards back instead."""
    import errno

    if guard.stashed:
        guard.rollback()
        kept = "the previous shards were put back"
    else:
        remove_partials(out)
        kept = "complete shards are kept; free space and re-run the same command to finish"
    code = errno.errorcode.get(exc.errno or 0, "")
    reason = f"{exc.strerror or exc}" + (f" [{code}]" if code else "")
    return planlib.OutputError(f"cannot be written ({reason}); {kept}", exc.filename or out)


# ---------------------------------------------------------------------------------------------
# what the build reports


class Reporter:
    """What the build tells its user; the CLI passes one that draws a progress bar, tests a silent one."""

    def log(self, message: str) -> None:
        pass

    def start(self, total: int, kept: int) -> None:
        pass

    def advance(self, result: dict) -> None:
        pass

    def finish(self) -> None:
        """Called once on success and again on the way out: must be idempotent."""


@dataclass
class BuildSummary:
    out: Path
    action: str  # "built", "resumed", "repaired", "up to date"
    content: dict
    provenance: dict
    shards_built: int = 0
    shards_kept: int = 0
    unlabelled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def digest(self) -> str:
        return content_digest(self.content)
