"""Patient-level split assignment: deterministic from a seed, stable when patients are added.

Every patient gets a number in [0, 1) from a seeded hash of its id,

    u = int(sha256(f"{seed}:{patient_id}")[:16 hex digits]) / 2**64

and falls into the split whose interval of fixed, cumulative thresholds holds u
(`train=0.8,val=0.2`: u < 0.8 is train, the rest val; `--folds K`: fold floor(u * K)). Because a
patient's u depends on nothing but its own id and the seed, adding patients to the source never
moves an existing one, and all slices of a patient land in one split (no leak between splits).

A split may also be given: `--split-file splits_final.json` (nnU-Net's folds, `etl.splits_file`)
names each patient's split, so shards and nnU-Net train on the same folds.

Stratification by grade (HGG/LGG) when the source gives one: each grade is assigned on its own,
with the same thresholds, and the manifest records how many patients of each grade every split
received. With fixed thresholds the proportions hold per grade *in expectation* (each grade's
count in a split is binomial, spread about sqrt(n p (1 - p))), not exactly: exact quotas per
grade would have to move existing patients whenever the data grows, and we chose stability. A
split that receives no patient of a grade with enough patients to expect some is reported.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from shards_spec.errors import ToolError

SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
DEFAULT_SPLIT = "train=0.8,val=0.2"
HASH = "sha256(f'{seed}:{patient_id}'), first 16 hex digits / 2**64, fixed cumulative thresholds"
SHARE_TOLERANCE = 1e-6


class SplitError(ToolError):
    """A `--split`/`--folds` value that cannot be used, or an assignment that leaves a split empty."""


@dataclass(frozen=True)
class SplitSpec:
    """How patients are split: named shares in order (ratios) or K folds, and the seed; or (method
    "file") the patients of each split as a split file gives them."""

    method: str  # "ratio", "folds" or "file"
    shares: tuple[tuple[str, float], ...]
    seed: int = 0
    folds: int | None = None
    given: tuple[tuple[str, tuple[str, ...]], ...] = ()  # "file": (split, its patients), in order
    file: tuple[str, str] | None = None  # "file": (path, sha256 of its bytes)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.shares]

    def thresholds(self) -> list[tuple[str, float]]:
        """(name, upper bound of its interval); the last bound is exactly 1."""
        bounds, total = [], 0.0
        for i, (name, share) in enumerate(self.shares):
            total += share
            bounds.append((name, 1.0 if i == len(self.shares) - 1 else total))
        return bounds

    def describe(self, stratify: str | None) -> dict:
        """The manifest's `split` entry."""
        if self.method == "file":
            out = {"method": "file", "file": Path(self.file[0]).name, "sha256": self.file[1], "stratify": None,
                   "order": self.names}
            return {**out, "folds": self.folds} if self.folds else out
        out: dict = {"method": self.method, "seed": self.seed, "stratify": stratify, "hash": HASH,
                     "order": self.names}
        if self.method == "folds":
            out["folds"] = self.folds
        else:
            out["ratios"] = {name: share for name, share in self.shares}
        return out


def parse_split(text: str | None, folds: int | None, seed: int, split_file: Path | None = None) -> SplitSpec:
    """Parse `--split name=share,...`, `--folds K` or `--split-file FILE` (one of them) into a `SplitSpec`."""
    if split_file is not None:
        if folds is not None or text is not None:
            raise SplitError("give one of --split, --folds and --split-file")
        return from_file(Path(split_file))
    if folds is not None and text is not None:
        raise SplitError("give either --split or --folds, not both")
    if folds is not None:
        if folds < 2:
            raise SplitError(f"--folds must be at least 2, got {folds}")
        return SplitSpec("folds", tuple((f"fold{i}", 1.0 / folds) for i in range(folds)), seed, folds)
    text = DEFAULT_SPLIT if text is None else text
    shares: list[tuple[str, float]] = []
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq:
            raise SplitError(f"--split {text!r}: {part.strip()!r} is not name=share (e.g. train=0.8,val=0.2)")
        if not SPLIT_NAME.match(name):
            raise SplitError(f"--split {text!r}: split name {name!r} must be a letter then letters, digits, '_' or '-'")
        if name in (n for n, _ in shares):
            raise SplitError(f"--split {text!r}: split {name!r} is given twice")
        try:
            share = float(value)
        except ValueError:
            raise SplitError(f"--split {text!r}: share {value.strip()!r} of {name!r} is not a number") from None
        if not math.isfinite(share) or share < 0 or share > 1:
            raise SplitError(f"--split {text!r}: share of {name!r} must be between 0 and 1, got {value.strip()}")
        shares.append((name, share))
    total = sum(share for _, share in shares)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise SplitError(f"--split {text!r}: shares sum to {total:g}, they must sum to 1")
    return SplitSpec("ratio", tuple(shares), seed)


