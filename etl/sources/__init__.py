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
* ``msd``        the Medical Segmentation Decathlon's ``Task01_BrainTumour/``: ``dataset.json``
  (modality order and label values, read from it), 4D ``imagesTr/BRATS_NNN.nii.gz``,
  ``labelsTr/``, and ``imagesTs/`` without labels

`scan_source` is cheap (names, sizes, headers) and runs once; `load_patient` is the per-patient
task. Everything a user's data can get wrong is a `SourceError` naming the file and the problem:
collected in `Scan.problems` by the scan, raised by `load_patient`.

Each layout is a `SourceLayout` (base.py) in its own module, registered by one line in `SOURCES`;
`LAYOUTS` (the one list of layout names) is derived from it. Layout-specific options (the Kaggle
channel order) are keywords that `load_patient` hands to the patient's layout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from shards_spec.errors import SourceError
from shards_spec.labels import CHANNELS

from . import kaggle, msd, nifti
from .base import (MAX_PATIENT_BYTES, PatientRef, PatientVolume, Scan, SourceLayout, channel_problem, relative_posix,
                   require_folder)
from . import discover as discovery
from .discover import MAX_DEPTH, MAX_FOLDERS, choose_layout
from .kaggle import KAGGLE_CHANNEL_ORDER, KAGGLE_ORDERS, check_kaggle_channel_order

SOURCES: dict[str, SourceLayout] = {
    "brats2020": nifti.BRATS2020,
    "brats2021": nifti.BRATS2021,
    "brats2023": nifti.BRATS2023,
    "kaggle-h5": kaggle.SOURCE,
    "msd": msd.SOURCE,
}
LAYOUTS: tuple[str, ...] = tuple(SOURCES)

__all__ = [
    "LAYOUTS",
    "SOURCES",
    "KAGGLE_CHANNEL_ORDER",
    "KAGGLE_ORDERS",
    "CHANNELS",
    "MAX_DEPTH",
    "MAX_PATIENT_BYTES",
    "MAX_FOLDERS",
    "PatientRef",
    "PatientVolume",
    "Scan",
    "SourceError",
    "SourceLayout",
    "detect_layout",
    "label_convention",
    "scan_source",
    "load_patient",
    "patient_from_folder",
    "patient_from_files",
    "source",
    "source_fingerprint",
    "check_kaggle_channel_order",
]


def source(layout: str) -> SourceLayout:
    """The registered layout `layout`; SourceError naming the layouts there are."""
    try:
        return SOURCES[layout]
    except KeyError:
        raise SourceError(f"unknown layout {layout!r}: expected one of {', '.join(SOURCES)}") from None


def detect_layout(root: Path | str) -> str:
    """The layout of the data under `root`; SourceError naming root if none or several."""
    root = require_folder(Path(root))
    found, problems = discovery.discover(root, SOURCES)
    return choose_layout(root, found, None, SOURCES, problems)


def scan_source(
    root: Path | str,
    layout: str | None = None,
    *,
    require_labels: bool = True,
    check_headers: bool = True,
    max_patient_bytes: int = MAX_PATIENT_BYTES,
) -> Scan:
    """Find and validate every patient under `root` (cheap: names, sizes and headers only).

    Patients with a problem are left out of `patients` and reported in `problems`, one
    SourceError per problem (also every entry under `root` the walk could not look at); the
    caller decides whether to stop. Folders without a
    segmentation are listed in `unlabelled` and left out, unless `require_labels=False`, which
    keeps them as patients without 'seg'. A malformed CSV or an unusable root is raised.
    """
    root = require_folder(Path(root))
    found, problems = discovery.discover(root, SOURCES)
    layout = choose_layout(root, found, layout, SOURCES, problems)
    scan = SOURCES[layout].scan(root, found[layout], require_labels=require_labels, check_headers=check_headers,
                                max_patient_bytes=max_patient_bytes)
    scan.problems[:0] = problems  # entries the walk could not look at: reported like bad patients
    return scan


def load_patient(
    ref: PatientRef,
    channels: Sequence[str] = CHANNELS,
    *,
    require_labels: bool = True,
    max_patient_bytes: int = MAX_PATIENT_BYTES,
    **options,
) -> PatientVolume:
    """Read and validate one patient (the per-patient task of the ETL, and `predict`'s reader).

    Returns the images in `channels` order, float32, background 0, as stored (no reorientation).
    Labels are loaded whenever the patient has a segmentation; `require_labels` makes a missing
    one an error. Bad data (non-finite values, labels outside the release's set, truncated
    files, disagreeing shapes, a declared size needing more than `max_patient_bytes`) raise
    SourceError naming the file. `options` are layout options
    (`kaggle_channel_order=`); each layout takes those it declares and ignores the others'.
    """
    problem = channel_problem(channels)
    if problem:
        raise SourceError(f"channels: {problem}")
    channels = list(channels)
    unknown = sorted(set(options) - {name for s in SOURCES.values() for name in s.options})
    if unknown:
        raise TypeError(f"load_patient: no layout takes the option(s) {unknown}")
    if ref.layout not in SOURCES:
        raise SourceError(f"patient {ref.id} has unknown layout {ref.layout!r}: expected one of {', '.join(LAYOUTS)}")
    layout = SOURCES[ref.layout]
    own = {name: value for name, value in options.items() if name in layout.options}
    return layout.load(ref, channels, require_labels=require_labels, max_patient_bytes=max_patient_bytes, **own)


def label_convention(ref: PatientRef):
    """How `ref`'s segmentation values map to shard labels (`shards_spec.labels.Convention`), for
    reading its labels and writing predictions back in them: its release's convention, or the
    values an MSD dataset.json names."""
    if ref.layout not in SOURCES:
        raise SourceError(f"patient {ref.id} has unknown layout {ref.layout!r}: expected one of {', '.join(LAYOUTS)}")
    return SOURCES[ref.layout].convention_of(ref)


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
