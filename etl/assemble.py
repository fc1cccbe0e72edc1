"""Manifest assembly: the `content` from the plan and the task results, and the `provenance`.

`content` is what identifies the dataset: it is built only from the plan and the shards' results,
every list sorted, so it is byte-identical for the same input and options whatever the number of
workers or the order the tasks finished in (its digest is the dataset's identity, recorded by
checkpoints). `provenance` is how and when it was made, and may differ between two builds.
"""

from __future__ import annotations

import platform
import shlex
import time
from pathlib import Path

from shards_spec.labels import LABEL_NAMES
from shards_spec.manifest import SPEC_VERSION, validate_content

from .options import BuildOptions
from .scan import relative
from .task import jsonable

VERSIONED = ("brats-shards", "numpy", "torch", "nibabel", "h5py", "zarr", "webdataset", "dask", "distributed")
"""Packages whose versions the provenance records."""


def assemble_content(plan: dict, results: dict[str, dict], opts: BuildOptions, layout: str,
                     split_info: dict, root_files: list[dict] | None) -> dict:
    """The manifest's `content` from the plan and every shard's result, all sorted."""
    from .sources import source
    from .writers import writer

    shards, patients, skipped = _shards(plan, results)
    owner = source(layout)
    content = {
        "spec_version": SPEC_VERSION,
        "format": opts.format,
        "channels": list(opts.channels),
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "preprocessing": preprocessing(opts, owner.brain_mask_rule),
        "source": {"layout": layout, "label_convention": owner.label_convention,
                   **owner.recorded_options(opts.resolved_source_options(layout))},
        "split": split_info,
        "splits": _splits(split_info, patients, shards),
        "shards": shards,
        "patients": dict(sorted(patients.items())),
        "skipped": sorted(skipped, key=lambda s: (s["patient"], s.get("file") or "")),
        "patients_per_shard": opts.patients_per_shard,
    }
    root_key = writer(opts.format).root_key
    if root_key is not None and root_files is not None:
        content[root_key] = root_files
    return jsonable(validate_content(content))


def _shards(plan: dict, results: dict[str, dict]) -> tuple[list[dict], dict, list[dict]]:
    """(shard entries, patient id -> entry, skipped patients) from the results, in path order."""
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
    return shards, patients, skipped


def _splits(split_info: dict, patients: dict, shards: list[dict]) -> dict:
    """Per split: its patients, counts and class voxels (and grades when the split is stratified)."""
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
    return splits


def preprocessing(opts: BuildOptions, brain_mask_rule: str) -> dict:
    """Every preprocessing choice, and the numpy/torch versions that produced the bytes."""
    import numpy as np
    import torch

    from shards_spec.preprocess import FLOAT16_MAX, IMAGE_RESIZE, MASK_RESIZE, MIN_STD

    from .writers import writer

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
        "brain_mask": brain_mask_rule,
        "compression": writer(opts.format).storage(opts.compression),
        "numpy_version": np.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }


def make_provenance(opts: BuildOptions, src: Path, layout: str, plan: dict, scan, execution: dict,
                    built: int, started: float) -> dict:
    """How, where and when this build ran (not part of the dataset's identity)."""
    return {
        "source": {"path": str(src), "layout": layout, "fingerprint": plan["source_fingerprint"]},
        "command": shlex.join(opts.command) if opts.command else None,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 3),
        **execution,
        "platform": f"{platform.system()} {platform.machine()}",
        "shards_built": built,
        "shards_kept": len(plan["shards"]) - built,
        "unlabelled": sorted(relative(u, src) or str(u) for u in scan.unlabelled),
        "notes": list(scan.notes),
    }


def versions() -> dict:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found
