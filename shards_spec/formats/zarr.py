"""Reading a Zarr (v3) shard: one array group per patient (`image`, `mask`, per-slice arrays).

A shard's files are exactly those the manifest lists (HTTP cannot list folders, and a file that
vanished must be an error, not an array of fill values): they are fetched whole and verified,
then opened with plain `zarr` from memory at the array paths the manifest gives. Before any data
is decoded, each array's metadata (dtype, shape, chunks, codecs) is checked, and so is the
content size declared by each inner chunk's zstd frame: zstd allocates what its frame header
declares (a 65 KB chunk declaring 2 GiB took a reader to 2.1 GB), or, when the frame declares
none, grows without bound; a frame must declare exactly its chunk's bytes. Arrays are read
whole, since single-slice reads of a sharded array re-read the shard index each time (~400
reads/s). The arrays' `dimension_names` and attributes and the consolidated metadata (SPEC.md
section 7) are for plain zarr and xarray users: this reader needs none of them, so shards
written before they existed read the same.
"""

from __future__ import annotations

import math
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
            data[array_name] = read_array(zarr, memory, path, shape, dtypes, f"patient {pid!r} array {path}", files)
        meta = {
            "patient": pid,
            "slice_index": data["slice_index"].tolist(),
            "class_voxels": data["class_voxels"].tolist(),
            "brain_voxels": data["brain_voxels"].tolist(),
        }
        yield build_record(key, data["image"], data["mask"], meta, channels=channels, size=size)


def read_array(zarr, store, path: str, shape: tuple, dtypes: tuple | None, what: str, files: dict) -> np.ndarray:
    """Open one array, check its metadata and chunk headers against the manifest, then read it whole."""
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
    _check_codecs(array, what)
    shard = files.get(f"{path}/c/" + "/".join("0" * len(shape)))
    if shard is not None:
        _check_frames(shard.to_bytes(), array, what)
    try:
        return np.asarray(array[...])
    except Exception as exc:
        raise SpecError(f"{what}: data cannot be decoded ({type(exc).__name__}: {exc})") from None


CODECS = {"name": "sharding_indexed", "codecs": ["bytes", "zstd"], "index_codecs": ["bytes", "crc32c"],
          "index_location": "end"}
"""The codec chain SPEC.md section 7 writes, the only one read: other codecs are other bombs."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
EMPTY = 2**64 - 1


def _check_codecs(array, what: str) -> None:
    codecs = array.metadata.to_dict().get("codecs") or []
    config = codecs[0].get("configuration", {}) if len(codecs) == 1 and isinstance(codecs[0], dict) else {}
    found = {
        "name": codecs[0].get("name") if config else None,
        "codecs": [c.get("name") for c in config.get("codecs", [])],
        "index_codecs": [c.get("name") for c in config.get("index_codecs", [])],
        "index_location": config.get("index_location"),
    }
    if found != CODECS:
        raise SpecError(f"{what}: codecs {found}, this spec reads {CODECS} only")


def _check_frames(data: bytes, array, what: str) -> None:
    """Every inner chunk of the shard is one zstd frame declaring exactly the chunk's bytes."""
    inner = tuple(array.chunks)
    outer = tuple(array.shards)
    count = math.prod(-(-o // c) for o, c in zip(outer, inner))
    index_bytes = 16 * count + 4  # (offset, nbytes) little-endian uint64 pairs, then crc32c
    if len(data) < index_bytes:
        raise SpecError(f"{what}: its shard file is smaller than its chunk index")
    index = np.frombuffer(data, dtype="<u8", count=2 * count, offset=len(data) - index_bytes).reshape(count, 2)
    chunk_bytes = math.prod(inner) * np.dtype(array.dtype).itemsize
    for offset, nbytes in index.tolist():
        if offset == EMPTY and nbytes == EMPTY:
            continue  # an empty chunk: the fill value
        if offset + nbytes > len(data) - index_bytes:
            raise SpecError(f"{what}: its chunk index points past the end of its shard file")
        declared = _zstd_content_size(data[offset:offset + nbytes])
        if declared != chunk_bytes:
            shown = "no size" if declared is None else f"{declared} bytes"
            raise SpecError(f"{what}: a chunk's zstd frame declares {shown}, the chunk holds {chunk_bytes} bytes")


def _zstd_content_size(frame: bytes) -> int | None:
    """The content size a zstd frame header declares (RFC 8878 3.1.1.1), None when it declares none."""
    if len(frame) < 6 or frame[:4] != ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    size_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if width == 0 or len(frame) < pos + width:
        return None
    value = int.from_bytes(frame[pos:pos + width], "little")
    return value + 256 if width == 2 else value
