"""`etl verify` and `etl inspect`: check a shard folder against its manifest, or describe it.

Both read through `shards_spec.read.ShardStore`, so a local path and a URL are read the same way
and every byte is treated as untrusted. The manifest is validated as every reader validates it
(`shards_spec.manifest`: every field, the counts it states twice, no patient or file in two
shards or splits). `verify` then goes through everything and reports every bad shard (not just
the first): each listed file exists with its size and sha256; each record decodes with the
dtypes and shapes the manifest implies; per-record metadata agrees with its own mask; the counts
of records, slices and tumour slices agree per shard and patient; no two records hold the same
image (a patient copied under another name, perhaps into another split); and (for a local
folder) no file lies in the folder that the manifest does not account for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards_spec.errors import SpecError
from shards_spec.labels import LABEL_NAMES, class_voxels
from shards_spec.lock import LOCK_NAME
from shards_spec.manifest import MANIFEST_NAME, PLAN_NAME

EXPECTED_EXTRA = (MANIFEST_NAME, PLAN_NAME, LOCK_NAME)  # the lock a killed build may leave


class VerifyError(SpecError):
    """`etl verify` found problems; the message lists one per line."""


@dataclass
class VerifyReport:
    root: str
    digest: str = ""
    format: str = ""
    shards: int = 0
    files: int = 0
    bytes: int = 0
    records: int = 0
    slices: int = 0
    problems: list[str] = field(default_factory=list)
    bad_shards: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_record(record, info: dict, shard_path: str) -> list[str]:
    """A record's own metadata against its pixels, and its class counts against the manifest."""
    problems = []
    where = f"{shard_path}: record {record.key}"
    counted = [class_voxels(m) for m in record.mask]
    if counted != record.class_voxels:
        problems.append(f"{where}: per-slice class_voxels differ from its mask")
    if record.slice_index != sorted(set(record.slice_index)) or any(i < 0 for i in record.slice_index):
        problems.append(f"{where}: slice_index is not strictly increasing from 0")
    depth = info.get("source_shape", [None])[-1] if info.get("source_shape") else None
    if depth is not None and record.slice_index and record.slice_index[-1] >= depth:
        problems.append(f"{where}: slice_index {record.slice_index[-1]} is beyond the source depth {depth}")
    if "class_voxels" in info:
        total = np.sum(np.asarray(counted, dtype=np.int64).reshape(-1, 4), axis=0).tolist()
        if total != list(info["class_voxels"]):
            problems.append(f"{where}: class voxels {total} differ from the manifest's {info['class_voxels']}")
    brain = [int(np.count_nonzero(np.any(image != 0, axis=0))) for image in record.image]
    if any(b > listed for b, listed in zip(brain, record.brain_voxels)):
        problems.append(f"{where}: image has non-zero voxels outside the listed brain voxels")
    return problems


class _SameImages:
    """Finds a slice image seen before in another record: the same data under two names, a leak
    when the two are in different splits. All-zero slices (kept with `keep_empty`) are alike by
    nature and are not compared."""

    def __init__(self) -> None:
        self.seen: dict[bytes, tuple[str, int, str]] = {}

    def check(self, record, split: str, shard_path: str) -> list[str]:
        import hashlib

        problems = []
        for s, image in enumerate(record.image):
            if not image.any():
                continue
            digest = hashlib.sha256(np.ascontiguousarray(image).data).digest()
            first = self.seen.setdefault(digest, (record.patient, s, split))
            if first[0] != record.patient:
                where = f"{shard_path}: record {record.key} slice {s} (split {split})"
                problems.append(f"{where}: holds the same image as patient {first[0]} slice {first[1]} "
                                f"(split {first[2]}): one patient's data under two names")
                break
        return problems


def _extra_files(root: Path, content: dict) -> list[str]:
    listed = {f["path"] for s in content["shards"] for f in s["files"]}
    listed |= {f["path"] for f in content.get("zarr_groups", [])}
    listed |= set(EXPECTED_EXTRA)
    extra = []
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(root).as_posix()
        if rel not in listed:
            extra.append(f"{rel}: is not listed in the manifest (a stray or leftover file)")
    return extra


