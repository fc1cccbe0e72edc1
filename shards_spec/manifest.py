"""The manifest model: the one place that writes, reads and validates `manifest.json`.

`content` is everything that determines the shard bytes (spec version, format, channels,
preprocessing, splits, every shard with its checksums, per-patient geometry, class statistics);
it is byte-identical for the same input and options and its sha256 identifies the dataset.
`provenance` is how and when it was made (source, command line, versions, time). Both are
validated field by field on read, since a manifest may come from anyone: a wrong field raises a
`SpecError` naming it (`content.shards[3].sha256`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from . import formats, limits
from .checked_io import parse_json
from .codec import IMAGE_DTYPE, KEY_PATTERN, MASK_DTYPE, encode_json
from .consistency import check_consistency
from .errors import SpecError
from .labels import CHANNELS, LABEL_NAMES
from .limits import MAX_COUNT
from .preprocess import NORMS

SPEC_VERSION = "brats-slices/1"
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
SHA256_LENGTH = 64
FLOAT16_MAX = 65504.0
SPLIT_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def _fail(where: str, problem: str) -> SpecError:
    return SpecError(f"field {where} {problem}")


def _get(obj: dict, field: str, kind: type | tuple[type, ...], where: str, *, optional: bool = False) -> Any:
    if field not in obj:
        if optional:
            return None
        raise _fail(f"{where}.{field}", "is missing")
    return _typed(obj[field], kind, f"{where}.{field}")


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a count given as true/false is still wrong.
    if isinstance(value, bool) and bool not in kinds:
        raise _fail(where, f"must be {_names(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise _fail(where, f"must be {_names(kinds)}, got {'null' if value is None else type(value).__name__}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join({dict: "an object", list: "a list", str: "a string", int: "an integer",
                        float: "a number", bool: "a boolean", type(None): "null"}.get(k, k.__name__) for k in kinds)


def _count(obj: dict, field: str, where: str, *, optional: bool = False, low: int = 0, high: int = MAX_COUNT) -> int | None:
    value = _get(obj, field, int, where, optional=optional)
    if value is not None and not low <= value <= high:
        raise _fail(f"{where}.{field}", f"must be in [{low}, {high}], got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _counts(value: Any, n: int, where: str) -> list[int]:
    """A list of `n` counts (class voxels: background, NEC/NET, ED, ET)."""
    _typed(value, list, where)
    if len(value) != n:
        raise _fail(where, f"must hold {n} integers, got {len(value)} items")
    for i, v in enumerate(value):
        if not 0 <= _typed(v, int, f"{where}[{i}]") <= MAX_COUNT:
            raise _fail(f"{where}[{i}]", f"must be in [0, {MAX_COUNT}], got {_short(v)}")
    return value


def _numbers(value: Any, n: int, where: str, *, positive: bool = False) -> list:
    _typed(value, list, where)
    if len(value) != n:
        raise _fail(where, f"must hold {n} numbers, got {len(value)} items")
    for i, v in enumerate(value):
        _typed(v, (int, float), f"{where}[{i}]")
        if not math.isfinite(v) or abs(v) > 1e12 or (positive and v <= 0):
            raise _fail(f"{where}[{i}]", f"must be a finite{' positive' if positive else ''} number, got {_short(v)}")
    return value


def _relative_path(obj: dict, field: str, where: str) -> str:
    """A path inside the shard folder: relative, '/'-separated, no '..' or empty parts."""
    value = _get(obj, field, str, where)
    parts = value.split("/")
    if value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts) or len(value) > 1024:
        raise _fail(f"{where}.{field}", f"must be a relative path inside the shard folder, got {_short(value)}")
    return value


def _string_list(obj: dict, field: str, where: str, *, optional: bool = False) -> list[str] | None:
    value = _get(obj, field, list, where, optional=optional)
    for i, item in enumerate(value or ()):
        _typed(item, str, f"{where}.{field}[{i}]")
    return value


def _strings(obj: dict, fields: tuple[str, ...], where: str, *, nullable: bool = False) -> None:
    """Optional free-text fields: a string (or null) when present."""
    kinds = (str, type(None)) if nullable else str
    for field in fields:
        _get(obj, field, kinds, where, optional=True)


def _file_entry(entry: Any, where: str) -> dict:
    _typed(entry, dict, where)
    _relative_path(entry, "path", where)
    _count(entry, "bytes", where)
    digest = _get(entry, "sha256", str, where)
    if len(digest) != SHA256_LENGTH or any(c not in "0123456789abcdef" for c in digest):
        raise _fail(f"{where}.sha256", "must be 64 lowercase hex digits")
    return entry


def validate_content(content: Any) -> dict:
    """Check a manifest's `content` part, every field and how they agree; return it unchanged.

    Raises a `SpecError` naming the first wrong field (`field content.shards[3].sha256 ...`).
    After this, readers may use any field without further type checks: counts are integers in
    range, lists are lists, and no patient or file is in two shards or two splits.
    """
    _typed(content, dict, "content")
    w = "content"
    version = _get(content, "spec_version", str, w)
    if version != SPEC_VERSION:
        raise _fail(f"{w}.spec_version", f"is {_short(version)}; this tool reads {SPEC_VERSION!r} only")
    fmt = _get(content, "format", str, w)
    if fmt not in formats.READERS:  # the registry, so a format registered at run time is accepted
        raise _fail(f"{w}.format", f"must be one of {list(formats.READERS)}, got {_short(fmt)}")
    channels = _string_list(content, "channels", w)
    if not channels or any(c not in CHANNELS for c in channels) or len(set(channels)) != len(channels):
        raise _fail(f"{w}.channels", f"must be distinct names from {list(CHANNELS)}, got {_short(channels)}")
    labels = _get(content, "labels", dict, w)
    if labels != {str(k): v for k, v in LABEL_NAMES.items()}:
        raise _fail(f"{w}.labels", f"must be {json.dumps({str(k): v for k, v in LABEL_NAMES.items()})}")
    size = _preprocessing(_get(content, "preprocessing", dict, w), f"{w}.preprocessing")
    _source(_get(content, "source", dict, w), f"{w}.source")
    _split_method(_get(content, "split", dict, w), f"{w}.split")
    _count(content, "patients_per_shard", w, optional=True, low=1)
    shards = _get(content, "shards", list, w)
    for i, shard in enumerate(shards):
        _shard(shard, f"{w}.shards[{i}]")
    for j, entry in enumerate(_get(content, "zarr_groups", list, w, optional=True) or ()):
        _file_entry(entry, f"{w}.zarr_groups[{j}]")
    patients = _get(content, "patients", dict, w)
    record_bytes = len(channels) * size * size * IMAGE_DTYPE.itemsize + size * size * MASK_DTYPE.itemsize
    for pid, info in patients.items():
        _patient(pid, info, f"{w}.patients[{_short(pid)}]", record_bytes)
    splits = _get(content, "splits", dict, w)
    for name, split in splits.items():
        _split(name, split, f"{w}.splits[{_short(name)}]")
    for i, item in enumerate(_get(content, "skipped", list, w)):
        _typed(item, dict, f"{w}.skipped[{i}]")
        _get(item, "patient", str, f"{w}.skipped[{i}]")
        _get(item, "problem", str, f"{w}.skipped[{i}]")
        _strings(item, ("file", "shard"), f"{w}.skipped[{i}]", nullable=True)
    check_consistency(content)
    return content


def _preprocessing(pre: dict, where: str) -> int:
    size = _count(pre, "size", where, low=1, high=int(limits.get("MAX_SIZE")))
    norm = _get(pre, "norm", str, where)
    if norm not in NORMS:
        raise _fail(f"{where}.norm", f"must be one of {list(NORMS)}, got {_short(norm)}")
    _get(pre, "keep_empty", bool, where)
    _strings(pre, ("brain_mask", "compression", "image_dtype", "image_resize", "mask_dtype", "mask_resize",
                   "numpy_version", "torch_version", "zscore"), where)
    clip = _get(pre, "image_clip", (int, float), where, optional=True)
    if clip is not None and not 0 < clip <= FLOAT16_MAX:
        raise _fail(f"{where}.image_clip", f"must be in (0, {FLOAT16_MAX}], got {_short(clip)}")
    return size


def _source(source: dict, where: str) -> None:
    _get(source, "layout", str, where)
    _strings(source, ("label_convention",), where)
    order = _string_list(source, "kaggle_channel_order", where, optional=True)
    if order is not None and sorted(order) != sorted(CHANNELS):
        raise _fail(f"{where}.kaggle_channel_order", f"must order the names {list(CHANNELS)}, got {_short(order)}")


def _split_method(split: dict, where: str) -> None:
    _get(split, "method", str, where)
    _count(split, "seed", where, optional=True, low=-MAX_COUNT)
    _count(split, "folds", where, optional=True, low=1)
    _strings(split, ("hash",), where)
    _strings(split, ("stratify",), where, nullable=True)
    _string_list(split, "order", where, optional=True)
    ratios = _get(split, "ratios", dict, where, optional=True)
    for name, share in (ratios or {}).items():
        _typed(share, (int, float), f"{where}.ratios[{_short(name)}]")
        if not 0 <= share <= 1:
            raise _fail(f"{where}.ratios[{_short(name)}]", f"must be in [0, 1], got {_short(share)}")


def _shard(shard: Any, where: str) -> None:
    _typed(shard, dict, where)
    _relative_path(shard, "path", where)
    _split_name(_get(shard, "split", str, where), f"{where}.split")
    _string_list(shard, "patients", where)
    _count(shard, "records", where)
    _count(shard, "slices", where)
    _count(shard, "bytes", where)
    files = _get(shard, "files", list, where)
    if not files:
        raise _fail(f"{where}.files", "must list at least one file")
    for j, entry in enumerate(files):
        _file_entry(entry, f"{where}.files[{j}]")


def _split_name(name: str, where: str) -> str:
    if not SPLIT_PATTERN.match(name):
        raise _fail(where, f"is not a split name (a letter, then letters, digits, '_' or '-'): {_short(name)}")
    return name


def _patient(pid: str, info: Any, where: str, slice_bytes: int) -> None:
    if not KEY_PATTERN.match(pid):
        raise _fail(where, "is not a valid patient key ([A-Za-z0-9_-], no dot)")
    _typed(info, dict, where)
    _get(info, "split", str, where)
    _get(info, "shard", str, where)
    key = _get(info, "key", str, where)
    if not KEY_PATTERN.match(key):
        raise _fail(f"{where}.key", f"is not a valid record key: {_short(key)}")
    slices = _count(info, "slices", where, high=int(limits.get("MAX_SLICES")))
    if slices * slice_bytes > limits.max_record_bytes():
        raise _fail(f"{where}.slices", f"{slices} slices of {slice_bytes} bytes exceed the record limit of "
                    f"{limits.max_record_bytes() >> 20} MB (BRATS_SHARDS_MAX_RECORD_MB)")
    if _count(info, "tumour_slices", where) > slices:
        raise _fail(f"{where}.tumour_slices", "exceeds the patient's slices")
    shape = _get(info, "source_shape", list, where)
    if len(shape) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_COUNT for n in shape):
        raise _fail(f"{where}.source_shape", f"must be 3 positive integers, got {_short(shape)}")
    _numbers(_get(info, "spacing", list, where), 3, f"{where}.spacing", positive=True)
    affine = _get(info, "affine", list, where)
    if len(affine) != 4:
        raise _fail(f"{where}.affine", "must be a 4 x 4 matrix")
    for r, row in enumerate(affine):
        _numbers(row, 4, f"{where}.affine[{r}]")
    _counts(_get(info, "class_voxels", list, where), 4, f"{where}.class_voxels")  # the trainer's class priors
    _count(info, "brain_voxels", where, optional=True)
    _strings(info, ("source_dtype",), where)
    _strings(info, ("grade",), where, nullable=True)
    _get(info, "meta", (dict, type(None)), where, optional=True)  # the source's CSV columns: free-form
    _string_list(info, "warnings", where, optional=True)
    _string_list(info, "notes", where, optional=True)
    arrays = _get(info, "arrays", dict, where, optional=True)
    for name, path in (arrays or {}).items():
        _relative_path(arrays, name, f"{where}.arrays")


def _split(name: str, split: Any, where: str) -> None:
    _split_name(name, where)
    _typed(split, dict, where)
    _string_list(split, "patients", where)
    _count(split, "records", where)
    _count(split, "slices", where)
    _count(split, "tumour_slices", where, optional=True)
    _count(split, "shards", where, optional=True)
    if "class_voxels" in split:
        _counts(split["class_voxels"], 4, f"{where}.class_voxels")
    grades = _get(split, "grades", dict, where, optional=True)
    for grade, n in (grades or {}).items():
        _count(grades, grade, f"{where}.grades")


def validate_provenance(provenance: Any) -> dict:
    """Check the `provenance` part: how the shards were made (every field optional, typed when present)."""
    w = "provenance"
    _typed(provenance, dict, w)
    _strings(provenance, ("command", "created", "platform", "scheduler"), w, nullable=True)
    seconds = _get(provenance, "seconds", (int, float), w, optional=True)
    if seconds is not None and not (math.isfinite(seconds) and 0 <= seconds <= MAX_COUNT):
        raise _fail(f"{w}.seconds", f"must be a finite number >= 0, got {_short(seconds)}")
    for field in ("shards_built", "shards_kept", "workers"):
        _count(provenance, field, w, optional=True)
    _string_list(provenance, "notes", w, optional=True)
    _string_list(provenance, "unlabelled", w, optional=True)
    source = _get(provenance, "source", dict, w, optional=True)
    if source is not None:
        _strings(source, ("fingerprint", "layout", "path"), f"{w}.source", nullable=True)
    versions = _get(provenance, "versions", dict, w, optional=True)
    for name in versions or {}:
        _get(versions, name, (str, type(None)), f"{w}.versions")
    return provenance


def content_digest(content: dict) -> str:
    """sha256 of the canonical JSON of `content`: the dataset's identity."""
    return hashlib.sha256(encode_json(content)).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A validated manifest with the look-ups readers need."""

    content: dict
    provenance: dict

    @property
    def digest(self) -> str:
        return content_digest(self.content)

    @property
    def format(self) -> str:
        return self.content["format"]

    @property
    def channels(self) -> list[str]:
        return list(self.content["channels"])

    @property
    def size(self) -> int:
        return int(self.content["preprocessing"]["size"])

    @property
    def splits(self) -> list[str]:
        return list(self.content["splits"])

    def shards_of(self, split: str) -> list[dict]:
        """Shard entries of one split, in manifest order."""
        self.require_split(split)
        return [s for s in self.content["shards"] if s["split"] == split]

    def patients_of(self, split: str) -> list[str]:
        self.require_split(split)
        return list(self.content["splits"][split]["patients"])

    def require_split(self, split: str) -> None:
        if split not in self.content["splits"]:
            raise SpecError(f"split {split!r} is not in this dataset; it has {self.splits}")

    def max_record_slices(self) -> int:
        """Slices of the largest record: bounds every member's size before it is read."""
        return max((p["slices"] for p in self.content["patients"].values()), default=0)


def to_bytes(content: dict, provenance: dict) -> bytes:
    """The manifest file's bytes (indented for people; `content` stays canonical by digest)."""
    return (json.dumps({"content": content, "provenance": provenance}, sort_keys=True, indent=1) + "\n").encode()


def parse(data: bytes, name: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate manifest bytes; every problem is a `SpecError` naming `name`."""
    obj = parse_json(data, name, SpecError)
    if not isinstance(obj, dict):
        raise SpecError("must hold a JSON object with 'content' and 'provenance'", name)
    try:
        content = validate_content(obj.get("content"))
        provenance = validate_provenance(obj.get("provenance"))
    except SpecError as exc:
        raise SpecError(exc.problem, name) from None
    return Manifest(content, provenance)