def from_file(path: Path) -> SplitSpec:
    """The splits nnU-Net's `splits_final.json` at `path` gives (`etl.splits_file`)."""
    from .splits_file import read_split_file

    given, digest = read_split_file(path)
    folds = len(given) if given[0][0] == "fold0" else None
    return SplitSpec("file", tuple((name, 0.0) for name, _ in given), folds=folds,
                     given=tuple((name, tuple(members)) for name, members in given), file=(str(path), digest))


def over_patients(spec: SplitSpec, source: set[str], usable: set[str]) -> SplitSpec:
    """`spec` for these patients: a split file's splits over the usable ones, with `test` for those it
    lists nowhere (`etl.splits_file.resolve`); other methods are unchanged."""
    if spec.method != "file":
        return spec
    from .splits_file import resolve

    given = resolve([(name, list(members)) for name, members in spec.given], source, usable, spec.file[0])
    return SplitSpec("file", tuple((name, 0.0) for name, _ in given), folds=spec.folds,
                     given=tuple((name, tuple(members)) for name, members in given), file=spec.file)


def unit_hash(seed: int, patient_id: str) -> float:
    """The patient's seeded position in [0, 1)."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()
    return int(digest[:16], 16) / float(1 << 64)


def _pick(spec: SplitSpec, u: float) -> str:
    for name, bound in spec.thresholds():
        if u < bound:
            return name
    return spec.names[-1]


@dataclass
class Assignment:
    """Patient id -> split name, with what stratification found."""

    split_of: dict[str, str]
    stratify: str | None
    grades: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> grade -> patients
    warnings: list[str] = field(default_factory=list)

    def patients_of(self, split: str) -> list[str]:
        return sorted(pid for pid, s in self.split_of.items() if s == split)


UNKNOWN_GRADE = "unknown"


def assign(patients: dict[str, str | None], spec: SplitSpec) -> Assignment:
    """Assign each patient (id -> grade or None) to a split; stratify when any grade is known.

    Raises `SplitError` when a split with a non-zero share receives no patient. A split file's
    assignment (`over_patients` first) is taken as given.
    """
    if spec.method == "file":
        return _given(patients, spec)
    stratify = "grade" if any(g is not None for g in patients.values()) else None
    strata: dict[str, list[str]] = {}
    for pid in sorted(patients):
        grade = patients[pid] if stratify else None
        strata.setdefault(UNKNOWN_GRADE if grade is None else str(grade), []).append(pid)

    split_of: dict[str, str] = {}
    grades: dict[str, dict[str, int]] = {name: {} for name in spec.names}
    for grade, members in sorted(strata.items()):  # each stratum on its own, same thresholds
        for pid in members:
            name = _pick(spec, unit_hash(spec.seed, pid))
            split_of[pid] = name
            grades[name][grade] = grades[name].get(grade, 0) + 1

    empty = [name for name, share in spec.shares if share > 0 and not grades[name]]
    if empty:
        shares = ", ".join(f"{n}={s:g}" for n, s in spec.shares)
        raise SplitError(
            f"split(s) {', '.join(empty)} received no patient of {len(patients)} ({shares}, seed {spec.seed}): "
            "choose another --seed, larger shares or fewer folds, or add patients"
        )

    warnings = []
    if stratify:
        for name, share in spec.shares:
            for grade, members in sorted(strata.items()):
                expected = share * len(members)
                if expected >= 3 and grades[name].get(grade, 0) == 0:
                    warnings.append(f"split {name} received no {grade} patient (about {expected:.0f} expected)")
    return Assignment(split_of, stratify, grades if stratify else {}, warnings)


def _given(patients: dict[str, str | None], spec: SplitSpec) -> Assignment:
    split_of = {pid: name for name, members in spec.given for pid in members if pid in patients}
    missing = sorted(set(patients) - set(split_of))
    if missing:
        raise SplitError(f"patient {missing[0]} is in no split of {Path(spec.file[0]).name}")
    empty = [name for name, _ in spec.shares if name not in split_of.values()]
    if empty:
        raise SplitError(f"split(s) {', '.join(empty)} of {spec.file[0]} hold no usable patient of the source")
    from .splits_file import UNLISTED

    unlisted = sum(1 for name in split_of.values() if name == UNLISTED)
    notes = [f"{unlisted} patient(s) that {Path(spec.file[0]).name} does not list are in the split {UNLISTED}"] \
        if unlisted else []
    return Assignment(split_of, None, warnings=notes)
