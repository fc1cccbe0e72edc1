"""`etl export-nnunet`: a source folder (any layout) -> an nnU-Net v2 raw dataset, our split as its folds.

    etl export-nnunet --src data/BraTS2021 --out nnUNet_raw/Dataset137_BraTS2021 --folds 5

It writes nnU-Net v2's raw dataset format as nnU-Net's own BraTS 2021 conversion
(`nnunetv2/dataset_conversion/Dataset137_BraTS21.py`) does:

    imagesTr/<case>_0000.nii.gz .. _0003   one 3D file per channel: 0 T1, 1 T1ce, 2 T2, 3 Flair
    labelsTr/<case>.nii.gz                 nnU-Net's BraTS labels (below)
    imagesTs/, labelsTs/                   held-out patients (a test share, or those a --split-file does
                                           not list) with their labels; patients without a
                                           segmentation (validation sets, MSD imagesTs) in imagesTs/
    dataset.json                           channel_names, labels as BraTS regions, regions_class_order
    splits_final.json                      our split as nnU-Net's folds (`etl.splits_file`); nnU-Net's
                                           planner (2.8) copies it to nnUNet_preprocessed/DatasetNNN_Name/

Labels: ours 0 background, 1 NEC/NET, 2 ED, 3 ET are written as nnU-Net's 0, 2, 1, 3 (its
conversion maps BraTS 1 necrosis -> 2, 2 edema -> 1, 4 enhancing -> 3: `NNUNET_BRATS_CONVENTION`),
and dataset.json declares the regions {"background": 0, "whole tumor": [1, 2, 3], "tumor core":
[2, 3], "enhancing tumor": [3]} with regions_class_order [1, 2, 3], so nnU-Net trains WT, TC and
ET as its BraTS models do.

Images are what the ETL's reader loads (`etl.sources.load_patient`, any layout): the stored voxel
values (an integer dtype kept when every value fits it, else float32; the Kaggle export's detected
background set to 0), the patient's affine as qform and sform, gzip with no time in it. So the same
input and options give the same bytes.

The recipe: scan (`etl.scan`, as build-shards: bad patients stop it unless --skip-bad) -> split
(`etl.split`: the assignment build-shards makes with the same options, or a --split-file) -> the
plan, kept in the out folder (`PLAN_NAME`) -> one task per case (`export_case`, in this process or
on Dask) -> splits_final.json, and dataset.json last. Every file is written under a temporary name
and renamed, and nnU-Net refuses a folder without dataset.json, so an interrupted export is never
taken for a whole one; the same command finishes it and keeps the cases already written.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards_spec.checked_io import open_regular
from shards_spec.errors import SourceError, ToolError
from shards_spec.fileio import TMP_SUFFIX, write_atomic
from shards_spec.labels import CHANNELS, NNUNET_BRATS_CONVENTION, decode_labels

from . import plan as planlib
from . import splits_file
from .options import check_folders, resolve_source_options
from .sources.base import MAX_PATIENT_BYTES, require_folder
from .split import SplitSpec, assign, over_patients, parse_split

CHANNEL_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "Flair"}
"""nnU-Net's names of our channels (Dataset137_BraTS21.py's); a channel's file index is its place in CHANNELS."""
REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
REGIONS_CLASS_ORDER = [1, 2, 3]
FILE_ENDING = ".nii.gz"
DATASET_NAME = re.compile(r"^Dataset([0-9]{3})_([A-Za-z0-9_-]+)$")
PLAN_NAME = ".brats-shards-export.json"
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = "imagesTr", "labelsTr", "imagesTs", "labelsTs"
GZIP_LEVEL = 1
"""gzip level of the NIfTI files: 1 is about 3x faster than 6 for files ~10% larger."""


class ExportError(ToolError):
    """An --out folder or option that export-nnunet cannot use."""


