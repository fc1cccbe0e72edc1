"""What a manifest states twice must agree, and nothing may be in two places.

Run by `manifest.validate_content` (after each field's type and range), so every reader gets it
before it uses a manifest: `etl verify` and `inspect`, `train run`, `evaluate`, `report`. The
leakage rules come first, because a split leak is silent in every number trained on it:

- a patient is in exactly one shard and one split, and the shard's split is the patient's;
- a file (a tar, a Zarr chunk or metadata file) is listed by one shard only, and lies in its
  shard's split folder; then the format's own layout rules (`formats.<format>.check_shard`: a
  Zarr patient's arrays are its own group's, so no shard can read another patient's data);
- record keys are unique across patients (a record names its patient by key);

then the counts: records and slices of each shard and split equal their patients' sums, a shard's
bytes its files' sum, and tumour slices and class voxels of a split the sums over its patients.
"""

from __future__ import annotations

from typing import Callable

from .errors import SpecError

def check_consistency(content: dict) -> None:
    """Raise a `SpecError` naming the first disagreement (fields already have their types)."""
    for check in (_patients_in_shards, _files, _splits, _counts):
        problem = check(content)
        if problem:
            raise SpecError(problem)


def _patients_in_shards(content: dict) -> str | None:
    patients = content["patients"]
    placed: dict[str, str] = {}
    keys: dict[str, str] = {}
    for shard in content["shards"]:
        for pid in shard["patients"]:
            info = patients.get(pid)
            if info is None:
                return f"field content.shards: shard {shard['path']} lists patient {pid!r}, which is not in content.patients"
            if pid in placed:
                return f"field content.shards: patient {pid!r} is in shards {placed[pid]} and {shard['path']} (a leak)"
            placed[pid] = shard["path"]
            if info["shard"] != shard["path"]:
                return (f"field content.patients[{pid!r}].shard names {info['shard']!r}, but shard "
                        f"{shard['path']} lists the patient")
            if info["split"] != shard["split"]:
                return (f"field content.patients[{pid!r}].split is {info['split']!r}, but its shard "
                        f"{shard['path']} is in split {shard['split']!r} (a leak)")
            if info["key"] in keys:
                return f"field content.patients[{pid!r}].key {info['key']!r} is also the key of patient {keys[info['key']]!r}"
            keys[info["key"]] = pid
    unplaced = [pid for pid in patients if pid not in placed]
    if unplaced:
        return f"field content.patients: patient {unplaced[0]!r} is in no shard"
    return None


def _files(content: dict) -> str | None:
    """Every file in one shard only, inside its split's folder; then the format's own layout."""
    from . import formats

    owner: dict[str, str] = {f["path"]: "content.zarr_groups" for f in content.get("zarr_groups", [])}
    check_shard = getattr(formats.reader(content["format"]), "check_shard", None)
    for shard in content["shards"]:
        if not shard["path"].startswith(f"{shard['split']}/"):
            return f"field content.shards: shard {shard['path']} of split {shard['split']!r} is not in its folder {shard['split']}/"
        for entry in shard["files"]:
            path = entry["path"]
            if path in owner:
                return f"field content.shards: file {path} is listed by {owner[path]} and shard {shard['path']} (a leak)"
            owner[path] = f"shard {shard['path']}"
        problem = check_shard(shard, content["patients"]) if check_shard is not None else None
        if problem:
            return f"field content.shards: {problem}"
    return None


def _splits(content: dict) -> str | None:
    patients = content["patients"]
    seen: dict[str, str] = {}
    for name, split in content["splits"].items():
        for pid in split["patients"]:
            if pid not in patients:
                return f"field content.splits[{name!r}].patients names {pid!r}, which is not in content.patients"
            if pid in seen:
                return f"field content.splits: patient {pid!r} is in splits {seen[pid]!r} and {name!r} (a leak)"
            seen[pid] = name
            if patients[pid]["split"] != name:
                return (f"field content.splits[{name!r}].patients lists {pid!r}, whose split is "
                        f"{patients[pid]['split']!r} (a leak)")
    for pid, info in patients.items():
        if info["split"] not in content["splits"]:
            return f"field content.patients[{pid!r}].split names {info['split']!r}, which is not in content.splits"
        if pid not in seen:
            return f"field content.splits[{info['split']!r}].patients does not list its patient {pid!r}"
    return None


def _counts(content: dict) -> str | None:
    patients = content["patients"]
    for shard in content["shards"]:
        where = f"content.shards ({shard['path']})"
        problem = (_agree(where, "records", shard["records"], len(shard["patients"]))
                   or _agree(where, "slices", shard["slices"], sum(patients[p]["slices"] for p in shard["patients"]))
                   or _agree(where, "bytes", shard["bytes"], sum(f["bytes"] for f in shard["files"]), "its files"))
        if problem:
            return problem
    for name, split in content["splits"].items():
        members = [patients[p] for p in split["patients"]]
        where = f"content.splits[{name!r}]"
        problem = (_agree(where, "records", split["records"], len(members))
                   or _agree(where, "slices", split["slices"], sum(p["slices"] for p in members))
                   or _optional(split, "tumour_slices", where, lambda: sum(p["tumour_slices"] for p in members))
                   or _optional(split, "shards", where, lambda: sum(1 for s in content["shards"] if s["split"] == name),
                                "its shards")
                   or _optional(split, "class_voxels", where, lambda: _voxel_sum(members)))
        if problem:
            return problem
    return None


def _agree(where: str, field: str, stated: object, actual: object, whose: str = "its patients") -> str | None:
    if stated != actual:
        return f"field {where}.{field} is {stated}, {whose} add up to {actual}"
    return None


def _optional(obj: dict, field: str, where: str, actual: Callable[[], object], whose: str = "its patients") -> str | None:
    if field not in obj:
        return None
    value = actual()
    return None if value is None else _agree(where, field, obj[field], value, whose)


def _voxel_sum(members: list[dict]) -> list[int] | None:
    if not all("class_voxels" in p for p in members):
        return None
    return [sum(p["class_voxels"][i] for p in members) for i in range(4)]
