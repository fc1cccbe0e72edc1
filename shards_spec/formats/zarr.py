"""Reading a Zarr (v3) shard: one array group per patient (`image`, `mask`, per-slice arrays).

A shard's files are exactly those the manifest lists (HTTP cannot list folders, and a file that
vanished must be an error, not an array of fill values): they are fetched whole and verified,
then opened with plain `zarr` from memory at the array paths the manifest gives, each array's
metadata (dtype, shape, chunks) checked before its data is decoded. Arrays are read whole, since
single-slice reads of a sharded array re-read the shard index each time (~400 reads/s).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..codec import IMAGE_DTYPE, MASK_DTYPE, Record, build_record
from ..errors import SpecError

ARRAYS = ("image", "mask", "slice_index", "class_voxels", "brain_voxels")


def check_shard(shard: dict, patients: dict) -> str | None:
    """A Zarr shard's files lie in its patients' groups, and each patient's arrays are its own
    group's (`<split>/<key>/<array>`): no shard can make a patient read another's data."""
    groups = tuple(f"{shard['split']}/{patients[p]['key']}/" for p in shard["patients"])
    for entry in shard["files"]:
        if not entry["path"].startswith(groups):
            return f"file {entry['path']} of shard {shard['path']} is not in the group of one of its patients"
    for pid in shard["patients"]:
        info = patients[pid]
        for array, path in (info.get("arrays") or {}).items():
            if array not in ARRAYS or path != f"{info['split']}/{info['key']}/{array}":
                return (f"patient {pid!r} lists array {array!r} at {path!r}; its arrays are {', '.join(ARRAYS)} "
                        f"at {info['split']}/{info['key']}/<array>")
    return None


def records(store, shard: dict, expected: dict[str, str], name: str) -> Iterator[Record]:
    import zarr
    from zarr.core.buffer import cpu
    from zarr.storage import MemoryStore

    files = {entry["path"]: cpu.Buffer.from_bytes(store.read_file(entry)) for entry in shard["files"]}
    memory = MemoryStore(files, read_only=True)
    patients = store.manifest.content["patients"]
    channels, size = len(store.manifest.channels), store.manifest.size
    for key, pid in expected.items():
        info = patients[pid]
        arrays = info.get("arrays") or {a: f"{info['split']}/{key}/{a}" for a in ARRAYS}
        s = info["slices"]
        shapes = {
            "image": ((s, channels, size, size), (IMAGE_DTYPE,)),
            "mask": ((s, size, size), (MASK_DTYPE,)),
            "slice_index": ((s,), None),
            "class_voxels": ((s, 4), None),
            "brain_voxels": ((s,), None),
        }
        data = {}
        for array_name, (shape, dtypes) in shapes.items():
            path = arrays.get(array_name) if isinstance(arrays, dict) else None
            if not isinstance(path, str) or f"{path}/zarr.json" not in files:
                raise SpecError(f"patient {pid!r}: array {array_name!r} ({path!r}) is not among the shard's files", name)
            data[array_name] = read_array(zarr, memory, path, shape, dtypes, f"patient {pid!r} array {path}")
        meta = {
            "patient": pid,
            "slice_index": data["slice_index"].tolist(),
            "class_voxels": data["class_voxels"].tolist(),
            "brain_voxels": data["brain_voxels"].tolist(),
        }
        yield build_record(key, data["image"], data["mask"], meta, channels=channels, size=size)


def read_array(zarr, store, path: str, shape: tuple, dtypes: tuple | None, what: str) -> np.ndarray:
    """Open one array, check its metadata against the manifest, then read it whole."""
    try:
        array = zarr.open_array(store=store, path=path, mode="r", zarr_format=3)
    except Exception as exc:  # zarr raises many types on bad metadata
        raise SpecError(f"{what}: metadata cannot be read ({type(exc).__name__}: {exc})") from None
    if tuple(array.shape) != shape:
        raise SpecError(f"{what}: shape {tuple(array.shape)}, the manifest implies {shape}")
    dtype = np.dtype(array.dtype)
    if dtypes is not None and dtype not in dtypes:
        raise SpecError(f"{what}: dtype {dtype}, expected {dtypes[0]}")
    if dtypes is None and dtype.kind not in "iu":
        raise SpecError(f"{what}: dtype {dtype}, expected an integer type")
    # Chunks larger than the array would let a small file decompress into a large buffer; a
    # shard may only round the first axis up to a whole number of its inner chunks.
    chunks = tuple(array.chunks)
    limits = {"chunks": tuple(max(n, 1) for n in shape)}
    if array.shards is not None:
        rows = -(-max(shape[0], 1) // chunks[0]) * chunks[0]
        limits["shards"] = (rows,) + limits["chunks"][1:]
    for label, found in (("chunks", chunks), ("shards", array.shards)):
        if found is not None and any(c > n for c, n in zip(found, limits[label])):
            raise SpecError(f"{what}: {label} {tuple(found)} exceed the shape {shape}")
    try:
        return np.asarray(array[...])
    except Exception as exc:
        raise SpecError(f"{what}: data cannot be decoded ({type(exc).__name__}: {exc})") from None