@dataclass(frozen=True)
class ExportOptions:
    """Everything `etl export-nnunet` takes; the split options are build-shards' own."""

    src: Path
    out: Path
    split: str | None = None
    folds: int | None = None
    split_file: Path | None = None
    seed: int = 0
    layout: str | None = None
    source_options: dict = field(default_factory=dict)
    skip_bad: bool = False
    workers: int | None = 0
    max_patient_bytes: int = MAX_PATIENT_BYTES

    def validate(self) -> SplitSpec:
        """Check the options up front (before anything is scanned or written); the split spec."""
        if not DATASET_NAME.match(self.out.name):
            raise ExportError("must be named DatasetNNN_Name, a three-digit id and a name (nnU-Net finds its "
                              "datasets so), e.g. nnUNet_raw/Dataset137_BraTS2021", self.out)
        if self.workers is not None and self.workers < 0:
            raise ExportError(f"--workers must be 0 (in this process) or more, got {self.workers}")
        resolve_source_options(self.source_options)
        check_folders(self.src, self.out)
        spec = parse_split(self.split, self.folds, self.seed, self.split_file)
        splits_file.training_splits(spec.names)  # no train and val, no fold: refused before the scan
        return spec


@dataclass(frozen=True)
class CaseTask:
    """One case to write (picklable: a Dask task)."""

    out: str
    ref: object  # etl.sources.PatientRef
    images: str  # TRAIN_IMAGES or TEST_IMAGES
    labels: str | None  # TRAIN_LABELS, TEST_LABELS, or None without a segmentation
    source_options: tuple
    max_patient_bytes: int


@dataclass
class ExportSummary:
    out: Path
    training: int  # cases in imagesTr
    held_out: int  # labelled cases in imagesTs
    unlabelled: int  # cases without a segmentation, in imagesTs
    folds: int
    written: int
    kept: int
    skipped: list[str]
    seconds: float


def export_nnunet(opts: ExportOptions, reporter=None) -> ExportSummary:
    """Run `etl export-nnunet` (see the module docstring for the recipe)."""
    from shards_spec.lock import FolderLock

    from .build import Reporter
    from .scan import scan_patients

    reporter = reporter or Reporter()
    spec = opts.validate()
    src = require_folder(opts.src).resolve()
    started = time.time()
    planlib.refuse_file(opts.out)
    with planlib.locked(FolderLock(opts.out, "etl export-nnunet"), reporter.log, "an export"):
        _refuse_foreign(opts.out)  # cheap, before the scan
        found = scan_patients(src, opts.layout, opts.skip_bad, reporter.log, opts.max_patient_bytes)
        unlabelled, every = _unlabelled(src, found, opts.max_patient_bytes)
        plan, split_of, names = make_plan(opts, spec, found, unlabelled, every)
        fresh = not (opts.out / PLAN_NAME).exists()
        try:
            tasks = _prepare_out(opts.out, plan, {**found.refs, **unlabelled}, opts)
            kept = len(_cases(plan)) - len(tasks)
            failed = _run(tasks, opts, reporter, kept)
            exported = {pid: split for pid, split in split_of.items() if pid not in failed}
            folds = splits_file.nnunet_folds(exported, names)
            write_atomic(opts.out / splits_file.NAME, splits_file.encode(folds))
            training = [pid for pid in plan["cases"][TRAIN_IMAGES] if pid not in failed]
            write_atomic(opts.out / "dataset.json", dataset_json(opts.out.name, plan, len(training)))
        except SourceError:
            if fresh:  # a data problem: a new folder is left as it was (an interrupted run keeps its cases)
                _remove_own(opts.out)
            raise
        except OSError as exc:
            raise ExportError(f"cannot be written ({exc.strerror or exc}); the cases written are kept, the same "
                              "command finishes the export", exc.filename or opts.out) from None
    held_out = [p for p in plan["cases"][TEST_LABELS] if p not in failed]
    without_labels = [p for p in unlabelled if p not in failed]
    return ExportSummary(opts.out, len(training), len(held_out), len(without_labels), len(folds), len(tasks) - len(failed),
                         kept, [f"{pid}: {problem}" for pid, problem in failed.items()], time.time() - started)


# ---------------------------------------------------------------------------------------------
# the steps


def _unlabelled(src: Path, found, max_patient_bytes: int) -> tuple[dict, object]:
    """(the patients the scan left out for want of a segmentation (validation sets, MSD imagesTs),
    the scan whose files they are in) from a scan that keeps them; ({}, the scan) when there are none."""
    from .sources import scan_source

    if not found.scan.unlabelled:
        return {}, found.scan
    again = scan_source(src, found.scan.layout, require_labels=False, max_patient_bytes=max_patient_bytes)
    skipped = {s["patient"] for s in found.skipped}
    return {ref.id: ref for ref in again.patients if ref.id not in found.refs and ref.id not in skipped}, again


