"""Channels and labels: the one home of the label mapping.

Shards store one label map per slice with values 0 background, 1 NEC/NET (necrotic and
non-enhancing core), 2 ED (peritumoral edema), 3 ET (enhancing tumour). Every source convention
is encoded into that map here, and readers expand it here into the three binary channels of the
original design (NEC/NET, ED, ET) or into the BraTS regions (WT = 1|2|3, TC = 1|3, ET = 3).
"""

from __future__ import annotations

import re
from typing import Mapping, Union

import numpy as np

from .errors import SourceError

CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""Modalities in the order shards store them."""

LABEL_NAMES: dict[int, str] = {0: "background", 1: "NEC/NET", 2: "ED", 3: "ET"}
CLASS_NAMES: tuple[str, ...] = ("NEC/NET", "ED", "ET")
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")
TARGETS: tuple[str, ...] = ("classes", "regions")


def target_names(target: str) -> tuple[str, ...]:
    """The names of a target's three channels (`expand`'s order): NEC/NET, ED, ET or WT, TC, ET."""
    return CLASS_NAMES if target == "classes" else REGION_NAMES


# Source label value -> shard label value, per source convention.
CONVENTIONS: dict[str, dict[int, int]] = {
    "brats2020": {0: 0, 1: 1, 2: 2, 4: 3},  # also BraTS 2021: ET is 4, there is no 3
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},  # ET is 3 (called SNFH for ED)
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},  # MSD Task01 and nnU-Net's BraTS: 1 edema, 2 non-enhancing, 3 enhancing
}
CONVENTION_OF_LAYOUT: dict[str, str] = {
    "brats2020": "brats2020",
    "brats2021": "brats2020",
    "brats2023": "brats2023",
    "kaggle-h5": "brats2020",
    "msd": "msd",  # the MSD's documented labels; the values used are read from each dataset.json
}
NNUNET_BRATS_CONVENTION = "msd"
"""nnU-Net's own BraTS conversion (Dataset137_BraTS21.py) writes 1 edema, 2 necrosis/non-enhancing,
3 enhancing: the MSD's values, so the one mapping serves both."""

Convention = Union[str, Mapping[int, int]]
"""A key of `CONVENTIONS`, or a mapping source value -> shard label read from a dataset's own
description (an MSD dataset.json)."""

LABEL_MEANINGS: dict[str, int] = {
    "background": 0,
    "non enhancing tumor": 1, "non enhancing tumor core": 1, "necrosis": 1, "necrotic tumor core": 1,
    "necrotic and non enhancing tumor core": 1, "necrotic core": 1, "ncr": 1, "net": 1, "ncr net": 1,
    "nec net": 1, "ncr/net": 1, "nec/net": 1,
    "edema": 2, "peritumoral edema": 2, "ed": 2, "snfh": 2, "surrounding non enhancing flair hyperintensity": 2,
    "enhancing tumor": 3, "enhancing tissue": 3, "et": 3,
}
"""Label names as datasets describe them (lower case, 'tumour'/'oedema' spelled 'tumor'/'edema',
'-' and '_' as spaces) -> shard label; an MSD dataset.json's "labels" are read through this."""


def check_channels(names: list[str] | tuple[str, ...]) -> list[str]:
    """Validate channel names against `CHANNELS`, keeping the caller's order."""
    names = list(names)
    unknown = [n for n in names if n not in CHANNELS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"channels must be distinct names from {list(CHANNELS)}, got {names}")
    return names


def convention_mapping(convention: Convention) -> dict[int, int]:
    """Source value -> shard label of a convention name or of a mapping (returned as a dict)."""
    if isinstance(convention, str):
        return dict(CONVENTIONS[convention])
    return {int(k): int(v) for k, v in convention.items()}


