"""`train predict`'s jobs: the patients `--input` names (a patient folder, its modality files or a
folder of patients), where each one's segmentation (and `_probabilities` file) goes, and the check,
before anything is loaded, that no output is an input or, without `--overwrite`, exists already.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards_spec.errors import ToolError
from shards_spec.labels import CHANNELS, Convention

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MODALITY_2023 = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
_BARE_TAIL = re.compile(r"[_-](t1ce|t1|t2|flair|t1n|t1c|t2w|t2f|seg)\.nii(\.gz)?$", re.IGNORECASE)


class PredictError(ToolError):
    """Bad `--input` / `--out` combination or an input that cannot be predicted."""


@dataclass
class Job:
    """One patient to predict: its reference, where the segmentation goes, its label convention."""

    ref: Any  # etl.sources.PatientRef
    out: Path
    convention: Convention  # etl.sources.label_convention: a release's, or the values an MSD dataset.json names


def plan_jobs(inputs: Sequence[Path | str], out: Path) -> tuple[list[Job], bool, list[str]]:
    """The patients to predict and their output paths; whether `inputs` is a folder of patients;
    the patients a scan of such a folder left out, one line each."""
    from etl.sources import label_convention, scan_source

    items = [str(i) for i in inputs]
    if not items:
        raise PredictError("--input: give a patient folder, a folder of patients, or the modality files")
    folder = Path(items[0])
    if len(items) == 1 and "=" not in items[0] and folder.is_dir() and not holds_nifti(folder):
        scan = scan_source(folder, require_labels=False)
        if scan.layout not in ("brats2020", "brats2021", "brats2023", "msd"):
            raise PredictError(f"holds {scan.layout} data; predict reads NIfTI patients", folder)
        skipped = [str(problem) for problem in scan.problems]
        if not scan.patients:
            first = f" ({skipped[0]})" if skipped else ""
            raise PredictError(f"holds no patient that can be read{first}", folder)
        if out.suffix in (".nii", ".gz"):
            raise PredictError("--input is a folder of patients, so --out must be a folder, not a NIfTI file", out)
        jobs = [Job(ref, out / f"{ref.id}.nii.gz", label_convention(ref)) for ref in scan.patients]
        return jobs, True, skipped
    ref, convention = patient_of(items)
    return [Job(ref, _single_out(out, ref.id), convention)], False, []


def patient_of(items: Sequence[str]) -> tuple[Any, Convention]:
    """One patient and its label convention: its folder alone, or its modality files (`NAME=PATH`,
    or paths whose names end in their modality)."""
    from etl.sources import label_convention, patient_from_files, patient_from_folder

    if len(items) == 1 and "=" not in items[0] and Path(items[0]).is_dir():
        ref = patient_from_folder(items[0])
        return ref, label_convention(ref)
    files: dict[str, str] = {}
    for item in items:
        key, path = _modality_item(item)
        if key in files:
            raise PredictError(f"--input: {key} is given twice ({files[key]} and {path})")
        files[key] = path
    files.pop("seg", None)  # predict never needs the segmentation
    ref = patient_from_files(files)
    convention = label_convention(ref)
    if files and all(k.lower() in MODALITY_2023 for k in files):
        convention = "brats2023"
    return ref, convention


def _single_out(out: Path, patient: str) -> Path:
    if out.is_dir():
        return out / f"{patient}.nii.gz"
    if not out.name.lower().endswith(NIFTI_SUFFIXES):
        raise PredictError("--out must end in .nii.gz or .nii (or be an existing folder)", out)
    return out


def _modality_item(item: str) -> tuple[str, str]:
    """`NAME=PATH`, or a bare PATH whose file name ends in the modality."""
    if "=" in item and not Path(item).exists():
        key, path = item.split("=", 1)
        key = key.strip().lower()
        if key not in (*CHANNELS, *MODALITY_2023, "seg"):
            raise PredictError(f"--input {item}: unknown modality {key!r}; use NAME=PATH with NAME one of "
                               f"{', '.join((*CHANNELS, *MODALITY_2023))}")
        _must_exist(Path(path))
        return key, path
    path = Path(item)
    _must_exist(path)
    if path.is_dir():
        raise PredictError("--input: a folder must be given alone (a patient folder or a folder of patients)", path)
    match = _BARE_TAIL.search(path.name)
    if match is None:
        raise PredictError("--input: cannot tell the modality from the file name; give it as NAME=PATH "
                           "(e.g. --input t1ce=PATH)", path)
    return match.group(1).lower(), str(path)


def _must_exist(path: Path) -> None:
    """An input path that is not there is said so (not read as a file name to guess from)."""
    if os.path.lexists(path) and not path.exists():
        raise PredictError(f"--input: is a link to {os.readlink(path)}, which does not exist", path)
    if not path.exists():
        raise PredictError("--input: does not exist", path)


def holds_nifti(folder: Path) -> bool:
    """Whether `folder` holds NIfTI files itself (one patient's folder), not patient folders."""
    try:
        return any(p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES) for p in folder.iterdir())
    except OSError as exc:
        raise PredictError(f"cannot be listed ({exc.strerror or exc})", folder) from None


def check_outputs(jobs: list[Job], inputs: Sequence[Path | str], checkpoints: Sequence[Path], probabilities: bool,
                  overwrite: bool, out: Path) -> None:
    """Refuse an output that is an input (always) or that exists already (unless `overwrite`),
    in one line, before anything is loaded."""
    protected: dict[tuple[int, int], str] = {}
    given = [str(i).split("=", 1)[1] if "=" in str(i) and not Path(str(i)).exists() else str(i) for i in inputs]
    for path in [*given, *map(str, checkpoints), *(f for job in jobs for f in job.ref.files.values())]:
        identity = _identity(path)
        if identity is not None and Path(path).is_file():
            protected.setdefault(identity, str(path))
    existing = []
    for job in jobs:
        for path in _outputs(job, probabilities):
            identity = _identity(path)
            if identity in protected:
                raise PredictError(f"is the input {protected[identity]}: predict never writes over its inputs; "
                                   "give another --out", path)
            if os.path.isdir(path):
                raise PredictError("is a folder; the segmentation is written as a file of that name", path)
            if os.path.lexists(path) and not overwrite:
                existing.append(path)
    if len(existing) == 1:
        raise PredictError("exists already; pass --overwrite to replace it", existing[0])
    if existing:
        shown = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise PredictError(f"holds {len(existing)} of the outputs already ({shown}); pass --overwrite to replace "
                           "those files (nothing else in the folder is touched)", out)


def _outputs(job: Job, probabilities: bool) -> list[Path]:
    return [job.out, *([probabilities_path(job.out)] if probabilities else [])]


def probabilities_path(seg_path: Path) -> Path:
    """Where `--probabilities` writes beside a segmentation: `<its stem>_probabilities.nii.gz`."""
    name = seg_path.name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
    return seg_path.with_name(f"{stem}_probabilities.nii.gz")


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of the file `path` reaches (links followed, `..` and case as the file
    system resolves them); None when nothing is there."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


__all__ = [
    "MODALITY_2023",
    "NIFTI_SUFFIXES",
    "Job",
    "PredictError",
    "check_outputs",
    "holds_nifti",
    "patient_of",
    "plan_jobs",
    "probabilities_path",
]