def make_plan(opts: ExportOptions, spec: SplitSpec, found, unlabelled: dict, every) \
        -> tuple[dict, dict[str, str], list[str]]:
    """(the plan, labelled patient -> split, split names): which case goes where, and from what.

    The split is build-shards' (same options, same patients: the same assignment); the splits
    nnU-Net trains and validates on go to imagesTr, the others (held out) to imagesTs with labels,
    and patients without a segmentation to imagesTs. `every` is the scan that saw all their files
    (the plan's source fingerprint)."""
    from .sources import source, source_fingerprint

    labelled = found.refs
    spec = over_patients(spec, set(labelled) | {s["patient"] for s in found.skipped}, set(labelled))
    assignment = assign({pid: ref.grade for pid, ref in labelled.items()}, spec)
    used = splits_file.training_splits(spec.names)
    layout = found.scan.layout
    train = sorted(p for p, s in assignment.split_of.items() if s in used)
    held_out = sorted(p for p, s in assignment.split_of.items() if s not in used)
    plan = {
        "tool": "etl export-nnunet",
        "plan_version": 1,
        "layout": layout,
        "source_options": source(layout).recorded_options(resolve_source_options(opts.source_options, layout)),
        "source_fingerprint": source_fingerprint(every),
        "split": spec.describe(assignment.stratify),
        "splits": {name: assignment.patients_of(name) for name in spec.names},
        "cases": {TRAIN_IMAGES: train, TEST_IMAGES: sorted(held_out + list(unlabelled)), TEST_LABELS: held_out},
        "skipped": found.skipped,
    }
    return plan, assignment.split_of, spec.names


def _cases(plan: dict) -> list[str]:
    return plan["cases"][TRAIN_IMAGES] + plan["cases"][TEST_IMAGES]


def _refuse_foreign(out: Path) -> None:
    """An --out holding anything but a previous export of ours is refused: nothing of yours is touched."""
    entries = [e.name for e in planlib.entries(out)] if out.is_dir() else []
    if entries and not (out / PLAN_NAME).is_file():
        shown = ", ".join(sorted(entries)[:4])
        raise ExportError(f"is not empty ({shown}) and was not written by etl export-nnunet; choose a new or empty "
                          "folder", out)


