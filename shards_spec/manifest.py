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
from dataclasses import dataclass
from typing import Any

from .codec import KEY_PATTERN, encode_json
from .errors import SpecError
from . import formats
from .labels import CHANNELS, LABEL_NAMES
from .preprocess import NORMS

SPEC_VERSION = "brats-slices/1"
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
SHA256_LENGTH = 64


def _fail(where: str, problem: str) -> SpecError:
    return SpecError(f"field {where} {problem}")


def _get(obj: dict, field: str, kind: type | tuple[type, ...], where: str) -> Any:
    if field not in obj:
        raise _fail(f"{where}.{field}", "is missing")
    value = obj[field]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a count given as true/false is still wrong.
    if isinstance(value, bool) and bool not in kinds:
        raise _fail(f"{where}.{field}", f"must be {_names(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise _fail(f"{where}.{field}", f"must be {_names(kinds)}, got {type(value).__name__}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join({dict: "an object", list: "a list", str: "a string", int: "an integer",
                        float: "a number", bool: "a boolean"}.get(k, k.__name__) for k in kinds)


def _count(obj: dict, field: str, where: str) -> int:
    value = _get(obj, field, int, where)
    if value < 0:
        raise _fail(f"{where}.{field}", f"must be >= 0, got {value}")
    return value


def _relative_path(obj: dict, field: str, where: str) -> str:
    """A path inside the shard folder: relative, '/'-separated, no '..' or empty parts."""
    value = _get(obj, field, str, where)
    parts = value.split("/")
    if value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts):
        raise _fail(f"{where}.{field}", f"must be a relative path inside the shard folder, got {value!r}")
    return value


def _string_list(obj: dict, field: str, where: str) -> list[str]:
    value = _get(obj, field, list, where)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(f"{where}.{field}[{i}]", "must be a string")
    return value


def validate_content(content: Any) -> dict:
    """Check a manifest's `content` part; return it unchanged or raise naming the field."""
    if not isinstance(content, dict):
        raise _fail("content", "must be an object")
    w = "content"
    version = _get(content, "spec_version", str, w)
    if version != SPEC_VERSION:
        raise _fail(f"{w}.spec_version", f"is {version!r}; this tool reads {SPEC_VERSION!r} only")
    fmt = _get(content, "format", str, w)
    if fmt not in formats.READERS:  # the registry, so a format registered at run time is accepted
        raise _fail(f"{w}.format", f"must be one of {list(formats.READERS)}, got {fmt!r}")
    channels = _string_list(content, "channels", w)
    if not channels or any(c not in CHANNELS for c in channels) or len(set(channels)) != len(channels):
        raise _fail(f"{w}.channels", f"must be distinct names from {list(CHANNELS)}, got {channels}")
    labels = _get(content, "labels", dict, w)
    if labels != {str(k): v for k, v in LABEL_NAMES.items()}:
        raise _fail(f"{w}.labels", f"must be {json.dumps({str(k): v for k, v in LABEL_NAMES.items()})}")
    pre = _get(content, "preprocessing", dict, w)
    size = _get(pre, "size", int, f"{w}.preprocessing")
    if size < 1:
        raise _fail(f"{w}.preprocessing.size", f"must be positive, got {size}")
    norm = _get(pre, "norm", str, f"{w}.preprocessing")
    if norm not in NORMS:
        raise _fail(f"{w}.preprocessing.norm", f"must be one of {list(NORMS)}, got {norm!r}")
    _get(pre, "keep_empty", bool, f"{w}.preprocessing")
    _get(content, "source", dict, w)
    _get(content, "split", dict, w)

    shards = _get(content, "shards", list, w)
    shard_paths: set[str] = set()
    for i, shard in enumerate(shards):
        ws = f"{w}.shards[{i}]"
        if not isinstance(shard, dict):
            raise _fail(ws, "must be an object")
        path = _relative_path(shard, "path", ws)
        if path in shard_paths:
            raise _fail(f"{ws}.path", f"repeats {path!r}")
        shard_paths.add(path)
        _get(shard, "split", str, ws)
        _string_list(shard, "patients", ws)
        _count(shard, "records", ws)
        _count(shard, "slices", ws)
        _count(shard, "bytes", ws)
        files = _get(shard, "files", list, ws)
        if not files:
            raise _fail(f"{ws}.files", "must list at least one file")
        for j, entry in enumerate(files):
            wf = f"{ws}.files[{j}]"
            if not isinstance(entry, dict):
                raise _fail(wf, "must be an object")
            _relative_path(entry, "path", wf)
            _count(entry, "bytes", wf)
            digest = _get(entry, "sha256", str, wf)
            if len(digest) != SHA256_LENGTH or any(c not in "0123456789abcdef" for c in digest):
                raise _fail(f"{wf}.sha256", "must be 64 lowercase hex digits")

    patients = _get(content, "patients", dict, w)
    for pid, info in patients.items():
        wp = f"{w}.patients[{pid!r}]"
        if not KEY_PATTERN.match(pid):
            raise _fail(wp, "is not a valid patient key ([A-Za-z0-9_-], no dot)")
        if not isinstance(info, dict):
            raise _fail(wp, "must be an object")
        _get(info, "split", str, wp)
        if _get(info, "shard", str, wp) not in shard_paths:
            raise _fail(f"{wp}.shard", f"names {info['shard']!r}, which is not in content.shards")
        key = _get(info, "key", str, wp)
        if not KEY_PATTERN.match(key):
            raise _fail(f"{wp}.key", f"is not a valid record key: {key!r}")
        _count(info, "slices", wp)
        if _count(info, "tumour_slices", wp) > info["slices"]:
            raise _fail(f"{wp}.tumour_slices", "exceeds the patient's slices")
        _get(info, "source_shape", list, wp)
        _get(info, "spacing", list, wp)
        _get(info, "affine", list, wp)

    splits = _get(content, "splits", dict, w)
    for name, split in splits.items():
        wsp = f"{w}.splits[{name!r}]"
        if not isinstance(split, dict):
            raise _fail(wsp, "must be an object")
        for pid in _string_list(split, "patients", wsp):
            if pid not in patients:
                raise _fail(f"{wsp}.patients", f"names {pid!r}, which is not in content.patients")
        _count(split, "records", wsp)
        _count(split, "slices", wsp)
    for pid, info in patients.items():
        if info["split"] not in splits:
            raise _fail(f"{w}.patients[{pid!r}].split", f"names {info['split']!r}, which is not in content.splits")
    _get(content, "skipped", list, w)
    return content


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
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SpecError(f"is not valid JSON ({type(exc).__name__})", name) from None
    if not isinstance(obj, dict):
        raise SpecError("must hold a JSON object with 'content' and 'provenance'", name)
    try:
        content = validate_content(obj.get("content"))
        provenance = obj.get("provenance")
        if not isinstance(provenance, dict):
            raise _fail("provenance", "must be an object")
    except SpecError as exc:
        raise SpecError(exc.problem, name) from None
    return Manifest(content, provenance)
