"""Reading a Zarr (v3) shard: one array group per patient (`image`, `mask`, per-slice arrays).

A shard's files are exactly those the manifest lists (HTTP cannot list folders, and a file that
vanished must be an error, not an array of fill values): they are fetched whole and verified
(`ShardStore.read_file`), then decoded from memory at the array paths the manifest gives. Before
any data is decoded, each array's metadata (dtype, shape, chunks, codecs) is checked, and so is
the content size declared by each inner chunk's zstd frame: zstd allocates what its frame header
declares (a 65 KB chunk declaring 2 GiB took a reader to 2.1 GB), or, when the frame declares
none, grows without bound; a frame must declare exactly its chunk's bytes, and is decompressed
into its place in an array of the manifest's shape, never past it. The layout read is the one
SPEC.md section 7 writes (chunks of whole slices, one shard per array, bytes + zstd, a crc32c
index at the end), read here directly rather than through zarr-python, whose per-chunk
machinery took 3.6x as long per patient; plain `zarr` reads the same files. Arrays are read
whole (a patient at a time), since single-slice reads of a sharded array re-read the shard
index each time (~400 reads/s with zarr). The arrays' `dimension_names` and attributes and the
consolidated metadata (SPEC.md section 7) are for plain zarr and xarray users: this reader needs
none of them, so shards written before they existed read the same.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..codec import IMAGE_DTYPE, MASK_DTYPE, Record, build_record, decode_json
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
    scan = not store.values_checked(shard)  # read_file verifies every file before any is decoded
    files = {entry["path"]: store.read_file(entry) for entry in shard["files"]}
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
            data[array_name] = read_array(files, path, shape, dtypes, f"patient {pid!r} array {path}")
        meta = {
            "patient": pid,
            "slice_index": data["slice_index"].tolist(),
            "class_voxels": data["class_voxels"].tolist(),
            "brain_voxels": data["brain_voxels"].tolist(),
        }
        yield build_record(key, data["image"], data["mask"], meta, channels=channels, size=size, scan=scan)


DATA_TYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "uint8": "|u1", "int8": "|i1", "uint16": "<u2",
              "int16": "<i2", "uint32": "<u4", "int32": "<i4", "uint64": "<u8", "int64": "<i8"}
"""Zarr v3 data type names -> numpy dtypes (little-endian, as the bytes codec must store them)."""
METADATA_BYTES = 1 << 20
"""Largest `zarr.json` read (an array's holds its attributes: a few KB)."""


def read_array(files: dict, path: str, shape: tuple, dtypes: tuple | None, what: str) -> np.ndarray:
    """One array, from its `zarr.json` and its one shard file in `files` (path -> verified bytes).

    Its metadata is checked first against the manifest and SPEC.md section 7 (dtype, shape,
    chunks of whole slices in one shard per array, the codec chain), then the shard's chunk
    index and every zstd frame's declared size, and only then is each chunk decompressed, in
    place, into an array of exactly the shape the manifest implies. This is what zarr-python
    reads from the same files (the tests compare them), without its per-chunk overhead: zarr took
    3.6x as long per patient (measured on 116 slices at 128 x 128)."""
    dtype, inner, outer, fill = _metadata(files[f"{path}/zarr.json"], shape, dtypes, what)
    out = np.empty((outer[0], *shape[1:]), dtype=dtype)
    shard = files.get(f"{path}/c/" + "/".join("0" * len(shape)))
    if shard is None:  # every chunk empty: zarr writes no shard (SPEC.md: the fill value)
        out.fill(fill)
        return out[: shape[0]]
    rows = inner[0]
    chunk_bytes = math.prod(inner) * dtype.itemsize
    flat = out.reshape(-1).view(np.uint8)
    for i, frame in enumerate(_frames(shard, outer[0] // rows, chunk_bytes, what)):
        if frame is None:
            out[i * rows:(i + 1) * rows] = fill
            continue
        try:
            _zstd_decompress(frame, flat[i * chunk_bytes:(i + 1) * chunk_bytes])
        except Exception as exc:  # noqa: BLE001 - a corrupt frame: numcodecs raises RuntimeError, ValueError
            raise SpecError(f"{what}: data cannot be decoded ({type(exc).__name__}: {exc})") from None
    return out[: shape[0]]


def _zstd_decompress(frame, dest: np.ndarray) -> None:
    from numcodecs import zstd

    zstd.decompress(frame, dest)  # into `dest`, never past it; the frame declares exactly its size


def _metadata(raw, shape: tuple, dtypes: tuple | None, what: str) -> tuple[np.dtype, tuple, tuple, float]:
    """(dtype, inner chunk shape, shard shape, fill value) of an array's `zarr.json`, checked."""
    try:
        meta = decode_json(raw, max_bytes=METADATA_BYTES, name="zarr.json")
    except SpecError as exc:
        raise SpecError(f"{what}: metadata cannot be read ({exc.problem})") from None

    def field(value, check, text):
        if not check(value):
            raise SpecError(f"{what}: metadata cannot be read ({text}, found {str(value)[:80]!r})")
        return value

    def dims(value):
        return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)

    field(meta.get("zarr_format"), lambda v: v == 3, "zarr_format must be 3")
    field(meta.get("node_type"), lambda v: v == "array", "node_type must be 'array'")
    found = tuple(field(meta.get("shape"), dims, "shape must be a list of sizes"))
    if found != shape:
        raise SpecError(f"{what}: shape {found}, the manifest implies {shape}")
    type_name = meta.get("data_type")
    if type_name not in DATA_TYPES:
        raise SpecError(f"{what}: dtype {str(type_name)[:40]!r} is not one this spec reads")
    dtype = np.dtype(DATA_TYPES[type_name])
    if dtypes is not None and dtype not in dtypes:
        raise SpecError(f"{what}: dtype {dtype}, expected {dtypes[0]}")
    if dtypes is None and dtype.kind not in "iu":
        raise SpecError(f"{what}: dtype {dtype}, expected an integer type")
    grid = meta.get("chunk_grid") if isinstance(meta.get("chunk_grid"), dict) else {}
    field(grid.get("name"), lambda v: v == "regular", "chunk_grid must be 'regular'")
    outer = tuple(field((grid.get("configuration") or {}).get("chunk_shape"), lambda v: dims(v) and len(v) == len(shape),
                        "chunk_grid's chunk_shape must have one size per dimension"))
    encoding = meta.get("chunk_key_encoding") if isinstance(meta.get("chunk_key_encoding"), dict) else {}
    field(encoding.get("name"), lambda v: v == "default", "chunk_key_encoding must be 'default'")
    field((encoding.get("configuration") or {}).get("separator", "/"), lambda v: v == "/", "the chunk key separator must be '/'")
    field(meta.get("storage_transformers") or [], lambda v: v == [], "storage transformers are not read")
    fill = field(meta.get("fill_value"), lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(v), "fill_value must be a finite number")
    inner = _check_codecs(meta.get("codecs"), dtype, len(shape), what)
    # Chunks larger than the array would let a small file decompress into a large buffer; a
    # shard may only round the first axis up to a whole number of its inner chunks.
    rows = -(-max(shape[0], 1) // max(inner[0], 1)) * inner[0]
    for label, sizes, limit in (("chunks", inner, tuple(max(n, 1) for n in shape)),
                                ("shards", outer, (rows,) + tuple(max(n, 1) for n in shape[1:]))):
        if any(c > n for c, n in zip(sizes, limit)):
            raise SpecError(f"{what}: {label} {sizes} exceed the shape {shape}")
    if 0 in inner or inner[1:] != shape[1:] or outer != (rows, *shape[1:]):
        raise SpecError(f"{what}: chunks {inner} in shards {outer}: this spec reads chunks of whole slices, "
                        "all in one shard (SPEC.md section 7)")
    return dtype, inner, outer, fill


CODECS = {"name": "sharding_indexed", "codecs": ["bytes", "zstd"], "index_codecs": ["bytes", "crc32c"],
          "index_location": "end"}
"""The codec chain SPEC.md section 7 writes, the only one read: other codecs are other bombs."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
EMPTY = 2**64 - 1


def _check_codecs(codecs, dtype: np.dtype, ndim: int, what: str) -> tuple[int, ...]:
    """The codec chain must be SPEC.md's (`CODECS`), little-endian: the inner chunk shape."""
    codecs = codecs if isinstance(codecs, list) else []
    config = codecs[0].get("configuration") if len(codecs) == 1 and isinstance(codecs[0], dict) else None
    config = config if isinstance(config, dict) else {}
    chain, index = ([c if isinstance(c, dict) else {} for c in config.get(key)] if isinstance(config.get(key), list)
                    else [] for key in ("codecs", "index_codecs"))
    found = {
        "name": codecs[0].get("name") if config else None,
        "codecs": [c.get("name") for c in chain],
        "index_codecs": [c.get("name") for c in index],
        "index_location": config.get("index_location"),
    }
    if found != CODECS:
        raise SpecError(f"{what}: codecs {found}, this spec reads {CODECS} only")
    for codec in (chain[0], index[0]):  # the bytes codecs: little-endian (optional for 1-byte types)
        endian = (codec.get("configuration") or {}).get("endian")
        if endian != "little" and not (endian is None and codec is chain[0] and dtype.itemsize == 1):
            raise SpecError(f"{what}: codecs store {dtype} as {endian or 'no'} endian; this spec reads little-endian only")
    inner = config.get("chunk_shape")
    if not (isinstance(inner, list) and len(inner) == ndim
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in inner)):
        raise SpecError(f"{what}: metadata cannot be read (the shard's chunk_shape must have one size per dimension)")
    return tuple(inner)


def _frames(data, count: int, chunk_bytes: int, what: str) -> list:
    """The zstd frame of each inner chunk of a shard file (None: an empty chunk), in the order of
    the chunks, each checked to declare exactly the chunk's bytes before any is decompressed."""
    index_bytes = 16 * count + 4  # (offset, nbytes) little-endian uint64 pairs, then crc32c
    if len(data) < index_bytes:
        raise SpecError(f"{what}: its shard file is smaller than its chunk index")
    index = np.frombuffer(data, dtype="<u8", count=2 * count, offset=len(data) - index_bytes).reshape(count, 2)
    frames = []
    for offset, nbytes in index.tolist():
        if offset == EMPTY and nbytes == EMPTY:
            frames.append(None)  # an empty chunk: the fill value
            continue
        if offset + nbytes > len(data) - index_bytes:
            raise SpecError(f"{what}: its chunk index points past the end of its shard file")
        frame = data[offset:offset + nbytes]
        declared = _zstd_content_size(frame)
        if declared != chunk_bytes:
            shown = "no size" if declared is None else f"{declared} bytes"
            raise SpecError(f"{what}: a chunk's zstd frame declares {shown}, the chunk holds {chunk_bytes} bytes")
        frames.append(frame)
    return frames


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
