"""Sample encoding and the safe decoding of untrusted shard bytes.

Shards travel between people, so every byte read from one is untrusted. Only two member types
are ever decoded: `.npy` (parsed header, simple dtypes only, never pickle) and `.json` (a JSON
object of bounded size). Tar archives are iterated member by member: a member is checked by its
header (a regular file, a safe name, a size within the limit) before any of its bytes are read,
and its name is never used as a file-system path. Every refusal is a `SpecError`.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from .errors import SpecError
from .preprocess import Slices

IMAGE_DTYPE = np.dtype("<f2")
MASK_DTYPE = np.dtype("|u1")
MEMBER_SUFFIXES = ("image.npy", "mask.npy", "json")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
NPY_MAX_HEADER = 1024
NPY_HEADER_PREFIX = 1 << 17
"""Bytes of a `.npy` member parsed for its header: more than any header numpy can declare
(a version 1 length is 16 bits), so a too-long header is refused as before, by its length."""
JSON_BYTES_PER_SLICE = 160
JSON_BASE_BYTES = 4096


def check_key(key: str) -> str:
    """A record key: letters, digits, '_' and '-' (no dot, since webdataset splits on dots)."""
    if not KEY_PATTERN.match(key):
        raise SpecError(f"record key {key!r} is not [A-Za-z0-9_-]{{1,80}}")
    return key


def encode_npy(array: np.ndarray) -> bytes:
    """`np.save` bytes of a plain numeric array (object arrays would need pickle: refused)."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise SpecError("object arrays cannot be stored (they would need pickle)")
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes | bytearray | memoryview, *, dtype: np.dtype, ndim: int, name: str = "array",
               shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """Parse `.npy` bytes, accepting only `dtype` with `ndim` dimensions in C order.

    The header's shape is checked before it is used: `ndim` dimensions, each a non-negative
    integer, equal to `shape` where given (the manifest's; None: any), and a byte count computed in Python
    integers (numpy's int64 product of (2**32, 2**32, 1, 1) wraps to 0) equal to the data's.

    Writable `data` (a bytearray, or a view of one: a member of a shard read whole) is used in
    place, not copied; the array then keeps `data` alive. Read-only `bytes` are copied, so the
    array is always writable.
    """
    stream = io.BytesIO(bytes(data[:NPY_HEADER_PREFIX]))  # the header only: never a copy of the whole member
    try:
        major, _minor = np.lib.format.read_magic(stream)
        if major not in (1, 2):
            raise ValueError(f"unsupported .npy version {major}")
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        found_shape, fortran_order, found = reader(stream, max_header_size=NPY_MAX_HEADER)
    except SpecError:
        raise
    except Exception as exc:  # numpy raises ValueError, and others on garbage
        reason = (str(exc).strip().splitlines() or [""])[0]  # numpy appends lines of advice: one line
        raise SpecError(f"{name} is not a valid .npy ({type(exc).__name__}: {reason})") from None
    if found.hasobject or found != np.dtype(dtype):
        raise SpecError(f"{name} has dtype {found}, expected {np.dtype(dtype)}")
    if fortran_order:
        raise SpecError(f"{name} is stored in Fortran order, expected C order")
    if len(found_shape) != ndim or not all(isinstance(n, int) and n >= 0 for n in found_shape):
        raise SpecError(f"{name} has shape {_shape_text(found_shape)}, expected {ndim} dimensions of size >= 0")
    if shape is not None and any(want is not None and n != want for n, want in zip(found_shape, shape)):
        implied = "(" + ", ".join("S" if want is None else str(want) for want in shape) + ")"
        raise SpecError(f"{name} has shape {_shape_text(found_shape)}, the manifest implies {implied}")
    expected = math.prod(found_shape) * found.itemsize  # Python integers: no overflow
    offset = stream.tell()
    if len(data) - offset != expected:
        raise SpecError(f"{name} holds {len(data) - offset} data bytes, its header {_shape_text(found_shape)} needs {expected}")
    array = np.frombuffer(data, dtype=found, offset=offset).reshape(found_shape)
    if not array.flags.writeable or not array.flags.aligned:  # bytes, or a header of an odd length
        array = array.copy()
    return array


