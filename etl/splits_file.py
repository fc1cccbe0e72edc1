"""nnU-Net's `splits_final.json`: our patient split written as nnU-Net's folds, and read back.

nnU-Net v2 takes its cross-validation folds from `nnUNet_preprocessed/DatasetNNN_Name/splits_final.json`,
a list with one `{"train": [case ids], "val": [case ids]}` per fold (its own default: 5 folds of
a shuffled KFold). The two directions, so that both tools train on the same patients:

ours -> nnU-Net (`nnunet_folds`, written by `etl export-nnunet`)
    `--folds K`: nnU-Net's fold k validates on our `foldk` and trains on the other folds, as
    `train run --val-split foldk` does; `--split train=..,val=..[,test=..]`: one fold, train and
    val; any other split (a test share) is held out, in neither list.
nnU-Net -> ours (`read_split_file`, `etl build-shards --split-file`)
    one fold: the splits `train` and `val`; K folds: the splits `fold0`..`fold{K-1}`, each holding
    its fold's val list. That needs a K-fold partition, as nnU-Net's own files are: the val lists
    disjoint, and each fold training on exactly the other folds' val patients. Patients of the
    source that the file lists nowhere form the split `test`; a listed patient the source lacks
    is refused (the file belongs to other data).
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from pathlib import Path

from shards_spec.checked_io import cut, parse_json, read_small
from shards_spec.errors import ToolError

NAME = "splits_final.json"
MAX_BYTES = 64 << 20
UNLISTED = "test"
"""The split of the source's patients that a split file lists in no fold."""


class SplitFileError(ToolError):
    """A split file that cannot be read as nnU-Net's folds, or that does not fit the source."""


def training_splits(names: list[str]) -> list[str]:
    """The splits nnU-Net trains and validates on: our folds `foldK`, else `train` and `val`; the
    others (a test share, the file's unlisted patients) are held out."""
    folds = [n for n in names if re.fullmatch(r"fold[0-9]+", n)]
    if folds:
        return folds
    if "train" not in names or "val" not in names:
        raise SplitFileError(f"nnU-Net folds need splits named train and val (other splits are held out), "
                             f"got {', '.join(names)}; use --split train=...,val=... or --folds K")
    return ["train", "val"]


def nnunet_folds(split_of: dict[str, str], names: list[str]) -> list[dict[str, list[str]]]:
    """Our assignment (patient -> split) as nnU-Net's list of {"train", "val"} folds."""
    def members(*splits: str) -> list[str]:
        return sorted(p for p, s in split_of.items() if s in splits)

    used = training_splits(names)
    if used == ["train", "val"]:
        return [{"train": members("train"), "val": members("val")}]
    return [{"train": members(*(n for n in used if n != fold)), "val": members(fold)} for fold in used]


def encode(folds: list[dict[str, list[str]]]) -> bytes:
    """The file's bytes, as nnU-Net's own `save_json` writes it (indent 4, sorted keys)."""
    return (json.dumps(folds, indent=4, sort_keys=True) + "\n").encode()


def read_split_file(path: Path) -> tuple[list[tuple[str, list[str]]], str]:
    """([(split name, its patients)] in order, sha256 of the file) from a splits_final.json."""
    raw = read_small(path, MAX_BYTES, SplitFileError)
    folds = parse_json(raw, path, SplitFileError)
    if not isinstance(folds, list) or not folds:
        raise SplitFileError('must be a non-empty list of {"train": [...], "val": [...]} folds (nnU-Net\'s '
                             "splits_final.json)", path)
    pairs = [_fold(fold, k, path) for k, fold in enumerate(folds)]
    digest = hashlib.sha256(raw).hexdigest()
    if len(pairs) == 1:
        return [("train", sorted(pairs[0][0])), ("val", sorted(pairs[0][1]))], digest
    _check_kfold(pairs, path)
    return [(f"fold{k}", sorted(val)) for k, (_, val) in enumerate(pairs)], digest


def _fold(fold, k: int, path: Path) -> tuple[set[str], set[str]]:
    if not isinstance(fold, dict) or set(fold) != {"train", "val"}:
        raise SplitFileError(f'fold {k} must be an object with exactly the keys "train" and "val"', path)
    lists = []
    for key in ("train", "val"):
        items = fold[key]
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise SplitFileError(f'fold {k}: "{key}" must be a list of case ids (strings)', path)
        twice = sorted(i for i, n in collections.Counter(items).items() if n > 1)
        if twice:
            raise SplitFileError(f'fold {k}: "{key}" lists {cut(twice[0])} twice', path)
        lists.append(set(items))
    both = sorted(lists[0] & lists[1])
    if both:
        raise SplitFileError(f"fold {k}: {cut(both[0])} is in both train and val", path)
    return lists[0], lists[1]


def _check_kfold(pairs: list[tuple[set[str], set[str]]], path: Path) -> None:
    """Each patient validated in exactly one fold, each fold training on the others' val patients."""
    seen: dict[str, int] = {}
    for k, (_, val) in enumerate(pairs):
        for case in sorted(val):
            if case in seen:
                raise SplitFileError(f"{cut(case)} is validated in folds {seen[case]} and {k}: our shards hold each "
                                     "patient in one split, so the val lists must be disjoint (a K-fold split)", path)
            seen[case] = k
    listed = set(seen)
    for k, (train, val) in enumerate(pairs):
        if train != listed - val:
            odd = sorted(train ^ (listed - val))[0]
            raise SplitFileError(f"fold {k} trains on a different set than the other folds' val patients "
                                 f"(e.g. {cut(odd)}): only a K-fold split, as nnU-Net writes, maps onto our folds", path)


def resolve(given: list[tuple[str, list[str]]], source: set[str], usable: set[str], path: str) \
        -> list[tuple[str, list[str]]]:
    """The file's splits over the usable patients of the source, with `test` for those it lists nowhere.

    `source` is every patient the scan found (bad ones included: a file may list a patient that
    --skip-bad leaves out); a listed patient outside it is refused."""
    listed = {p for _, members in given for p in members}
    unknown = sorted(listed - source)
    if unknown:
        listed_here = ", ".join(cut(u, 40) for u in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise SplitFileError(f"lists {len(unknown)} case(s) the source does not hold ({listed_here}): it belongs to "
                             "other data", path)
    splits = [(name, sorted(p for p in members if p in usable)) for name, members in given]
    unlisted = sorted(usable - listed)
    if unlisted:
        splits.append((UNLISTED, unlisted))  # the file's names are train/val or foldK: never this one
    return splits


__all__ = ["NAME", "SplitFileError", "UNLISTED", "encode", "nnunet_folds", "read_split_file", "resolve",
           "training_splits"]
