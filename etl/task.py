"""The task that runs on Dask workers: one output shard, from source paths to written files.

It is module-level and takes a small, picklable `ShardTask` (paths and options, never arrays) and
returns plain JSON (the shard's files and per-patient metadata), so it runs the same in this
process, on a `LocalCluster` and on a remote cluster whose workers share the file system. Per
patient: load (`etl.sources`) -> preprocess (`shards_spec.preprocess`) -> write (the format's
`etl.writers` writer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shards_spec.errors import SourceError

from . import faults


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
    source_options: tuple  # (name, value) pairs: the layout's options (etl.sources.SourceLayout)
    skip_bad: bool
    max_patient_bytes: int
    src: str = ""
    stop_file: str = ""


def build_shard(task: ShardTask) -> dict:
    """Load, preprocess and write the patients of one shard; return its metadata.

    A `SourceError` of one patient ends the task with `failed` set and nothing written, unless
    `skip_bad`, where the patient is listed in `skipped` and the others are written.
    """
    import torch

    from .writers import writer

    result = {"path": task.path, "split": task.split, "files": [], "patients": {}, "skipped": [], "failed": None}
    if _stopped(task):
        result["cancelled"] = True
        return result
    tune_allocator()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per task: the parallelism is across tasks
    try:
        shard = writer(task.format).open_shard(Path(task.root), task.path, task.split, task.compression)
        for ref in task.refs:
            try:
                volume, slices = _load_and_preprocess(task, ref)
            except SourceError as exc:
                problem = {"patient": ref.id, "file": portable(exc.path, task.src), "problem": exc.problem,
                           "path": exc.path}
                if not task.skip_bad:
                    result["failed"] = problem  # said to the user as it is
                    return result
                result["skipped"].append({**problem, "problem": portable(exc.problem, task.src)})  # the manifest's
                continue
            result["patients"][ref.id] = patient_entry(task, ref, volume, slices)
            del volume
            shard.about(ref.id, patient_about(task, ref, result["patients"][ref.id]))
            shard.add(ref.id, ref.id, slices)
        result["files"] = shard.finish()
    finally:
        torch.set_num_threads(threads)
    result["files"] = sorted(result["files"], key=lambda f: f["path"])
    faults.task_finished()
    return jsonable(result)


def _load_and_preprocess(task: ShardTask, ref):
    from shards_spec.preprocess import preprocess_volume

    from .sources import load_patient

    volume = load_patient(ref, channels=task.channels, require_labels=True, max_patient_bytes=task.max_patient_bytes,
                          **dict(task.source_options))
    slices = preprocess_volume(volume.volume, volume.brain, volume.labels, size=task.size, norm=task.norm,
                               keep_empty=task.keep_empty)
    return volume, slices


def patient_entry(task: ShardTask, ref, volume, slices) -> dict:
    """The manifest's entry of one patient: where it is, its counts, its source geometry."""
    import numpy as np

    from .writers import writer

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
    entry.update(writer(task.format).patient_fields(task.split, ref.id))
    return entry


def patient_about(task: ShardTask, ref, entry: dict) -> dict:
    """What a patient's arrays hold, for formats that store it beside them (zarr attributes)."""
    from shards_spec.labels import LABEL_NAMES
    from shards_spec.manifest import SPEC_VERSION

    return {"spec_version": SPEC_VERSION, "patient": ref.id, "split": task.split, "channels": list(task.channels),
            "labels": {str(k): v for k, v in LABEL_NAMES.items()}, "size": task.size,
            "source_shape": entry["source_shape"], "source_spacing": entry["spacing"]}


def _stopped(task: ShardTask) -> bool:
    """The orchestrator asked the tasks that have not started to return at once."""
    return bool(task.stop_file) and Path(task.root, task.stop_file).exists()


def portable(value, src: str):
    """`value` with absolute paths under the source root made relative (content holds no machine paths)."""
    if isinstance(value, dict):
        return {k: portable(v, src) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, src) for v in value]
    if isinstance(value, str) and src and src in value:
        return value.replace(src.rstrip("/") + "/", "").replace(src, ".")
    return value


def jsonable(obj):
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