def _prepare_out(out: Path, plan: dict, refs: dict, opts: ExportOptions) -> list[CaseTask]:
    """Write the plan into a new folder, or check it against a previous export's (the same command
    finishes an interrupted export); the tasks of the cases not yet written."""
    encoded = (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode()
    marker = out / PLAN_NAME
    if marker.is_file():
        if not _holds(marker, encoded):
            raise ExportError(f"holds an nnU-Net export of other data or with other options (its {PLAN_NAME} "
                              "differs); choose another --out, or delete that folder first", out)
        _remove_partials(out)
    else:
        write_atomic(marker, encoded)
    options = tuple(sorted(resolve_source_options(opts.source_options, plan["layout"]).items()))
    tasks = []
    for pid in _cases(plan):
        training = pid in plan["cases"][TRAIN_IMAGES]
        labels = TRAIN_LABELS if training else TEST_LABELS if pid in plan["cases"][TEST_LABELS] else None
        task = CaseTask(str(out), refs[pid], TRAIN_IMAGES if training else TEST_IMAGES, labels, options,
                        opts.max_patient_bytes)
        if not all(p.is_file() for p in case_files(task)):
            tasks.append(task)
    for folder in (TRAIN_IMAGES, TRAIN_LABELS):
        (out / folder).mkdir(exist_ok=True)  # nnU-Net expects both, even if a --skip-bad left them empty
    return tasks


def _holds(path: Path, expected: bytes) -> bool:
    """Whether `path` holds exactly `expected`, read no further than one byte past it (the marker
    of a folder someone handed over may be huge, or swapped for a FIFO)."""
    try:
        with open_regular(path) as handle:
            return handle.read(len(expected) + 1) == expected
    except (OSError, ToolError):
        return False


def _remove_own(out: Path) -> None:
    """Remove what an export writes (its folders, files and plan); nothing else is there (`_refuse_foreign`)."""
    import shutil

    for name in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("dataset.json", splits_file.NAME, PLAN_NAME):
        (out / name).unlink(missing_ok=True)


def _remove_partials(out: Path) -> None:
    for folder in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
        for path in (out / folder).glob(f".*{TMP_SUFFIX}*"):
            path.unlink(missing_ok=True)


def _run(tasks: list[CaseTask], opts: ExportOptions, reporter, kept: int) -> dict[str, str]:
    """Run the case tasks; {case: problem} of those that failed (with --skip-bad; else the first is raised)."""
    from .runner import Runner

    failed: dict[str, str] = {}
    reporter.start(len(tasks) + kept, kept)
    try:
        with Runner(opts.workers, None, reporter.log) as runner:
            for result in runner.run(tasks, export_case):
                if result["failed"]:
                    problem = result["failed"]
                    if not opts.skip_bad:
                        runner.stop()
                        raise SourceError(problem["problem"], problem.get("path") or result["case"])
                    failed[result["case"]] = f"{problem.get('path') or ''}: {problem['problem']}"
                reporter.advance(result)
    finally:
        reporter.finish()
    return failed


def dataset_json(name: str, plan: dict, training: int) -> bytes:
    """nnU-Net v2's dataset.json, keys in the order its `generate_dataset_json` writes them."""
    description = {
        "channel_names": {str(k): CHANNEL_NAMES[c] for k, c in enumerate(CHANNELS)},
        "labels": REGIONS,
        "numTraining": training,
        "file_ending": FILE_ENDING,
        "licence": "the source dataset's terms of use apply (BraTS / MSD)",
        "converted_by": "brats-shards etl export-nnunet",
        "name": DATASET_NAME.match(name).group(2),
        "description": f"{plan['layout']} source; labels 1 edema, 2 necrosis and non-enhancing tumour, 3 enhancing "
                       "tumour (nnU-Net's BraTS conversion); splits_final.json holds the folds",
        "regions_class_order": REGIONS_CLASS_ORDER,
        "brats_shards": {"layout": plan["layout"], "split": plan["split"],
                         "source_fingerprint": plan["source_fingerprint"]},
    }
    return (json.dumps(description, indent=4) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# one case (runs on Dask workers)


def case_files(task: CaseTask) -> list[Path]:
    """The files of one case: its channels, then its labels."""
    out, pid = Path(task.out), task.ref.id
    files = [out / task.images / f"{pid}_{k:04d}{FILE_ENDING}" for k in range(len(CHANNELS))]
    return files + ([out / task.labels / f"{pid}{FILE_ENDING}"] if task.labels else [])


def export_case(task: CaseTask) -> dict:
    """Load one patient (any layout) and write its channel files and labels; a data problem is
    returned as `failed`, not raised (the orchestrator decides)."""
    from .sources import load_patient

    ref = task.ref
    try:
        volume = load_patient(ref, channels=CHANNELS, require_labels=task.labels is not None,
                              max_patient_bytes=task.max_patient_bytes, **dict(task.source_options))
    except SourceError as exc:
        return {"case": ref.id, "failed": {"problem": exc.problem, "path": exc.path}}
    files = case_files(task)
    dtype = storage_dtype(volume.volume, volume.source_dtype)
    for k, path in enumerate(files[: len(CHANNELS)]):
        write_atomic(path, nifti_gz(volume.volume[k], volume.affine, dtype))
    if task.labels:
        labels = decode_labels(volume.labels, NNUNET_BRATS_CONVENTION)
        write_atomic(files[-1], nifti_gz(labels, volume.affine, np.uint8))
    return {"case": ref.id, "failed": None}


def storage_dtype(volume: np.ndarray, source_dtype: str) -> np.dtype:
    """The source's integer dtype when every loaded value fits it exactly, else float32."""
    names = source_dtype.split(",")
    try:
        dtype = np.dtype(names[0]) if len(names) == 1 else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "iu":
        return np.dtype(np.float32)
    exact = all(np.array_equal(channel.astype(dtype), channel) for channel in volume)
    return dtype if exact else np.dtype(np.float32)


def nifti_gz(data: np.ndarray, affine: np.ndarray, dtype) -> bytes:
    """A .nii.gz of `data` as `dtype` (no scaling), `affine` as qform and sform, gzip without a time."""
    import nibabel as nib

    dtype = np.dtype(dtype)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype, copy=False), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)


__all__ = ["CHANNEL_NAMES", "ExportError", "ExportOptions", "ExportSummary", "REGIONS", "REGIONS_CLASS_ORDER",
           "export_case", "export_nnunet", "make_plan"]