def _shape_text(shape: tuple) -> str:
    text = str(tuple(shape))
    return text if len(text) <= 80 else text[:77] + "..."


def encode_json(obj: object) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): the same object gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def decode_json(data: bytes | bytearray | memoryview, *, max_bytes: int, name: str = "json") -> dict:
    """Parse a JSON object of at most `max_bytes`."""
    if len(data) > max_bytes:
        raise SpecError(f"{name} is {len(data)} bytes, more than the {max_bytes} allowed")
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SpecError(f"{name} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise SpecError(f"{name} is not a JSON object")
    return obj


def member_limits(slices: int, channels: int, size: int) -> dict[str, int]:
    """Largest allowed size in bytes of each member of a record with `slices` slices."""
    header = 128 + NPY_MAX_HEADER
    return {
        "image.npy": header + slices * channels * size * size * IMAGE_DTYPE.itemsize,
        "mask.npy": header + slices * size * size * MASK_DTYPE.itemsize,
        "json": JSON_BASE_BYTES + slices * JSON_BYTES_PER_SLICE,
    }


@dataclass
class Record:
    """One patient's kept slices, decoded and checked."""

    key: str
    patient: str
    image: np.ndarray  # float16 (S, C, H, W)
    mask: np.ndarray  # uint8 (S, H, W)
    slice_index: list[int]
    class_voxels: list[list[int]]
    brain_voxels: list[int]

    @property
    def slices(self) -> int:
        return int(self.image.shape[0])


def record_meta(patient: str, slices: Slices) -> dict:
    """The per-record JSON: patient id and per-slice lists, so readers can filter unread pixels."""
    return {
        "patient": patient,
        "slice_index": slices.slice_index,
        "class_voxels": slices.class_voxels,
        "brain_voxels": slices.brain_voxels,
    }


def encode_record(patient: str, slices: Slices) -> dict[str, bytes]:
    """Member suffix -> bytes of one WebDataset record."""
    return {
        "image.npy": encode_npy(slices.image.astype(IMAGE_DTYPE)),
        "mask.npy": encode_npy(slices.mask.astype(MASK_DTYPE)),
        "json": encode_json(record_meta(patient, slices)),
    }


def build_record(key: str, image: np.ndarray, mask: np.ndarray, meta: dict, *, channels: int, size: int,
                 scan: bool = True) -> Record:
    """Check decoded arrays and metadata against each other and the manifest's geometry.

    `scan` also checks every value (labels <= 3, a finite image). A reader may pass False only
    for bytes it has verified against the manifest's sha256 before decoding them, and whose
    values it has seen pass this scan before (`ShardStore.values_checked`): equal bytes, equal values.
    """
    s = image.shape[0]
    if image.shape[1:] != (channels, size, size):
        raise SpecError(f"record {key}: image shape {image.shape}, expected (S, {channels}, {size}, {size})")
    if mask.shape != (s, size, size):
        raise SpecError(f"record {key}: mask shape {mask.shape}, expected ({s}, {size}, {size})")
    if scan and mask.size and int(mask.max()) > 3:
        raise SpecError(f"record {key}: mask holds label {int(mask.max())} > 3")
    if scan and _has_nonfinite_float16(image):
        raise SpecError(f"record {key}: image holds non-finite values")
    patient = meta.get("patient")
    if not isinstance(patient, str):
        raise SpecError(f"record {key}: json field 'patient' missing or not a string")
    lists = {}
    for field in ("slice_index", "class_voxels", "brain_voxels"):
        value = meta.get(field)
        if not isinstance(value, list) or len(value) != s:
            raise SpecError(f"record {key}: json field {field!r} is not a list of {s} items")
        lists[field] = value
    if not all(isinstance(i, int) for i in lists["slice_index"] + lists["brain_voxels"]):
        raise SpecError(f"record {key}: json slice_index/brain_voxels must hold integers")
    if not all(isinstance(c, list) and len(c) == 4 and all(isinstance(v, int) for v in c) for c in lists["class_voxels"]):
        raise SpecError(f"record {key}: json class_voxels must hold 4 integers per slice")
    return Record(key, patient, image, mask, lists["slice_index"], lists["class_voxels"], lists["brain_voxels"])


def _has_nonfinite_float16(image: np.ndarray) -> bool:
    """inf/NaN test on the bits, the same answer as `np.isfinite`: a float16 is inf or NaN when its
    exponent bits are all set, i.e. 0x7C00..0x7FFF as an int16 (positive) or 0xFC00..0xFFFF as a
    uint16 (negative). Two maxima, no temporary array: ~3x faster than masking the exponent bits."""
    bits = image.reshape(-1).view(np.int16)
    return bool(bits.max(initial=0) >= 0x7C00 or bits.view(np.uint16).max(initial=0) >= 0xFC00)


def decode_record(key: str, members: dict[str, bytes], *, channels: int, size: int, scan: bool = True) -> Record:
    """Decode the three members of a WebDataset record (suffix -> bytes), checking everything
    (the values only with `scan`: see `build_record`).

    Each array's header shape is checked against the manifest's slice shape, (C, size, size)
    or (size, size) after any number of slices, before its data is used.
    """
    missing = [s for s in MEMBER_SUFFIXES if s not in members]
    if missing:
        raise SpecError(f"record {key}: missing member(s) {missing}")
    image = decode_npy(members["image.npy"], dtype=IMAGE_DTYPE, ndim=4, name=f"{key}.image.npy",
                       shape=(None, channels, size, size))
    mask = decode_npy(members["mask.npy"], dtype=MASK_DTYPE, ndim=3, name=f"{key}.mask.npy", shape=(None, size, size))
    limit = member_limits(image.shape[0], channels, size)["json"]
    meta = decode_json(members["json"], max_bytes=limit, name=f"{key}.json")
    return build_record(key, image, mask, meta, channels=channels, size=size, scan=scan)


def split_member_name(name: str) -> tuple[str, str]:
    """'<key>.<suffix>' -> (key, suffix), refusing paths, dots in keys and unknown suffixes."""
    key, _, suffix = name.partition(".")
    if suffix not in MEMBER_SUFFIXES or not KEY_PATTERN.match(key):
        raise SpecError(f"tar member {name!r} is not '<key>.image.npy|mask.npy|json' with a plain key")
    return key, suffix


def iter_tar_records(
    fileobj: BinaryIO | bytearray | memoryview, *, max_bytes: dict[str, int], max_total: int | None = None,
    name: str = "shard",
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {suffix: bytes}) for each record of a tar stream (or of a whole archive in
    memory, whose members are then views of it), checking headers first.

    `max_bytes` maps each suffix to its largest allowed member size; `max_total` bounds the
    whole stream (`tarstream.iter_members`: every size is checked before anything is read or
    allocated). The archive is read as a stream (works over HTTP), members of one record must
    be adjacent, and a key seen twice, a member that is not a regular file, a name that is not
    `<key>.<suffix>` or a size over the limit is refused before its bytes are read.
    """
    from .tarstream import iter_members

    def limit(member: str) -> int:
        return max_bytes[split_member_name(member)[1]]

    seen: set[str] = set()
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        for member, data in iter_members(fileobj, limit=limit, max_total=max_total, name=name):
            key, suffix = split_member_name(member)
            if key != current:
                if current is not None:
                    yield current, members
                if key in seen:
                    raise SpecError(f"record key {key!r} appears twice", name)
                seen.add(key)
                current, members = key, {}
            if suffix in members:
                raise SpecError(f"member {member!r} appears twice", name)
            members[suffix] = data
    except SpecError as exc:
        if exc.path is None:
            raise SpecError(exc.problem, name) from None
        raise
    except (EOFError, OSError) as exc:
        raise SpecError(f"not a complete tar archive ({type(exc).__name__}: {exc})", name) from None
    if current is not None:
        yield current, members


def write_tar(fileobj: BinaryIO, records: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write records as a tar with normalised headers (fixed mtime, owner, mode), in order.

    Byte-identical output for the same records: no timestamps, user names or ids leak in.
    """
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for key, members in records:
            check_key(key)
            for suffix in MEMBER_SUFFIXES:
                data = members[suffix]
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                archive.addfile(info, io.BytesIO(data))
