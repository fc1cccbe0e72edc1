"""Zarr v3 shard writer: an array group per patient, each array one sharding-codec shard.

Layout (SPEC.md): `<split>/<patient key>/{image,mask,slice_index,class_voxels,brain_voxels}`.
Each array is chunked by 16 slices and stored as a single zarr shard, so a patient is a handful of
files and one task writes all of them: two writers never share a zarr shard, which would silently
lose data (a shard is read-modify-written whole). The patient group is written under a temporary
folder name and renamed when complete; a "shard" of the plan is the set of its patients' groups,
written one patient at a time so that one patient's arrays are in memory at once.

The store explains itself to plain zarr and xarray users: every array has `dimension_names`
(`DIMENSIONS`; xarray needs them) and attributes (channel names, label names, spacing on the shard
grid, the spec version), and so has every group. Each patient group's `zarr.json` and, once every
shard is written, the root's hold zarr-python's consolidated metadata of what lies below
(`consolidated`): opening the root then lists the hierarchy from that file, never the folder, so
`manifest.json` and `plan.json` beside it draw no "not recognized as a component of a Zarr
hierarchy" warning, and the tree can be listed over HTTP, which cannot list folders.
"""

from __future__ import annotations

from pathlib import Path

from .base import ShardOutput, Writer
from .files import atomic_folder, file_entry, temporary_name, write_atomic

ZSTD_LEVEL = 3
CHUNK_SLICES = 16
"""Slices per inner chunk: one-slice chunks cost zarr ~1 ms of per-chunk overhead per slice on
read, and readers take a patient whole anyway (random single-slice reads are slow regardless)."""
STORAGE = f"zstd level {ZSTD_LEVEL}, sharding codec: one shard per array, chunks of {CHUNK_SLICES} slices, crc32c index"
"""What the manifest records as the storage of zarr shards (part of the content digest)."""
ARRAYS = ("image", "mask", "slice_index", "class_voxels", "brain_voxels")
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "image": ("slice", "channel", "height", "width"),
    "mask": ("slice", "height", "width"),
    "slice_index": ("slice",),
    "class_voxels": ("slice", "label"),
    "brain_voxels": ("slice",),
}
"""Each array's `dimension_names`: height and width are the source array's first and second axes
resized to `size`, slice its third (SPEC.md section 1)."""
DESCRIPTIONS = {
    "image": "MRI z-scored over the brain per modality, background 0 (SPEC.md section 4)",
    "mask": "label map: 0 background, 1 NEC/NET, 2 ED, 3 ET",
    "slice_index": "index of each slice along the source volume's third axis",
    "class_voxels": "voxels of each label per slice, on the shard grid",
    "brain_voxels": "brain voxels per slice, on the shard grid",
}


