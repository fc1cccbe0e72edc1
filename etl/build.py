"""`etl build-shards`: source folder -> shard folder, one Dask task per output shard.

The recipe, top to bottom (`build_shards`):

1. scan the source (layout, patients, headers); bad patients stop the build before anything is
   written, unless `--skip-bad`;
2. assign patients to splits (`etl.split`: seeded hash, stable when patients are added);
3. plan the shards (patients of one split, sorted by id, `--patients-per-shard` at a time) and
   compare the plan with the out folder (`etl.plan`): build, resume, leave, or refuse;
4. write `plan.json`, then run one task per missing shard (`build_shard`: load -> preprocess ->
   write, paths in, small metadata out), journalling each finished shard;
5. assemble the manifest's `content` from the plan and the task results (sorted, so it is
   byte-identical whatever the number of workers) and write `manifest.json` last, atomically.

A data problem found inside a task (NaN, a bad label, a truncated file) stops the build and
removes everything this run wrote, so the out folder is as it was before the command; a crash or
an interrupt leaves complete shards for the next run of the same command to keep.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from shards_spec.errors import SourceError, ToolError
from shards_spec.labels import CHANNELS, CONVENTION_OF_LAYOUT, LABEL_NAMES, check_channels
from shards_spec.manifest import MANIFEST_NAME, SPEC_VERSION, content_digest, parse, to_bytes, validate_content

from . import plan as planlib
from .split import Assignment, SplitSpec, assign, parse_split

FORMATS = ("webdataset", "zarr")
COMPRESSIONS = ("none", "gz")
NORMS = ("slice", "volume")
KAGGLE_CHANNEL_ORDER = ("flair", "t1", "t1ce", "t2")
FAULT_ENV = "ETL_FAULT_AFTER_SHARDS"
"""Test hook: the orchestrator stops as if it crashed after this many shards of a run."""
FAULT_KILL_ENV = "ETL_FAULT_KILL"
"""Test hook: with `ETL_FAULT_AFTER_SHARDS`, "1" makes the orchestrator SIGKILL itself there instead
of raising (nothing of Python's clean-up runs, as after `kill -9` or the OOM killer)."""
FAULT_KILL_WORKER_ENV = "ETL_FAULT_KILL_WORKER"
"""Test hook: a path; the first task to create it (O_EXCL) SIGKILLs its own process after writing
its shard and before returning, so a Dask worker dies mid-run with its output on disk."""
MAX_PROBLEM_LINES = 20
BRAIN_MASK_RULES = {
    "nifti": "any modality non-zero on the native grid (BraTS is skull-stripped)",
    "kaggle-h5": "any channel differs from its detected background value; the background is then set to 0",
}
ZARR_STORAGE = "zstd level 3, sharding codec: one shard per array, one chunk per slice, crc32c index"


class InjectedFault(RuntimeError):
    """Raised by the `ETL_FAULT_AFTER_SHARDS` hook to simulate a crash (no roll-back)."""


# ---------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class BuildOptions:
    """Everything `etl build-shards` takes; `plan_options` is the part that decides the bytes."""

    src: Path
    out: Path
    format: str = "webdataset"
    size: int = 128
    channels: tuple[str, ...] = CHANNELS
    split: str | None = None
    folds: int | None = None
    seed: int = 0
    workers: int | None = None  # None: one per core; 0: in this process, without Dask
    scheduler: str | None = None
    norm: str = "slice"
    patients_per_shard: int = 1
    layout: str | None = None
    kaggle_channel_order: tuple[str, ...] = KAGGLE_CHANNEL_ORDER
    keep_empty: bool = False
    skip_bad: bool = False
    overwrite: bool = False
    compression: str = "none"
    command: tuple[str, ...] = ()

    def validate(self) -> SplitSpec:
        """Check every option up front, naming the allowed values; return the split spec."""
        if self.format not in FORMATS:
            raise ToolError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.compression not in COMPRESSIONS:
            raise ToolError(f"--compress must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.format == "zarr" and self.compression != "none":
            raise ToolError("--compress applies to webdataset tars; zarr arrays are always zstd-compressed")
        if self.norm not in NORMS:
            raise ToolError(f"--norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if not 1 <= self.size <= 4096:
            raise ToolError(f"--size must be between 1 and 4096, got {self.size}")
        if self.patients_per_shard < 1:
            raise ToolError(f"--patients-per-shard must be at least 1, got {self.patients_per_shard}")
        if self.workers is not None and self.workers < 0:
            raise ToolError(f"--workers must be 0 (in this process) or more, got {self.workers}")
        for flag, names in (("--modalities", self.channels), ("--kaggle-channel-order", self.kaggle_channel_order)):
            try:
                check_channels(names)
            except ValueError as exc:
                raise ToolError(f"{flag}: {exc}") from None
        if sorted(self.kaggle_channel_order) != sorted(CHANNELS):
            raise ToolError(f"--kaggle-channel-order must name all of {', '.join(CHANNELS)} once")
        for flag, folder in (("--src", self.src), ("--out", self.out)):
            url = _as_url(folder)
            if url:
                raise ToolError(f"{flag} {url}: build-shards reads and writes folders on a file system, not fsspec URLs; "
                                "use a folder every Dask worker can reach (a shared mount), then publish the out folder "
                                "(README: Share shards with your team)")
        if self.src.resolve() == self.out.resolve() or self.src.resolve() in self.out.resolve().parents:
            raise ToolError("--out must not be the source folder or inside it", self.out)
        return parse_split(self.split, self.folds, self.seed)

    def plan_options(self, layout: str, split: dict) -> dict:
        options = {
            "format": self.format,
            "size": self.size,
            "channels": list(self.channels),
            "norm": self.norm,
            "keep_empty": self.keep_empty,
            "compression": self.compression,
            "patients_per_shard": self.patients_per_shard,
            "layout": layout,
            "split": split,
        }
        if layout == "kaggle-h5":
            options["kaggle_channel_order"] = list(self.kaggle_channel_order)
        return options


def _as_url(folder: Path | str) -> str | None:
    """The URL a `--src`/`--out` value was meant as (`s3://b/x` arrives as Path('s3:/b/x')), or None."""
    import re

    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$", str(folder))
    return f"{match.group(1)}://{match.group(2)}" if match else None


# ---------------------------------------------------------------------------------------------
# the per-shard task (runs on Dask workers: module-level, paths in, small metadata out)


@dataclass(frozen=True)
class ShardTask:
    root: str
    path: str
    split: str
    format: str
    refs: tuple  # etl.sources.PatientRef, one per patient of the shard
    size: int
    channels: tuple[str, ...]
    norm: str
    keep_empty: bool
    compression: str
    kaggle_channel_order: tuple[str, ...]
    skip_bad: bool
    src: str = ""
    stop_file: str = ""


def _jsonable(obj):
    """Plain JSON types (lists, not tuples; no numpy scalars), so results survive a round trip."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, bytes)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def portable(value, src: str):
    """`value` with absolute paths under the source root made relative (content holds no machine paths)."""
    if isinstance(value, dict):
        return {k: portable(v, src) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, src) for v in value]
    if isinstance(value, str) and src and src in value:
        return value.replace(src.rstrip("/") + "/", "").replace(src, ".")
    return value


def _stopped(task: ShardTask) -> bool:
    """The orchestrator asked the tasks that have not started to return at once."""
    return bool(task.stop_file) and Path(task.root, task.stop_file).exists()


def _patient_entry(task: ShardTask, ref, volume, slices) -> dict:
    import numpy as np

    mask = slices.mask.reshape(len(slices.slice_index), -1)
    class_voxels = np.asarray(slices.class_voxels, dtype=np.int64).reshape(-1, 4).sum(axis=0)
    entry = {
        "split": task.split,
        "shard": task.path,
        "key": ref.id,
        "slices": len(slices.slice_index),
        "tumour_slices": int(np.count_nonzero(mask.any(axis=1))),
        "class_voxels": [int(v) for v in class_voxels],
        "brain_voxels": int(sum(slices.brain_voxels)),
        "source_shape": [int(n) for n in volume.shape],
        "spacing": [float(v) for v in volume.spacing],
        "affine": np.asarray(volume.affine, dtype=np.float64).tolist(),
        "source_dtype": str(volume.source_dtype),
        "grade": ref.grade,
        "meta": portable(dict(ref.meta or {}), task.src),
        "warnings": portable([str(w) for w in volume.warnings], task.src),
        "notes": portable([str(n) for n in getattr(volume, "notes", [])], task.src),
    }
    if task.format == "zarr":
        from .writers.zarr import array_paths

        entry["arrays"] = array_paths(task.split, ref.id)
    return entry


def tune_allocator() -> None:
    """Let glibc keep freed memory for reuse in this worker process (Linux; a no-op elsewhere).

    Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap threshold
    at 128 KiB: every temporary array above that is then mapped fresh and zero-filled by the
    kernel (measured: 20x the page faults, and slab preprocessing 4x slower). A 32 MiB mmap
    threshold and a 256 MiB trim threshold restore reuse for the slab-sized temporaries.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (32 MiB is glibc's maximum on 64-bit)
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def build_shard(task: ShardTask) -> dict:
    """Load, preprocess and write the patients of one shard; return its metadata.

    A `SourceError` of one patient ends the task with `failed` set and nothing written, unless
    `skip_bad`, where the patient is listed in `skipped` and the others are written.
    """
    import torch

    from shards_spec.preprocess import preprocess_volume

    from .sources import load_patient
    from .writers import webdataset as wds_writer
    from .writers import zarr as zarr_writer

    result = {"path": task.path, "split": task.split, "files": [], "patients": {}, "skipped": [], "failed": None}
    if _stopped(task):
        result["cancelled"] = True
        return result
    root = Path(task.root)
    tune_allocator()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per task: the parallelism is across tasks
    try:
        records = []
        for ref in task.refs:
            try:
                volume = load_patient(ref, channels=task.channels, kaggle_channel_order=task.kaggle_channel_order,
                                      require_labels=True)
                slices = preprocess_volume(volume.volume, volume.brain, volume.labels, size=task.size,
                                           norm=task.norm, keep_empty=task.keep_empty)
            except SourceError as exc:
                problem = {"patient": ref.id, "file": portable(exc.path, task.src), "problem": exc.problem,
                           "path": exc.path}
                if not task.skip_bad:
                    result["failed"] = problem
                    return result
                result["skipped"].append(problem)
                continue
            result["patients"][ref.id] = _patient_entry(task, ref, volume, slices)
            del volume
            if task.format == "zarr":  # one patient group at a time bounds memory
                result["files"] += zarr_writer.write_patient(root, task.split, ref.id, slices)
            else:
                records.append((ref.id, ref.id, slices))
        if task.format == "webdataset" and records:
            result["files"] = wds_writer.write_shard(root, task.path, records, task.compression)
    finally:
        torch.set_num_threads(threads)
    result["files"] = sorted(result["files"], key=lambda f: f["path"])
    _maybe_kill_worker()
    return _jsonable(result)


def _maybe_kill_worker() -> None:
    marker = os.environ.get(FAULT_KILL_WORKER_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# running the tasks: in this process, on a LocalCluster, or on an existing scheduler


class Runner:
    """Runs shard tasks and yields their results as they finish.

    `workers=0` (and no scheduler) runs in this process, one task after another; otherwise a
    `LocalCluster` of `workers` single-threaded processes, or the cluster at `--scheduler` /
    `DASK_SCHEDULER_ADDRESS`. `stop()` makes tasks that have not started return at once (a stop
    file in the out folder, which every worker can see since it writes there) and waits for the
    running ones, so nothing is written after it returns.
    """

    def __init__(self, workers: int | None, scheduler: str | None, log: Callable[[str], None],
                 stop_file: Path | None = None) -> None:
        self.address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.log = log
        self.client = self.cluster = None
        self.stop_file = stop_file
        self.futures: list = []
        self.in_process = self.address is None and self.workers == 0

    def __enter__(self) -> "Runner":
        if self.in_process:
            return self
        import logging

        from distributed import Client, LocalCluster

        if self.address:
            self.client = Client(self.address)
            self.log(f"Dask scheduler {self.address}")
        else:
            single = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            self.cluster = LocalCluster(
                n_workers=self.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                silence_logs=logging.ERROR, env=single,
            )
            self.client = Client(self.cluster)
            self.log(f"Dask LocalCluster: {self.workers} worker process(es), 1 thread each")
        services = self.client.scheduler_info().get("services", {})
        if "dashboard" in services:
            self.log(f"Dask dashboard: {self.client.dashboard_link}")
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.cancel(self.futures)
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def describe(self) -> dict:
        """How the tasks run, for the provenance: scheduler kind and worker count."""
        if self.in_process:
            return {"scheduler": "in-process", "workers": 0}
        if self.address:
            workers = len(self.client.scheduler_info().get("workers", {}))
            return {"scheduler": "external", "workers": workers}
        return {"scheduler": "LocalCluster", "workers": self.workers}

    def run(self, tasks: list[ShardTask]) -> Iterator[dict]:
        if self.in_process:
            for task in tasks:
                yield build_shard(task)
            return
        from distributed import as_completed

        self.futures = self.client.map(build_shard, tasks, pure=False)
        for future in as_completed(self.futures):
            yield future.result()

    def stop(self) -> None:
        if self.in_process:
            return
        from distributed import wait

        if self.stop_file is not None:
            self.stop_file.touch()
        wait(self.futures)


# ---------------------------------------------------------------------------------------------
# reporting


class Reporter:
    """What the build tells its user; the CLI passes a rich one, tests a silent one."""

    def log(self, message: str) -> None:
        pass

    def start(self, total: int, kept: int) -> None:
        pass

    def advance(self, result: dict) -> None:
        pass

    def finish(self) -> None:
        pass


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


# ---------------------------------------------------------------------------------------------
# the recipe


def _relative(path: str | None, src: Path) -> str | None:
    """A source file path relative to the source root (content must not hold machine paths)."""
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(src.resolve()).as_posix()
    except ValueError:
        return Path(path).name


def _problem_patient(exc: SourceError, src: Path) -> str:
    """The patient a scan problem belongs to, from the path it names (SourceError has no id)."""
    import re

    from .sources.base import safe_id
    from .sources.nifti import layout_of_folder_name

    patient = getattr(exc, "patient", None)
    if patient:
        return str(patient)
    if not exc.path:
        return "?"
    path = Path(exc.path)
    for part in reversed(path.parts):
        kaggle = re.match(r"^volume_(\d+)_slice_\d+\.h5$", part)
        if kaggle:
            return f"volume_{int(kaggle.group(1))}"
        if layout_of_folder_name(part) is not None:
            return safe_id(part)
    return safe_id(path.parent.name if path.suffix else path.name)


def format_problems(problems: list[SourceError], total: int) -> str:
    """One line per bad patient (at most MAX_PROBLEM_LINES), then a summary line."""
    lines = [str(p) for p in problems[:MAX_PROBLEM_LINES]]
    if len(problems) > MAX_PROBLEM_LINES:
        lines.append(f"... and {len(problems) - MAX_PROBLEM_LINES} more")
    if len(problems) > 1:
        lines.append(f"{len(problems)} problem(s) in {total} patient folder(s); nothing was written "
                     "(--skip-bad builds the rest)")
    return "\n".join(lines)


def plan_shards(assignment: Assignment, spec: SplitSpec, opts: BuildOptions) -> list[dict]:
    """Patients of each split, sorted by id, `patients_per_shard` at a time -> shard paths."""
    from .writers.webdataset import shard_name

    shards = []
    for split in spec.names:
        patients = assignment.patients_of(split)
        for index, start in enumerate(range(0, len(patients), opts.patients_per_shard)):
            if opts.format == "webdataset":
                path = shard_name(split, index, opts.compression)
            else:
                path = f"{split}/{split}-{index:06d}"
            shards.append({"path": path, "split": split, "patients": patients[start:start + opts.patients_per_shard]})
    return shards


def _versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("brats-shards", "numpy", "torch", "nibabel", "h5py", "zarr", "webdataset", "dask", "distributed"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def _preprocessing(opts: BuildOptions, layout: str) -> dict:
    import numpy as np
    import torch

    from shards_spec.preprocess import FLOAT16_MAX, IMAGE_RESIZE, MASK_RESIZE, MIN_STD

    return {
        "size": opts.size,
        "norm": opts.norm,
        "keep_empty": opts.keep_empty,
        "zscore": f"over brain voxels in float64, population std; std < {MIN_STD:g} is not scaled",
        "image_resize": IMAGE_RESIZE,
        "mask_resize": MASK_RESIZE,
        "image_dtype": "float16",
        "image_clip": FLOAT16_MAX,
        "mask_dtype": "uint8",
        "brain_mask": BRAIN_MASK_RULES["kaggle-h5" if layout == "kaggle-h5" else "nifti"],
        "compression": ZARR_STORAGE if opts.format == "zarr" else opts.compression,
        "numpy_version": np.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }


def assemble_content(plan: dict, results: dict[str, dict], opts: BuildOptions, layout: str,
                     split_info: dict, zarr_groups: list[dict] | None) -> dict:
    """The manifest's `content` from the plan and every shard's result, all sorted."""
    shards, patients, skipped = [], {}, list(plan["skipped"])
    for planned in sorted(plan["shards"], key=lambda s: s["path"]):
        result = results[planned["path"]]
        skipped += [{"patient": s["patient"], "file": s["file"], "problem": s["problem"], "shard": planned["path"]}
                    for s in result["skipped"]]
        members = sorted(result["patients"])
        if not members:
            continue  # every patient of this shard was skipped: no file was written
        patients.update(result["patients"])
        shards.append({
            "path": planned["path"],
            "split": planned["split"],
            "patients": members,
            "records": len(members),
            "slices": sum(result["patients"][p]["slices"] for p in members),
            "bytes": sum(f["bytes"] for f in result["files"]),
            "files": result["files"],
        })
    splits = {}
    for name in split_info["order"]:
        members = sorted(p for p, info in patients.items() if info["split"] == name)
        voxels = [0, 0, 0, 0]
        grades: dict[str, int] = {}
        for p in members:
            voxels = [a + b for a, b in zip(voxels, patients[p]["class_voxels"])]
            grade = patients[p].get("grade")
            stratum = "unknown" if grade is None else str(grade)
            grades[stratum] = grades.get(stratum, 0) + 1
        splits[name] = {
            "patients": members,
            "records": len(members),
            "slices": sum(patients[p]["slices"] for p in members),
            "tumour_slices": sum(patients[p]["tumour_slices"] for p in members),
            "shards": sum(1 for s in shards if s["split"] == name),
            "class_voxels": voxels,
        }
        if split_info.get("stratify"):
            splits[name]["grades"] = dict(sorted(grades.items()))
    source = {"layout": layout, "label_convention": CONVENTION_OF_LAYOUT.get(layout, layout)}
    if layout == "kaggle-h5":
        source["kaggle_channel_order"] = list(opts.kaggle_channel_order)
    content = {
        "spec_version": SPEC_VERSION,
        "format": opts.format,
        "channels": list(opts.channels),
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "preprocessing": _preprocessing(opts, layout),
        "source": source,
        "split": split_info,
        "splits": splits,
        "shards": shards,
        "patients": dict(sorted(patients.items())),
        "skipped": sorted(skipped, key=lambda s: (s["patient"], s.get("file") or "")),
        "patients_per_shard": opts.patients_per_shard,
    }
    if zarr_groups is not None:
        content["zarr_groups"] = zarr_groups
    return _jsonable(validate_content(content))


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


def _kept(out: Path, plan: dict, results: dict[str, dict]) -> dict[str, dict]:
    """The results whose shard is complete: planned, journalled, files present and unchanged."""
    planned = {s["path"]: s for s in plan["shards"]}
    kept = {}
    for path, result in results.items():
        spec = planned.get(path)
        if spec is None or result.get("failed") or result.get("cancelled"):
            continue
        accounted = set(result["patients"]) | {s["patient"] for s in result["skipped"]}
        if accounted != set(spec["patients"]):
            continue
        if result["patients"] and not result["files"]:
            continue
        if planlib.files_intact(out, result["files"]):
            kept[path] = result
    return kept


def _fault_after() -> int | None:
    value = os.environ.get(FAULT_ENV)
    return int(value) if value else None


@dataclass
class SourcePatients:
    """What the scan found, reduced to what the build uses."""

    scan: object  # etl.sources.Scan
    refs: dict  # patient id -> PatientRef, the patients to build
    skipped: list[dict]  # scan problems left out with --skip-bad: {patient, file, problem}


def scan_patients(src: Path, opts: BuildOptions, reporter: Reporter) -> SourcePatients:
    """Step 1: scan the source; header-level problems stop here, before anything is written."""
    from shards_spec.codec import KEY_PATTERN

    from .sources import scan_source

    scan = scan_source(src, opts.layout, require_labels=True, check_headers=True)
    for note in scan.notes:
        reporter.log(note)
    problems = list(scan.problems)
    for ref in scan.patients:
        if not KEY_PATTERN.match(ref.id):
            problems.append(SourceError(f"patient id {ref.id!r} is not usable as a record key ([A-Za-z0-9_-], no dot)",
                                        src / ref.id))
    bad_ids = {_problem_patient(p, src) for p in problems}
    if problems and not opts.skip_bad:
        raise SourceError(format_problems(problems, len(scan.patients) + len(bad_ids)))
    refs = {ref.id: ref for ref in scan.patients if ref.id not in bad_ids}
    if not refs:
        raise SourceError("holds no usable labelled patient" + (f" ({len(problems)} bad)" if problems else ""), src)
    skipped = sorted(
        ({"patient": _problem_patient(p, src), "file": _relative(p.path, src), "problem": p.problem} for p in problems),
        key=lambda s: (s["patient"], s["file"] or ""),
    )
    return SourcePatients(scan, refs, skipped)


def recover(out: Path, plan: dict, state: planlib.OutState) -> tuple[dict[str, dict], object | None]:
    """Results of the shards that a resumed or complete folder already holds intact.

    Returns (shard path -> result, the existing manifest when every shard and group file is
    intact, i.e. there is nothing to do).
    """
    if state is planlib.OutState.PARTIAL:
        return _kept(out, plan, planlib.read_journal(out)), None
    if state is not planlib.OutState.COMPLETE:
        return {}, None
    try:
        manifest = parse((out / MANIFEST_NAME).read_bytes(), str(out / MANIFEST_NAME))
    except ToolError:
        return {}, None
    done = _kept(out, plan, results_from_content(manifest.content, plan))
    intact = len(done) == len(plan["shards"]) and planlib.files_intact(out, manifest.content.get("zarr_groups", []))
    return done, manifest if intact else None


def run_shards(tasks: list[ShardTask], opts: BuildOptions, out: Path, done: dict[str, dict],
               total: int, reporter: Reporter) -> tuple[int, dict]:
    """Step 4: run the tasks, journalling each finished shard into `done`; (built, how they ran).

    A task's `SourceError` stops the others (a stop file makes unstarted tasks return at once)
    and is raised once every running task has finished, so the caller can roll back.
    """
    fault_after = _fault_after()
    built = 0
    with Runner(opts.workers, opts.scheduler, reporter.log, out / planlib.STOP_NAME) as runner:
        execution = runner.describe()
        for result in runner.run(tasks):
            if result.get("failed"):
                runner.stop()
                failed = result["failed"]
                raise SourceError(failed["problem"], failed.get("path") or failed["patient"])
            planlib.append_journal(out, result)
            done[result["path"]] = result
            built += 1
            reporter.advance(result)
            if fault_after is not None and built >= fault_after and len(done) < total:
                if os.environ.get(FAULT_KILL_ENV) == "1":
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
                raise InjectedFault(f"{FAULT_ENV}={fault_after}: stopping after {built} shard(s)")
    return built, execution


def make_provenance(opts: BuildOptions, src: Path, layout: str, plan: dict, scan, execution: dict,
                    built: int, started: float) -> dict:
    return {
        "source": {"path": str(src), "layout": layout, "fingerprint": plan["source_fingerprint"]},
        "command": shlex.join(opts.command) if opts.command else None,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 3),
        **execution,
        "platform": f"{platform.system()} {platform.machine()}",
        "shards_built": built,
        "shards_kept": len(plan["shards"]) - built,
        "unlabelled": sorted(_relative(u, src) or str(u) for u in scan.unlabelled),
        "notes": list(scan.notes),
    }


def _write_failed(exc: OSError, out: Path, guard: planlib.OutputGuard) -> planlib.OutputError:
    """A full disk, a quota, a size limit or a permission while writing: like a crash, the complete
    shards stay (journalled, for the next run of the same command) and temporary files go; no
    manifest is written, so `etl verify` calls the folder unfinished. An --overwrite build puts
    the previous complete shards back instead."""
    import errno

    if guard.stashed:
        guard.rollback()
        kept = "the previous shards were put back"
    else:
        planlib.remove_partials(out)
        kept = "complete shards are kept; free space and re-run the same command to finish"
    code = errno.errorcode.get(exc.errno or 0, "")
    reason = f"{exc.strerror or exc}" + (f" [{code}]" if code else "")
    return planlib.OutputError(f"cannot be written ({reason}); {kept}", exc.filename or out)


def build_shards(opts: BuildOptions, reporter: Reporter | None = None) -> BuildSummary:
    """Run `etl build-shards` (see the module docstring for the recipe)."""
    from .sources import source_fingerprint

    reporter = reporter or Reporter()
    started = time.time()
    spec = opts.validate()
    src, out = opts.src.resolve(), opts.out  # absolute source paths: workers may run elsewhere
    if not opts.src.exists():
        raise SourceError("does not exist", opts.src)
    if not src.is_dir():
        raise SourceError("is not a folder", opts.src)
    planlib.refuse_foreign(out)  # cheap, before the scan

    # 1. scan
    found = scan_patients(src, opts, reporter)
    scan, refs, layout = found.scan, found.refs, found.scan.layout

    # 2. split and 3. plan, checked against the out folder
    assignment = assign({pid: ref.grade for pid, ref in refs.items()}, spec)
    for warning in assignment.warnings:
        reporter.log(f"warning: {warning}")
    split_info = spec.describe(assignment.stratify)
    plan = planlib.make_plan(options=opts.plan_options(layout, split_info), fingerprint=source_fingerprint(scan),
                             shards=plan_shards(assignment, spec, opts), skipped=found.skipped)
    info = planlib.inspect_out(out, plan)
    if info.state is planlib.OutState.FOREIGN:
        raise planlib.OutputError("is not empty and was not made by build-shards (no plan.json); choose an empty folder", out)
    if info.state is planlib.OutState.OTHER and not opts.overwrite:
        shown = "; ".join(info.differences[:4]) + ("; ..." if len(info.differences) > 4 else "")
        raise planlib.OutputError(f"holds shards built with other options ({shown}); add --overwrite to replace them", out)
    done, complete = recover(out, plan, info.state)
    if complete is not None:
        reporter.log(f"{out} is already built with these options; its files match the manifest")
        return BuildSummary(out, "up to date", complete.content, complete.provenance, shards_kept=len(done),
                            unlabelled=list(scan.unlabelled), notes=list(scan.notes), seconds=time.time() - started)
    if info.state in (planlib.OutState.PARTIAL, planlib.OutState.COMPLETE):
        planlib.remove_partials(out)

    # 4. the plan, then the missing shards; a data error puts the folder back as it was
    guard = planlib.OutputGuard(out)
    if info.state is planlib.OutState.OTHER:
        reporter.log(f"--overwrite: replacing the shards in {out} (kept aside until this build succeeds)")
        guard.stash()
    zarr_groups = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if info.state in (planlib.OutState.EMPTY, planlib.OutState.OTHER):
            planlib.write_plan(out, plan)
        if opts.format == "zarr":
            from .writers.zarr import write_root

            zarr_groups = write_root(out, spec.names)
    except OSError as exc:
        raise _write_failed(exc, out, guard) from None
    tasks = [
        ShardTask(root=str(out.resolve()), path=s["path"], split=s["split"], format=opts.format,
                  refs=tuple(refs[p] for p in s["patients"]), size=opts.size, channels=tuple(opts.channels),
                  norm=opts.norm, keep_empty=opts.keep_empty, compression=opts.compression,
                  kaggle_channel_order=tuple(opts.kaggle_channel_order), skip_bad=opts.skip_bad,
                  src=str(src), stop_file=planlib.STOP_NAME)
        for s in plan["shards"] if s["path"] not in done
    ]
    reporter.start(len(plan["shards"]), len(done))
    try:
        built, execution = run_shards(tasks, opts, out, done, len(plan["shards"]), reporter)
    except SourceError:
        reporter.finish()
        guard.rollback()
        raise
    except OSError as exc:
        reporter.finish()
        raise _write_failed(exc, out, guard) from None
    finally:
        reporter.finish()

    # 5. the manifest, last
    content = assemble_content(plan, done, opts, layout, split_info, zarr_groups)
    for s in content["skipped"]:
        reporter.log(f"skipped {s['patient']}: {s.get('file') or ''}: {s['problem']}")
    provenance = make_provenance(opts, src, layout, plan, scan, execution, built, started)
    from .writers.files import write_atomic

    try:
        write_atomic(out / MANIFEST_NAME, to_bytes(content, provenance))
    except OSError as exc:
        raise _write_failed(exc, out, guard) from None
    (out / planlib.JOURNAL_NAME).unlink(missing_ok=True)
    guard.commit()
    action = {planlib.OutState.PARTIAL: "resumed", planlib.OutState.COMPLETE: "repaired"}.get(info.state, "built")
    warnings = [f"{p}: {w}" for p, i in content["patients"].items() for w in i["warnings"]]
    return BuildSummary(out, action, content, provenance, shards_built=built, shards_kept=len(plan["shards"]) - built,
                        unlabelled=provenance["unlabelled"], notes=list(scan.notes),
                        warnings=assignment.warnings + warnings, seconds=time.time() - started)
