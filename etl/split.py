"""Patient-level split assignment: deterministic from a seed, stable when patients are added.

Every patient gets a number in [0, 1) from a seeded hash of its id,

    u = int(sha256(f"{seed}:{patient_id}")[:16 hex digits]) / 2**64

and falls into the split whose interval of fixed, cumulative thresholds holds u
(`train=0.8,val=0.2`: u < 0.8 is train, the rest val; `--folds K`: fold floor(u * K)). Because a
patient's u depends on nothing but its own id and the seed, adding patients to the source never
moves an existing one, and all slices of a patient land in one split (no leak between splits).

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

from shards_spec.errors import ToolError

SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
DEFAULT_SPLIT = "train=0.8,val=0.2"
HASH = "sha256(f'{seed}:{patient_id}'), first 16 hex digits / 2**64, fixed cumulative thresholds"
SHARE_TOLERANCE = 1e-6


class SplitError(ToolError):
    """A `--split`/`--folds` value that cannot be used, or an assignment that leaves a split empty."""


@dataclass(frozen=True)
class SplitSpec:
    """How patients are split: named shares in order (ratios) or K folds, and the seed."""

    method: str  # "ratio" or "folds"
    shares: tuple[tuple[str, float], ...]
    seed: int = 0
    folds: int | None = None

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
        out: dict = {"method": self.method, "seed": self.seed, "stratify": stratify, "hash": HASH,
                     "order": self.names}
        if self.method == "folds":
            out["folds"] = self.folds
        else:
            out["ratios"] = {name: share for name, share in self.shares}
        return out


def parse_split(text: str | None, folds: int | None, seed: int) -> SplitSpec:
    """Parse `--split name=share,...` or `--folds K` (not both) into a `SplitSpec`."""
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

    Raises `SplitError` when a split with a non-zero share receives no patient.
    """
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