def refuse_unfinished(root: str | Path) -> None:
    """A local folder with a plan but no manifest is a build that has not finished: say so."""
    from shards_spec.read import is_url, shard_root

    root = shard_root(root)
    if is_url(root):
        return
    folder = Path(root)
    if not (folder / MANIFEST_NAME).exists() and (folder / PLAN_NAME).exists():
        raise VerifyError("has plan.json but no manifest.json: the build did not finish; re-run the same "
                          "`etl build-shards` command to complete it", folder)


def verify(root: str | Path, *, progress=None, storage_options: dict | None = None) -> VerifyReport:
    """Check everything; raise only for an unreadable manifest, else return the report.

    `storage_options` go to fsspec for a URL (credentials, `endpoint_url`)."""
    from shards_spec.read import ShardStore, is_url

    refuse_unfinished(root)
    store = ShardStore(root, storage_options=storage_options)
    content = store.manifest.content
    report = VerifyReport(str(root), store.manifest.digest, store.manifest.format)
    patients = content["patients"]
    shards = content["shards"]
    same_images = _SameImages()
    for entry in content.get("zarr_groups", []):
        problem = store.verify_file(entry)
        if problem:
            report.problems.append(problem)
    for shard in shards:
        report.shards += 1
        shard_problems = []
        for entry in shard["files"]:
            report.files += 1
            report.bytes += entry["bytes"]
            problem = store.verify_file(entry)
            if problem:
                shard_problems.append(problem)
        if not shard_problems:  # decode only what is intact: the checksum already condemns the rest
            try:
                for record in store.records(shard):
                    report.records += 1
                    report.slices += record.slices
                    shard_problems += _check_record(record, patients[record.patient], shard["path"])
                    shard_problems += same_images.check(record, shard["split"], shard["path"])
            except SpecError as exc:
                shard_problems.append(str(exc))
        if shard_problems:
            report.bad_shards.append(shard["path"])
            report.problems += shard_problems
        if progress is not None:
            progress(shard)
    if not is_url(store.root):
        report.problems += _extra_files(Path(store.root), content)
    return report


# ---------------------------------------------------------------------------------------------
# inspect


def describe(root: str | Path, *, storage_options: dict | None = None) -> dict:
    """What a shard folder holds, from its manifest alone (nothing is decoded)."""
    from shards_spec.read import ShardStore

    refuse_unfinished(root)
    store = ShardStore(root, storage_options=storage_options)
    manifest = store.manifest
    content, provenance = manifest.content, manifest.provenance
    total_bytes = sum(s["bytes"] for s in content["shards"])
    total_slices = sum(s["slices"] for s in content["shards"])
    splits = {}
    for name, split in content["splits"].items():
        voxels = np.asarray(split.get("class_voxels") or [0, 0, 0, 0], dtype=np.float64)
        bytes_ = sum(s["bytes"] for s in content["shards"] if s["split"] == name)
        tumour = voxels[1:].sum()
        splits[name] = {
            "patients": len(split["patients"]),
            "shards": sum(1 for s in content["shards"] if s["split"] == name),
            "slices": split["slices"],
            "tumour_slices": split.get("tumour_slices",
                                       sum(content["patients"][p]["tumour_slices"] for p in split["patients"])),
            "voxel_fraction": {LABEL_NAMES[i]: (float(v / voxels.sum()) if voxels.sum() else 0.0) for i, v in enumerate(voxels)},
            "tumour_fraction": {LABEL_NAMES[i]: (float(voxels[i] / tumour) if tumour else 0.0) for i in (1, 2, 3)},
            "bytes": bytes_,
            "grades": split.get("grades"),
        }
    return {
        "root": store.root,
        "digest": manifest.digest,
        "spec_version": content["spec_version"],
        "format": content["format"],
        "channels": content["channels"],
        "preprocessing": content["preprocessing"],
        "source": content["source"],
        "split": content["split"],
        "splits": splits,
        "patients": len(content["patients"]),
        "shards": len(content["shards"]),
        "slices": total_slices,
        "bytes": total_bytes,
        "bytes_per_slice": total_bytes / total_slices if total_slices else 0.0,
        "skipped": content["skipped"],
        "warnings": sum(len(p.get("warnings", [])) for p in content["patients"].values()),
        "provenance": provenance,
    }
