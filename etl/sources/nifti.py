"""BraTS NIfTI releases: 2020/2021 (`<id>_<mod>.nii[.gz]`) and 2023 GLI (`<id>-<mod>.nii.gz`).

The three layouts differ only in names, so each is a `NiftiLayout` instance of this module
(registered in `etl.sources.SOURCES`). A patient is a folder named after its id holding one file
per modality and, for training data, a segmentation. Both `.nii` and `.nii.gz` are read. The
segmentation is `<id>_seg.nii[.gz]` (2023: `<id>-seg.nii.gz`); failing that, the single other
NIfTI file in the folder whose name contains "seg" (any case) is taken and a note says so: that
is how BraTS20_Training_355's `W39_1998.09.19_Segm.nii` is found.

The scan reads names and headers (`nifti_volume.check_headers`); `load` reads the data
(`nifti_volume.load_nifti_patient`). The 2020 release's CSVs (grade, age, survival) beside the
patient folders are read by `csvmeta`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from shards_spec.errors import SourceError
from shards_spec.labels import CHANNELS, CONVENTION_OF_LAYOUT

from .base import MAX_PATIENT_BYTES, PatientRef, PatientVolume, Scan, SourceLayout, relative_posix, safe_id
from .csvmeta import read_csv_metadata
from .nifti_volume import check_headers, load_nifti_patient

EXTENSIONS = (".nii.gz", ".nii")
BRAIN_MASK_RULE = "any modality non-zero on the native grid (BraTS is skull-stripped)"


class NiftiLayout(SourceLayout):
    """A BraTS NIfTI release: patient folders matching `pattern`, files `<id><separator><suffix>`."""

    brain_mask_rule = BRAIN_MASK_RULE

    def __init__(self, name: str, pattern: str, separator: str, suffixes: dict[str, str], example: str) -> None:
        self.name = name
        self.pattern = re.compile(pattern)
        self.separator = separator
        self.suffixes = suffixes  # file suffix -> our modality name
        self.label_convention = CONVENTION_OF_LAYOUT[name]
        self.expected = f"patient folders named {example}"

    def is_patient_folder(self, name: str) -> bool:
        return bool(self.pattern.match(name))

    def scan(self, root: Path, folders: list[Path], *, require_labels: bool, check_headers: bool,
             max_patient_bytes: int = MAX_PATIENT_BYTES) -> Scan:
        return scan_nifti(root, self.name, folders, require_labels, check_headers, max_patient_bytes)

    def load(self, ref: PatientRef, channels: list[str], *, require_labels: bool,
             max_patient_bytes: int = MAX_PATIENT_BYTES, **options) -> PatientVolume:
        return load_nifti_patient(ref, channels, require_labels, self.label_convention, max_patient_bytes)


BRATS2020 = NiftiLayout("brats2020", r"^BraTS20_(Training|Validation|Testing)_\d{3,}$", "_",
                        {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, "BraTS20_Training_NNN")
BRATS2021 = NiftiLayout("brats2021", r"^BraTS2021_\d{5}$", "_",
                        {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, "BraTS2021_NNNNN")
BRATS2023 = NiftiLayout("brats2023", r"^BraTS-GLI-\d{5}-\d{3}$", "-",
                        {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}, "BraTS-GLI-NNNNN-NNN")
NIFTI_LAYOUTS: dict[str, NiftiLayout] = {layout.name: layout for layout in (BRATS2020, BRATS2021, BRATS2023)}
# The helpers below that take a layout name read its naming from here.
PATIENT_PATTERNS = {name: layout.pattern for name, layout in NIFTI_LAYOUTS.items()}
SEPARATOR = {name: layout.separator for name, layout in NIFTI_LAYOUTS.items()}
SUFFIXES = {name: layout.suffixes for name, layout in NIFTI_LAYOUTS.items()}


def layout_of_folder_name(name: str) -> str | None:
    for layout, pattern in PATIENT_PATTERNS.items():
        if pattern.match(name):
            return layout
    return None


def nifti_stem(name: str) -> str | None:
    """File name without .nii/.nii.gz (any case), or None for other files."""
    lower = name.lower()
    for ext in EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return None


def match_files(
    folder: Path, pid: str, layout: str, entries: dict[str, int]
) -> tuple[dict[str, str], list[SourceError], list[str]]:
    """Assign the NIfTI files of a patient folder to modalities and the segmentation.

    `entries` maps file name -> size. Returns (files, problems, notes); files has 'seg' only
    when a segmentation was found. Missing modalities, duplicates (.nii and .nii.gz) and
    ambiguous segmentation candidates are problems.
    """
    sep = SEPARATOR[layout]
    expected = {f"{pid}{sep}{suffix}".lower(): ours for suffix, ours in SUFFIXES[layout].items()}
    expected[f"{pid}{sep}seg".lower()] = "seg"
    found: dict[str, list[str]] = {}
    others: list[str] = []
    for name in sorted(entries):
        stem = nifti_stem(name)
        if stem is None:
            continue
        key = expected.get(stem.lower())
        if key is None:
            others.append(name)
        else:
            found.setdefault(key, []).append(name)

    files: dict[str, str] = {}
    problems: list[SourceError] = []
    notes: list[str] = []
    for key, names in found.items():
        if len(names) > 1:
            problems.append(
                SourceError(
                    f"{key} is present twice ({' and '.join(names)}): remove one copy", folder / names[-1]
                )
            )
        else:
            files[key] = str(folder / names[0])
    for suffix, ours in SUFFIXES[layout].items():
        if ours not in found:
            problems.append(
                SourceError(
                    f"patient {pid} has no {ours} image (expected {pid}{sep}{suffix}.nii or .nii.gz)", folder
                )
            )
    if "seg" not in found:
        candidates = [n for n in others if "seg" in n.lower()]
        if len(candidates) == 1:
            files["seg"] = str(folder / candidates[0])
            notes.append(f"{pid}: segmentation matched {candidates[0]} (no {pid}{sep}seg.nii[.gz])")
        elif len(candidates) > 1:
            problems.append(
                SourceError(
                    f"patient {pid} has no {pid}{sep}seg.nii[.gz] and several candidate segmentations "
                    f"({', '.join(candidates)}): keep one",
                    folder,
                )
            )
    for key, path in files.items():
        if entries.get(Path(path).name, 1) == 0:
            problems.append(SourceError(f"empty file (0 bytes), expected the {key} image", path))
    return files, problems, notes


def scan_nifti(root: Path, layout: str, folders: list[Path], require_labels: bool, headers: bool,
               max_patient_bytes: int = MAX_PATIENT_BYTES) -> Scan:
    """Every patient folder of `layout` under `root`, with the CSV metadata beside them."""
    scan = Scan(layout=layout, root=root, patients=[], unlabelled=[], problems=[], notes=[])
    csv_meta = _csv_metadata(scan, folders)
    seen: dict[str, Path] = {}
    for folder in sorted(folders, key=lambda f: (f.name, str(f))):
        pid = folder.name
        if pid in seen:
            scan.problems.append(SourceError(f"patient {pid} is present twice (also {seen[pid]})", folder))
            continue
        seen[pid] = folder
        try:
            entries, unread = list_files(folder)
        except OSError as exc:
            scan.problems.append(SourceError(f"cannot be listed ({exc.strerror or exc})", folder))
            continue
        if unread:
            scan.problems += unread
            continue
        files, problems, notes = match_files(folder, pid, layout, entries)
        if headers:
            problems += check_headers({k: v for k, v in files.items() if entries.get(Path(v).name)}, max_patient_bytes)
        scan.notes += notes
        if problems:
            scan.problems += problems
            continue
        meta = {"folder": str(folder)}
        if notes:
            meta["notes"] = notes
        entry = csv_meta.get(pid, {"grade": None, "meta": {}})
        meta.update(entry["meta"])
        if "seg" not in files:
            if require_labels:
                scan.unlabelled.append(pid)
                continue
        scan.patients.append(PatientRef(id=pid, layout=layout, files=files, grade=entry["grade"], meta=meta))
        for path in files.values():
            scan.inputs.append((relative_posix(Path(path), folder.parent), entries[Path(path).name]))

    scan.patients.sort(key=lambda p: p.id)
    without_seg = sum(1 for p in scan.patients if "seg" not in p.files) + len(scan.unlabelled)
    scan.notes.append(
        f"{layout}: {len(scan.patients)} patient(s) ready, {len(scan.problems)} problem(s), "
        f"{without_seg} without segmentation"
        + (" (left out)" if require_labels and without_seg else "")
    )
    return scan


def _csv_metadata(scan: Scan, folders: list[Path]) -> dict[str, dict]:
    """Grade and clinical values per patient id from the CSVs beside the patient folders."""
    csv_meta: dict[str, dict] = {}
    for parent in sorted({f.parent for f in folders}):
        by_id, csv_files = read_csv_metadata(parent)
        for pid, entry in by_id.items():
            csv_meta.setdefault(pid, {"grade": None, "meta": {}})
            csv_meta[pid]["grade"] = entry["grade"] or csv_meta[pid]["grade"]
            csv_meta[pid]["meta"].update(entry["meta"])
        for path in csv_files:
            scan.inputs.append((path.name, path.stat().st_size))
            scan.notes.append(f"read {path}")
    return csv_meta


def folder_entries(folder: Path) -> dict[str, int]:
    """File name -> size for the plain files of a folder; the first unreadable entry is raised."""
    entries, problems = list_files(folder)
    if problems:
        raise problems[0]
    return entries


def list_files(folder: Path) -> tuple[dict[str, int], list[SourceError]]:
    """(file name -> size of the plain files of a folder, entries whose type or size cannot be read).

    A link to nothing is such an entry: it may be the modality the folder should hold. Raises
    OSError when the folder itself cannot be listed."""
    entries: dict[str, int] = {}
    problems: list[SourceError] = []
    with os.scandir(folder) as it:
        for entry in it:
            try:
                if entry.is_file():
                    entries[entry.name] = entry.stat().st_size
                elif entry.is_symlink() and not entry.is_dir():
                    problems.append(SourceError("is a symbolic link to nothing", entry.path))
            except OSError as exc:
                problems.append(SourceError(f"cannot be read ({exc.strerror or exc})", entry.path))
    return entries, problems


def infer_folder_layout(folder: Path, entries: dict[str, int]) -> tuple[str, str] | None:
    """(layout, patient id) of a folder whose name is not a BraTS id, from its file names."""
    stems = [s for s in (nifti_stem(n) for n in entries) if s]
    for layout in ("brats2023", "brats2020"):
        sep = SEPARATOR[layout]
        prefixes = set()
        for suffix in SUFFIXES[layout]:
            tail = f"{sep}{suffix}".lower()
            matches = [s[: -len(tail)] for s in stems if s.lower().endswith(tail)]
            if len(matches) != 1:
                break
            prefixes.add(matches[0])
        else:
            if len(prefixes) == 1:
                return layout, prefixes.pop()
    return None


def patient_from_nifti_folder(folder: Path) -> tuple[PatientRef, list[str]]:
    """One patient folder of any NIfTI layout, validated at header level; seg optional."""
    entries = folder_entries(folder)
    layout = layout_of_folder_name(folder.name)
    prefix = folder.name
    if layout is None:
        inferred = infer_folder_layout(folder, entries)
        if inferred is None:
            raise SourceError(
                "not a BraTS patient folder: expected <id>_{t1,t1ce,t2,flair}.nii[.gz] "
                "or <id>-{t1n,t1c,t2w,t2f}.nii.gz",
                folder,
            )
        layout, prefix = inferred
        if layout_of_folder_name(prefix):
            layout = layout_of_folder_name(prefix) or layout
    files, problems, notes = match_files(folder, prefix, layout, entries)
    problems += check_headers(files)
    if problems:
        raise problems[0]
    ref = PatientRef(id=safe_id(prefix), layout=layout, files=files, meta={"folder": str(folder)})
    return ref, notes


_MODALITY_TAIL = re.compile(r"[_-](t1ce|t1|t2|flair|t1n|t1c|t2w|t2f)$", re.IGNORECASE)
_ALIASES = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "label": "seg", "mask": "seg"}


def patient_from_nifti_files(files: dict[str, str]) -> PatientRef:
    """A patient from explicit files (modality or 2023 suffix -> path); layout from the names."""
    chosen: dict[str, str] = {}
    for key, path in files.items():
        name = _ALIASES.get(key.lower(), key.lower())
        if name not in (*CHANNELS, "seg"):
            raise SourceError(f"unknown modality {key!r}: expected one of {[*CHANNELS, 'seg']}", path)
        if name in chosen:
            raise SourceError(f"{name} given twice", path)
        p = Path(path)
        if not p.is_file():
            raise SourceError("does not exist or is not a file", path)
        if p.stat().st_size == 0:
            raise SourceError(f"empty file (0 bytes), expected the {name} image", path)
        chosen[name] = str(p)
    if not any(m in chosen for m in CHANNELS):
        raise SourceError("no image files given (expected some of t1, t1ce, t2, flair)")
    problems = check_headers(chosen)
    if problems:
        raise problems[0]
    names = [Path(p).name for p in chosen.values()]
    layout = "brats2020"
    for candidate in ("brats2023", "brats2021", "brats2020"):
        pattern = PATIENT_PATTERNS[candidate].pattern.rstrip("$")
        if any(re.match(pattern, n) for n in names):
            layout = candidate
            break
    first = Path(chosen[next(m for m in CHANNELS if m in chosen)])
    stem = _MODALITY_TAIL.sub("", nifti_stem(first.name) or first.name)
    return PatientRef(id=safe_id(stem), layout=layout, files=chosen, meta={"folder": str(first.parent)})
