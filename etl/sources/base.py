"""What every source reader produces: patient references, loaded volumes, scan reports.

A scan is cheap and runs once in the driver: it finds the patients, reads headers and CSVs, and
collects one `SourceError` per bad patient or file instead of stopping at the first. Loading is
the per-patient task: it reads the data, checks values, and returns arrays in the shard
contract's conventions (channel-first float32, a 0..3 label map, a brain mask), leaving the
geometry exactly as stored.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shards_spec.errors import SourceError

BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
SPACING_TOLERANCE_MM = 1e-3
BORDER_BRAIN_FRACTION = 0.25
"""Above this fraction of non-zero voxels on the six faces of the volume we warn that it does not
look skull-stripped (BraTS volumes are zero on their borders; raw head MRI has noise there)."""

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class PatientRef:
    """One patient as found by a scan: everything a worker needs to load it (JSON-able)."""

    id: str  # [A-Za-z0-9_-]: folder name (NIfTI) or volume_V (Kaggle)
    layout: str
    files: dict[str, str]  # 't1','t1ce','t2','flair','seg' -> path; Kaggle: 'slices' -> data folder
    grade: str | None = None  # HGG/LGG from name_mapping.csv
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PatientRef":
        return cls(**data)


@dataclass
class PatientVolume:
    """One patient's arrays, as stored on disk (no reorientation), ready for preprocessing."""

    volume: np.ndarray  # float32 (C, H, W, D), requested channel order, background 0; each channel
    # is laid out slice-contiguous as stored (not C order): np.ascontiguousarray if you need that
    brain: np.ndarray  # bool (H, W, D)
    labels: np.ndarray | None  # uint8 (H, W, D) label map 0..3, None without segmentation
    affine: np.ndarray  # float64 (4, 4)
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    warnings: list[str]  # "does not look like BraTS" and contradiction notes, one line each
    source_dtype: str
    notes: list[str] = field(default_factory=list)  # informational (e.g. background value found)


@dataclass
class Scan:
    """What `scan_source` found under `root`."""

    layout: str
    root: Path
    patients: list[PatientRef]  # sorted by id
    unlabelled: list[str]  # ids left out because they have no segmentation
    problems: list[SourceError]  # one per bad patient or file; those patients are left out
    notes: list[str]  # log lines worth showing the user
    inputs: list[tuple[str, int]] = field(default_factory=list)
    """(path relative to the layout's base folder, size in bytes) of every file the patients
    (and the CSVs) are read from: the basis of `source_fingerprint`."""


MAX_PATIENT_BYTES = 4 << 30
"""Default limit on the host memory one patient may need to load and preprocess (4 GiB; BraTS
needs about 0.25 GiB). Checked from the declared dimensions before any voxel is read; change it
with `etl build-shards --max-patient-memory`."""
BYTES_PER_VOXEL = 28
"""Host memory needed per voxel of a patient's volume (four float32 modalities, the label map,
the brain mask and preprocessing temporaries): measured 26.5 on a 240x240x155 BraTS 2020
patient (peak RSS of load_patient + preprocess_volume), rounded up."""


