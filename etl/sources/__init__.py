"""Source readers: find the patients of a BraTS release on disk and load them as arrays.

    scan = scan_source("data/MICCAI_BraTS2020_TrainingData")   # layout detected from the names
    for problem in scan.problems: print(problem)                # SourceError("path: problem")
    vol = load_patient(scan.patients[0])                        # PatientVolume, channels t1,t1ce,t2,flair

Layouts (detected from folder and file names; pass `layout=` to force one):

* ``brats2020``  ``BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii[.gz]``
  (root: the MICCAI folder, any ancestor within a few levels; name_mapping.csv and
  survival_info.csv beside the patient folders give grade, age and survival)
* ``brats2021``  ``BraTS2021_NNNNN/BraTS2021_NNNNN_{...}.nii.gz``
* ``brats2023``  ``BraTS-GLI-NNNNN-NNN/BraTS-GLI-NNNNN-NNN-{t1n,t1c,t2w,t2f,seg}.nii.gz``
* ``kaggle-h5``  ``.../data/volume_V_slice_S.h5`` (the 2D export; a patient is a volume)

`scan_source` is cheap (names, sizes, headers) and runs once; `load_patient` is the per-patient
task. Everything a user's data can get wrong is a `SourceError` naming the file and the problem:
collected in `Scan.problems` by the scan, raised by `load_patient`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from shards_spec.errors import SourceError
from shards_spec.labels import CHANNELS, check_channels

from . import kaggle, nifti
from .base import LAYOUTS, NIFTI_LAYOUTS, PatientRef, PatientVolume, Scan, relative_posix, require_folder
from .csvmeta import read_csv_metadata
from .kaggle import DEFAULT_ORDER, KAGGLE_ORDERS, check_kaggle_channel_order

__all__ = [
    "LAYOUTS",
    "KAGGLE_ORDERS",
    "CHANNELS",
    "PatientRef",
    "PatientVolume",
    "Scan",
    "SourceError",
    "detect_layout",
    "scan_source",
    "load_patient",
    "patient_from_folder",
    "patient_from_files",
    "source_fingerprint",
    "check_kaggle_channel_order",
]

MAX_DEPTH = 6
"""How deep below the given root to look for patient folders or Kaggle slices."""
MAX_FOLDERS = 20_000
"""Stop descending after listing this many folders (someone passed `/`)."""


def _discover(root: Path) -> dict[str, list[Path]]:
    """Patient folders per NIfTI layout and folders holding Kaggle slices, breadth first."""
    found: dict[str, list[Path]] = {layout: [] for layout in LAYOUTS}
    level, listed = [root], 0
    for _ in range(MAX_DEPTH + 1):
        below: list[Path] = []
        for folder in level:
            layout = nifti.layout_of_folder_name(folder.name)
            if layout is not None:
                found[layout].append(folder)  # a patient folder: nothing to find inside
                continue
            if listed >= MAX_FOLDERS:
                continue
            listed += 1
            has_slices = False
            try:
                with os.scandir(folder) as it:
                    for entry in it:
                        if entry.name.startswith("."):
                            continue
                        if entry.is_dir():
                            below.append(Path(entry.path))
                        elif not has_slices and kaggle.SLICE_NAME.match(entry.name):
                            has_slices = True
            except OSError:
                continue
            if has_slices:
                found["kaggle-h5"].append(folder)
        if not below:
            break
        level = sorted(below)
    return found


def _choose_layout(root: Path, found: dict[str, list[Path]], layout: str | None) -> str:
    present = [name for name in LAYOUTS if found[name]]
    if layout is not None:
        if layout not in LAYOUTS:
            raise SourceError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        if not found[layout]:
            also = f" (found {', '.join(present)})" if present else ""
            raise SourceError(f"no {layout} data found within {MAX_DEPTH} folder levels{also}", root)
        return layout
    if not present:
        raise SourceError(
            "no BraTS data found within "
            f"{MAX_DEPTH} folder levels: expected patient folders named BraTS20_Training_NNN, "
            "BraTS2021_NNNNN or BraTS-GLI-NNNNN-NNN, or Kaggle volume_V_slice_S.h5 files",
            root,
        )
    if len(present) > 1:
        counts = ", ".join(f"{name} ({len(found[name])} folders)" for name in present)
        raise SourceError(f"holds more than one layout: {counts}; choose one with --layout", root)
    return present[0]


def detect_layout(root: Path | str) -> str:
    """The layout of the data under `root`; SourceError naming root if none or several."""
    root = require_folder(Path(root))
    return _choose_layout(root, _discover(root), None)


def scan_source(
    root: Path | str,
    layout: str | None = None,
    *,
    require_labels: bool = True,
    check_headers: bool = True,
) -> Scan:
    """Find and validate every patient under `root` (cheap: names, sizes and headers only).

    Patients with a problem are left out of `patients` and reported in `problems`, one
    SourceError per problem; the caller decides whether to stop. Folders without a
    segmentation are listed in `unlabelled` and left out, unless `require_labels=False`, which
    keeps them as patients without 'seg'. A malformed CSV or an unusable root is raised.
    """
    root = require_folder(Path(root))
    found = _discover(root)
    layout = _choose_layout(root, found, layout)
    if layout == "kaggle-h5":
        return _scan_kaggle(root, found["kaggle-h5"], check_headers)
    return _scan_nifti(root, layout, found[layout], require_labels, check_headers)


def _scan_nifti(
    root: Path, layout: str, folders: list[Path], require_labels: bool, check_headers: bool
) -> Scan:
    scan = Scan(layout=layout, root=root, patients=[], unlabelled=[], problems=[], notes=[])
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

    seen: dict[str, Path] = {}
    for folder in sorted(folders, key=lambda f: (f.name, str(f))):
        pid = folder.name
        if pid in seen:
            scan.problems.append(SourceError(f"patient {pid} is present twice (also {seen[pid]})", folder))
            continue
        seen[pid] = folder
        try:
            entries = nifti.folder_entries(folder)
        except OSError as exc:
            scan.problems.append(SourceError(f"cannot be listed ({exc.strerror or exc})", folder))
            continue
        files, problems, notes = nifti.match_files(folder, pid, layout, entries)
        if check_headers:
            problems += nifti.check_headers({k: v for k, v in files.items() if entries.get(Path(v).name)})
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


def _scan_kaggle(root: Path, folders: list[Path], check_headers: bool) -> Scan:
    if len(folders) > 1:
        shown = ", ".join(str(f) for f in folders[:4])
        raise SourceError(
            f"several folders hold volume_V_slice_S.h5 files ({shown}): point the source at one", root
        )
    patients, problems, notes, inputs = kaggle.scan_kaggle_folder(folders[0], root, check_headers)
    patients.sort(key=lambda p: p.id)
    notes.append(f"kaggle-h5: {len(patients)} volume(s) ready, {len(problems)} problem(s)")
    return Scan(
        layout="kaggle-h5",
        root=root,
        patients=patients,
        unlabelled=[],
        problems=problems,
        notes=notes,
        inputs=inputs,
    )


def load_patient(
    ref: PatientRef,
    channels: Sequence[str] = CHANNELS,
    *,
    kaggle_channel_order: Sequence[str] | str = DEFAULT_ORDER,
    require_labels: bool = True,
) -> PatientVolume:
    """Read and validate one patient (the per-patient task of the ETL, and `predict`'s reader).

    Returns the images in `channels` order, float32, background 0, as stored (no reorientation).
    Labels are loaded whenever the patient has a segmentation; `require_labels` makes a missing
    one an error. Bad data (non-finite values, labels outside the release's set, truncated
    files, disagreeing shapes) raise SourceError naming the file.
    """
    try:
        channels = check_channels(list(channels))
    except ValueError as exc:
        raise SourceError(str(exc)) from None
    if ref.layout == "kaggle-h5":
        return kaggle.load_kaggle_patient(ref, channels, kaggle_channel_order, require_labels)
    if ref.layout in NIFTI_LAYOUTS:
        return nifti.load_nifti_patient(ref, channels, require_labels)
    raise SourceError(f"patient {ref.id} has unknown layout {ref.layout!r}: expected one of {', '.join(LAYOUTS)}")


def patient_from_folder(path: Path | str) -> PatientRef:
    """One patient folder of any NIfTI layout (for `predict`); the segmentation is optional.

    The folder may have any name when its files are `<id>_<mod>.nii[.gz]` or `<id>-<mod>.nii.gz`.
    Header problems are raised (the first one) as SourceError.
    """
    folder = Path(path)
    if not folder.exists():
        raise SourceError("does not exist", folder)
    if not folder.is_dir():
        raise SourceError("is a file; expected a patient folder (or give the modality files)", folder)
    ref, notes = nifti.patient_from_nifti_folder(folder)
    if notes:
        ref.meta["notes"] = notes
    return ref


def patient_from_files(files: dict[str, str]) -> PatientRef:
    """A patient from explicit files: {'t1': path, 't1ce': ..., 't2': ..., 'flair': ..., 'seg'?: ...}.

    Keys may also be the 2023 names (t1n, t1c, t2w, t2f). Any subset of modalities is accepted
    here; `load_patient` asks for the channels it needs. The layout (which decides the label
    convention of a seg) is inferred from the file names, else brats2020.
    """
    return nifti.patient_from_nifti_files(files)


def source_fingerprint(scan: Scan) -> str:
    """sha256 over the layout and the sorted (relative path, size) of the scanned input files.

    Paths are relative to the folder holding the patient folders (Kaggle: the slice folder), so
    the same data pointed at through a different ancestor has the same fingerprint.
    """
    inputs = scan.inputs
    if not inputs:
        inputs = []
        for ref in scan.patients:
            for path in ref.files.values():
                p = Path(path)
                if p.is_file():
                    inputs.append((relative_posix(p, p.parent.parent), p.stat().st_size))
    payload = json.dumps({"layout": scan.layout, "files": sorted(map(list, inputs))}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