def _array(group, name: str, data, chunk_rows: int = CHUNK_SLICES, attributes: dict | None = None) -> None:
    import numpy as np
    from zarr.codecs import ZstdCodec

    data = np.ascontiguousarray(data)
    shape = data.shape
    rows = min(chunk_rows, max(shape[0], 1))
    chunks = (rows,) + shape[1:]
    shards = (-(-max(shape[0], 1) // rows) * rows,) + shape[1:]  # whole inner chunks
    array = group.create_array(
        name, shape=shape, dtype=data.dtype, chunks=chunks, shards=shards,
        compressors=ZstdCodec(level=ZSTD_LEVEL), fill_value=0, dimension_names=DIMENSIONS[name],
        attributes={"description": DESCRIPTIONS[name], **(attributes or {})},
    )
    if data.size:
        array[...] = data


def attributes(about: dict, size: int) -> tuple[dict, dict[str, dict]]:
    """(the patient group's attributes, each array's) from `etl.task.patient_about`: channel and
    label names, the spec version, and the spacing of the shard grid in mm per dimension."""
    height, width = about["source_shape"][:2]
    rows, columns, thickness = about["source_spacing"]
    spacing = {"slice": thickness, "height": rows * height / size, "width": columns * width / size}
    group = {key: about[key] for key in ("spec_version", "patient", "split")}
    group.update(channel_names=about["channels"], label_names=about["labels"], spacing_mm=spacing,
                 source_shape=about["source_shape"], source_spacing_mm=about["source_spacing"])
    version = {"spec_version": about["spec_version"]}
    return group, {
        "image": {**version, "channel_names": about["channels"], "spacing_mm": spacing},
        "mask": {**version, "label_names": about["labels"], "spacing_mm": spacing},
        "class_voxels": {**version, "label_names": about["labels"]},
        "slice_index": version, "brain_voxels": version,
    }


def consolidated(files: dict[str, bytes], path: str = "") -> bytes:
    """The `zarr.json` of the group at `path` (relative; "" the root) holding zarr-python's
    consolidated metadata of every node below it, from `files` (the hierarchy's `zarr.json`
    files by relative path), as canonical JSON: zarr lists nodes in the order they load, so its
    own file differs between runs; sorted keys make the same hierarchy the same bytes."""
    import json
    import warnings

    import zarr
    from zarr.core.buffer import cpu
    from zarr.storage import MemoryStore

    store = {name: cpu.Buffer.from_bytes(data) for name, data in files.items()}
    with warnings.catch_warnings():  # "not part of the Zarr format 3 specification": said in SPEC.md
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(MemoryStore(store), path=path or None, zarr_format=3)
    written = json.loads(store[f"{path}/zarr.json" if path else "zarr.json"].to_bytes())
    return (json.dumps(written, sort_keys=True, separators=(",", ":")) + "\n").encode()


def write_root(root: Path, splits: list[str]) -> list[dict]:
    """Group metadata of the root and of each split (written once, by the orchestrator).

    zarr writes them in a temporary folder; each `zarr.json` is then written into place
    atomically, so a crash never leaves a torn one that a resumed build could not open."""
    import shutil

    import zarr

    from shards_spec.manifest import MANIFEST_NAME, SPEC_VERSION

    scratch = temporary_name(root / "groups")
    try:
        zarr.open_group(str(scratch), mode="w", attributes={
            "spec_version": SPEC_VERSION, "manifest": MANIFEST_NAME,
            "description": "BraTS 2D slice shards (brats-shards): a group per split, a group per patient in it"})
        for split in splits:
            zarr.open_group(str(scratch / split), mode="w", attributes={"spec_version": SPEC_VERSION, "split": split})
        names = ["zarr.json"] + [f"{split}/zarr.json" for split in splits]
        for name in names:
            write_atomic(root / name, (scratch / name).read_bytes())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [file_entry(root, root / name) for name in names]


def consolidate_root(root: Path, splits: list[str], files: list[str]) -> list[dict]:
    """The root `zarr.json` with the consolidated metadata of the whole store (once every patient
    group is written, before the manifest); the entries of the root and split `zarr.json` files."""
    names = ["zarr.json"] + [f"{split}/zarr.json" for split in splits]
    metadata = sorted(set(names) | {f for f in files if f.endswith("zarr.json")})
    write_atomic(root / "zarr.json", consolidated({name: (root / name).read_bytes() for name in metadata}))
    return [file_entry(root, root / name) for name in names]


def write_patient(root: Path, split: str, key: str, slices, about: dict | None = None) -> list[dict]:
    """Write one patient's group atomically (attributes from `about`, see `attributes`); return the
    entries of every file in it."""
    import numpy as np
    import zarr

    final = root / split / key
    size = slices.image.shape[-1]
    group_attributes, array_attributes = attributes(about, size) if about else ({}, {})
    with atomic_folder(final) as tmp:
        group = zarr.open_group(str(tmp), mode="w", attributes=group_attributes)
        rows = max(len(slices.slice_index), 1)
        arrays = {
            "image": (slices.image.astype("<f2"), CHUNK_SLICES),
            "mask": (slices.mask.astype("|u1"), CHUNK_SLICES),
            "slice_index": (np.asarray(slices.slice_index, dtype="<i4"), rows),
            "class_voxels": (np.asarray(slices.class_voxels, dtype="<i8").reshape(-1, 4), rows),
            "brain_voxels": (np.asarray(slices.brain_voxels, dtype="<i8"), rows),
        }
        for name, (data, chunk_rows) in arrays.items():
            _array(group, name, data, chunk_rows, array_attributes.get(name))
        metadata = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in tmp.rglob("zarr.json")}
        (tmp / "zarr.json").write_bytes(consolidated(metadata))  # the folder is fsynced and renamed whole
    files = sorted(p for p in final.rglob("*") if p.is_file())
    return [file_entry(root, f) for f in files]


def array_paths(split: str, key: str) -> dict[str, str]:
    """Paths of a patient's arrays relative to the root (the manifest lists them for HTTP)."""
    return {name: f"{split}/{key}/{name}" for name in ARRAYS}


class _GroupsOutput(ShardOutput):
    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split = root, split
        self.files: list[dict] = []
        self.info: dict[str, dict] = {}

    def about(self, key: str, info: dict) -> None:
        self.info[key] = info

    def add(self, key: str, patient: str, slices) -> None:
        self.files += write_patient(self.root, self.split, key, slices, self.info.pop(key, None))

    def finish(self) -> list[dict]:
        return self.files


class ZarrWriter(Writer):
    name = "zarr"
    compression_refused = "--compress applies to webdataset tars; zarr arrays are always zstd-compressed"
    root_key = "zarr_groups"

    def shard_path(self, split: str, index: int, compression: str) -> str:
        return f"{split}/{split}-{index:06d}"

    def open_shard(self, root: Path, path: str, split: str, compression: str) -> ShardOutput:
        return _GroupsOutput(root, split)

    def patient_fields(self, split: str, key: str) -> dict:
        return {"arrays": array_paths(split, key)}

    def write_root(self, root: Path, splits: list[str]) -> list[dict]:
        return write_root(root, splits)

    def finish_root(self, root: Path, splits: list[str], files: list[str]) -> list[dict]:
        return consolidate_root(root, splits, files)

    def storage(self, compression: str) -> str:
        return STORAGE

    def owned_paths(self, shards: list[dict], splits: list[str]) -> set[str]:
        groups = {f"{shard['split']}/{pid}" for shard in shards for pid in shard["patients"]}
        return groups | {"zarr.json"} | {f"{split}/zarr.json" for split in splits}


WRITER = ZarrWriter()