def convention_from_names(names: Mapping[str, str]) -> dict[int, int]:
    """Source value -> shard label from a dataset's {"value": "name"} map (an MSD dataset.json's
    "labels"); ValueError naming the first value or name that cannot be used.

    Every value must be a whole number 0..255 and every name one of `LABEL_MEANINGS`; 0 must be the
    background, and each of NEC/NET, ED and ET must be named (predictions are written back in
    these values, so each needs one). Two values may mean one class (a release with separate
    necrosis and non-enhancing labels); writing back uses the lower value."""
    mapping: dict[int, int] = {}
    for key, name in names.items():
        if not isinstance(key, str) or not re.fullmatch(r"[0-9]{1,3}", key.strip()) or int(key) > 255:
            raise ValueError(f"label value {key!r} is not a whole number 0..255")
        meaning = LABEL_MEANINGS.get(_label_key(name)) if isinstance(name, str) else None
        if meaning is None:
            raise ValueError(f"label {key} is named {name!r}, which is none of background, edema, "
                             "non-enhancing tumour (necrosis) or enhancing tumour")
        mapping[int(key)] = meaning
    if mapping.get(0) != 0 or list(mapping.values()).count(0) != 1:
        raise ValueError("label 0 must be the background, and only label 0")
    missing = [LABEL_NAMES[label] for label in (1, 2, 3) if label not in mapping.values()]
    if missing:
        raise ValueError(f"no label is named for {', '.join(missing)}")
    return dict(sorted(mapping.items()))


def _label_key(name: str) -> str:
    key = re.sub(r"[\s_-]+", " ", name.strip().lower())
    return key.replace("tumour", "tumor").replace("oedema", "edema")


def encode_labels(seg: np.ndarray, convention: Convention, path: object | None = None) -> np.ndarray:
    """Map a source segmentation to the 0..3 label map (uint8), refusing values not in its set."""
    mapping = convention_mapping(convention)
    seg = np.asarray(seg)
    if not np.issubdtype(seg.dtype, np.integer):
        if not np.all(np.isfinite(seg)) or np.any(seg != np.round(seg)):
            raise SourceError("segmentation holds non-integer or non-finite values", path)
        seg = seg.astype(np.int64)
    found = set(np.unique(seg).tolist())
    bad = sorted(found - set(mapping))
    if bad:
        named = convention if isinstance(convention, str) else "the dataset's"
        raise SourceError(
            f"segmentation holds label(s) {bad} outside {sorted(mapping)} ({named} labels)",
            path,
        )
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for source_value, label in mapping.items():
        lut[source_value] = label
    return lut[seg.astype(np.int64)]


def decode_labels(label_map: np.ndarray, convention: Convention) -> np.ndarray:
    """Map a 0..3 label map back to a source convention (for predictions written as NIfTI); where
    two source values mean one label, the lower one is written."""
    lut = np.zeros(4, dtype=np.uint8)
    for source_value, label in sorted(convention_mapping(convention).items(), reverse=True):
        lut[label] = source_value
    return lut[np.asarray(label_map, dtype=np.int64)]


def encode_onehot(mask: np.ndarray, path: object | None = None) -> np.ndarray:
    """Map the Kaggle export's (..., 3) NEC/NET, ED, ET channels to the 0..3 label map.

    The channels must be 0/1 and disjoint; a voxel set in two channels is refused rather than
    silently resolved, since that would mean the channel meaning is not what we assume.
    """
    mask = np.asarray(mask)
    if mask.ndim < 1 or mask.shape[-1] != 3:
        raise SourceError(f"mask must have 3 channels in its last axis, got shape {mask.shape}", path)
    if not np.all(np.isin(mask, (0, 1))):
        raise SourceError("mask channels hold values other than 0 and 1", path)
    binary = mask.astype(bool)
    if np.any(binary.sum(axis=-1) > 1):
        raise SourceError("mask channels overlap (a voxel in two classes)", path)
    weights = np.array([1, 2, 3], dtype=np.uint8)
    return (binary.astype(np.uint8) * weights).sum(axis=-1).astype(np.uint8)


def to_classes(label_map: np.ndarray) -> np.ndarray:
    """Label map (...) -> bool (3, ...) channels NEC/NET, ED, ET."""
    label_map = np.asarray(label_map)
    return np.stack([label_map == 1, label_map == 2, label_map == 3])


def to_regions(label_map: np.ndarray) -> np.ndarray:
    """Label map (...) -> bool (3, ...) BraTS regions WT, TC, ET."""
    label_map = np.asarray(label_map)
    return np.stack([label_map > 0, (label_map == 1) | (label_map == 3), label_map == 3])


def expand(label_map: np.ndarray, target: str) -> np.ndarray:
    """The three binary channels a model with `target` ('classes' or 'regions') predicts."""
    if target == "classes":
        return to_classes(label_map)
    if target == "regions":
        return to_regions(label_map)
    raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")


def class_voxels(label_map: np.ndarray) -> list[int]:
    """Voxel count of each label 0..3 (for metadata and class statistics)."""
    return np.bincount(np.asarray(label_map, dtype=np.int64).ravel(), minlength=4)[:4].tolist()