def patient_size_problem(shape, path, max_bytes: int, bytes_per_voxel: int = BYTES_PER_VOXEL) -> "SourceError | None":
    """A SourceError when a volume of `shape` needs more than `max_bytes` to load, else None.

    Dimensions are multiplied as Python integers (no overflow), so any declared shape is safe.
    `bytes_per_voxel` is what loading needs per voxel of `shape` (a layout that holds more while
    reading says so)."""
    import math

    dims = [int(n) for n in shape]
    if any(n < 1 for n in dims):
        return SourceError(f"declares a volume of {'x'.join(map(str, dims))} voxels: every dimension must be positive", path)
    need = math.prod(dims) * bytes_per_voxel
    if need > max_bytes:
        return SourceError(f"declares a volume of {'x'.join(map(str, dims))} voxels, which needs about {_gib(need)} "
                           f"of memory to load, more than the limit of {_gib(max_bytes)} "
                           "(raise it with --max-patient-memory)", path)
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class SourceLayout:
    """One on-disk layout of a BraTS release: how its patients are found and loaded.

    A layout is a subclass instance in its own module plus one line in `etl.sources.SOURCES`.
    Discovery walks the source folder once, breadth first, and asks every layout about what it
    sees: `is_patient_folder` claims a folder as one patient (not descended into), `is_data_file`
    claims the folder holding such files (the Kaggle export keeps every patient's slices in one
    folder). `scan` then turns the claimed folders into a `Scan`, `load` reads one patient.

    Options that only one layout understands (the Kaggle image channel order) are declared in
    `options` with their defaults; the build passes them through without knowing them, records
    `recorded_options` in the plan and the manifest, and hands them to `load` as keywords.
    """

    name: str = ""
    label_convention: str = ""
    """Key of `shards_spec.labels.CONVENTIONS`: how this release's segmentation labels map to 0..3."""
    brain_mask_rule: str = ""
    """How `load` finds the brain, as the manifest's preprocessing states it."""
    expected: str = ""
    """What the layout looks like on disk, for the message when no layout is found."""
    options: dict[str, object] = {}

    def is_patient_folder(self, name: str) -> bool:
        return False

    def is_data_file(self, name: str) -> bool:
        return False

    def scan(self, root: Path, folders: list[Path], *, require_labels: bool, check_headers: bool,
             max_patient_bytes: int = MAX_PATIENT_BYTES) -> "Scan":
        """The patients in `folders`; a patient whose declared size needs more than
        `max_patient_bytes` (`patient_size_problem`) is a problem, found from headers only."""
        raise NotImplementedError

    def load(self, ref: "PatientRef", channels: list[str], *, require_labels: bool,
             max_patient_bytes: int = MAX_PATIENT_BYTES, **options) -> "PatientVolume":
        """One patient's arrays; the size is checked again before anything is allocated."""
        raise NotImplementedError

    def resolve_options(self, given: dict) -> dict:
        """This layout's options from `given` (command-line values, None = default), validated;
        raise ToolError naming the option on a bad value."""
        return {name: default if given.get(name) is None else given[name] for name, default in self.options.items()}

    def recorded_options(self, resolved: dict) -> dict:
        """The options that decide the bytes of this layout's shards (plan and manifest)."""
        return {}

    def patient_of(self, name: str) -> str | None:
        """The patient a path component names (a patient folder, a per-slice file), else None."""
        return safe_id(name) if self.is_patient_folder(name) else None

    def convention_of(self, ref: "PatientRef"):
        """How `ref`'s segmentation values map to shard labels (`shards_spec.labels.Convention`):
        the release's `label_convention`, unless the dataset describes its own (MSD)."""
        return self.label_convention


def channel_problem(names) -> str | None:
    """What is wrong with a list of modality names, in words a user can act on, or None."""
    from shards_spec.labels import CHANNELS

    names = list(names)
    if not names:
        return f"no modality given (the modalities are {', '.join(CHANNELS)})"
    unknown = [n for n in names if n not in CHANNELS]
    if unknown:
        return f"unknown modality {unknown[0]!r} (the modalities are {', '.join(CHANNELS)})"
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
        return f"{twice[0]} is given twice"
    return None


def safe_id(name: str) -> str:
    """A patient key from a folder or file name: [A-Za-z0-9_-] only, no dot."""
    cleaned = _ID_UNSAFE.sub("_", name).strip("_")
    return cleaned or "patient"


def geometry_warnings(shape: tuple[int, ...], spacing: tuple[float, ...] | None) -> list[str]:
    warnings = []
    if tuple(shape) != BRATS_SHAPE:
        warnings.append(
            f"shape {'x'.join(map(str, shape))} is not BraTS's 240x240x155 (processed as stored)"
        )
    if spacing is not None and any(abs(s - 1.0) > SPACING_TOLERANCE_MM for s in spacing):
        shown = ", ".join(f"{s:g}" for s in spacing)
        warnings.append(f"voxel spacing ({shown}) mm is not BraTS's 1 mm isotropic (not resampled)")
    return warnings


def skull_strip_warning(brain: np.ndarray) -> str | None:
    """Warn when many voxels on the volume's faces are non-zero (BraTS is zero outside the brain)."""
    faces = [brain[0], brain[-1], brain[:, 0], brain[:, -1], brain[:, :, 0], brain[:, :, -1]]
    total = sum(f.size for f in faces)
    fraction = sum(int(np.count_nonzero(f)) for f in faces) / max(total, 1)
    if fraction > BORDER_BRAIN_FRACTION:
        return (
            f"{fraction:.0%} of the voxels on the volume border are non-zero: the images do not look "
            "skull-stripped (BraTS is zero outside the brain); the brain mask will include them"
        )
    return None


def relative_posix(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


def require_folder(root: Path) -> Path:
    """`root` as a Path, or a SourceError naming it when it is missing, a file or empty."""
    root = Path(root)
    if not root.exists():
        raise SourceError("does not exist", root)
    if not root.is_dir():
        raise SourceError("is a file; expected a folder holding a BraTS release", root)
    try:
        empty = not any(root.iterdir())
    except OSError as exc:
        raise SourceError(f"cannot be listed ({exc.strerror or exc})", root) from None
    if empty:
        raise SourceError("is an empty folder", root)
    return root
