"""`train predict`: a checkpoint applied to a new patient, NIfTI in -> NIfTI segmentation out.

    train predict --checkpoint runs/v1/checkpoints/best.pt --input BraTS20_Training_001/ --out 001_seg.nii.gz
    train predict --checkpoint best.pt --input t1ce=a_t1ce.nii.gz --input flair=a_flair.nii.gz --out a_seg.nii.gz
    train predict --checkpoint best.pt --input MICCAI_BraTS2020_ValidationData/ --out predictions/

`--input` takes one of three forms:

- a patient folder of any NIfTI layout (BraTS 2020/2021 `<id>_<mod>.nii[.gz]`, 2023
  `<id>-<mod>.nii.gz`); `--out` is the segmentation file (or a folder: `<out>/<id>.nii.gz`);
- modality files, one `--input NAME=PATH` each (NAME: t1, t1ce, t2, flair or the 2023 t1n, t1c,
  t2w, t2f; a bare PATH whose name ends in `_<mod>.nii[.gz]` / `-<mod>.nii.gz` names itself);
  only the checkpoint's channels are needed; the brain mask is "any given modality non-zero";
- a folder holding patient folders (a release, e.g. the BraTS validation data); `--out` is a
  folder, one `<out>/<id>.nii.gz` per patient (the BraTS submission naming), with a progress bar;
  a patient that fails is reported and the others are still written (exit code 2 at the end).

Each patient: read as the ETL reads it (`etl.sources.load_patient`, no reorientation), then
`train.apply.inference.predict_volume` (the shards' preprocessing from the checkpoint, every slice,
probabilities resized back, labels by the checkpoint's target, zero outside the brain). The
output is uint8 with the first modality file's shape, affine, qform/sform and header geometry,
`scl_slope`/`scl_inter` reset to 1/0 (labels stored as they are), and labels in the input's
convention: 0/1/2/4 for BraTS 2020/2021 layouts (and for files named otherwise), 0/1/2/3 for
2023 (the 2023 layout or the 2023 modality names given as NAME).

`--checkpoint` may also be the `model.onnx` that `train export` writes: the network then runs
under onnxruntime (the optional extra `[export]`), without building the torch model, with the
channels, target and preprocessing stored in the ONNX file's metadata (or in `model.json`
beside it); the segmentation is the checkpoint's, up to float rounding near the 0.5 threshold.
Such a file may come from anyone, so it is first checked against that config and the limits
(`train.runfiles.onnx_check`, for `--batch-size` slices per call, the batch onnxruntime then always gets).

`--probabilities` also writes `<out>_probabilities.nii.gz` beside each segmentation: float32,
4D (H, W, D, 3), volumes p(NEC/NET), p(ED), p(ET) for a `classes` checkpoint or p(WT), p(TC),
p(ET) for a `regions` one (named in the header's `descrip`), 0 outside the brain.

Files are written under a temporary name in the output folder and renamed into place, so an
interrupted run leaves no half-written segmentation.

The checkpoint is loaded once into a `Predictor` (also `train.api.Predictor`, for notebooks),
which then reads and predicts every patient; it takes arrays (C, H, W, D) too and returns label
maps instead of writing files.

Outputs never cost the user a file: before anything is loaded, an output that is one of the
inputs (a modality, the seg, a checkpoint) once symbolic links, `..` and letter case are
resolved (compared as the same file on disk, so also a hard link, or another spelling on a
case-insensitive file system) is refused, and so is an output that exists already unless
`--overwrite` is given; with a folder of patients `--overwrite` replaces each patient's file
(and `_probabilities` file) and nothing else in the folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from shards_spec.errors import ToolError
from shards_spec.labels import CHANNELS, Convention, decode_labels
from shards_spec.preprocess import brain_mask

from ..config.options import check_option
from ..runfiles import rundir
from . import inference

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


@dataclass
class Written:
    patient: str
    segmentation: Path
    probabilities: Path | None
    labels: dict[int, int]  # source label value -> voxels
    warnings: list[str]


def main(checkpoint: Path | Sequence[Path], inputs: Sequence[Path | str], out: Path, device: str = "auto",
         batch_size: int = 32, probabilities: bool = False, console: Any = None, tta: bool = False,
         min_et_voxels: int = 0, overwrite: bool = False) -> list[Written]:
    """Predict every patient `inputs` names (see the module docstring) and write the NIfTI files;
    several checkpoints are an ensemble (their probabilities averaged). The inputs and outputs
    are checked before any checkpoint is loaded (`check_outputs`)."""
    from rich.console import Console

    console = console or Console(stderr=True, soft_wrap=True)
    check_options(batch_size, min_et_voxels, device)
    paths = [resolve_checkpoint(p) for p in inference.checkpoint_paths(checkpoint)]
    jobs, batch, skipped = plan_jobs(inputs, Path(out))
    check_outputs(jobs, inputs, paths, probabilities, overwrite, Path(out))
    predictor = Predictor(paths, device=device, batch_size=batch_size, tta=tta, min_et_voxels=min_et_voxels)
    loaded = predictor.loaded
    for line in loaded.warnings:
        console.print(f"warning: {line}")
    for problem in skipped:
        console.print(f"warning: skipped: {problem}")
    console.print(f"{loaded.path}: {loaded.config.get('model', '?')} epoch {loaded.epoch}, channels "
                  f"{','.join(loaded.channels)}, target {loaded.target}, grid {loaded.size}x{loaded.size}, "
                  f"norm {loaded.norm}, device {loaded.device}, {len(loaded.members)} model(s), "
                  f"{loaded.options.describe()}; {len(jobs)} patient(s)")
    if not batch:
        written = [predict_patient(predictor, jobs[0], probabilities, console, overwrite)]
    else:
        written, failures = _predict_many(predictor, jobs, probabilities, console, overwrite)
        if failures:
            for failure in failures:
                console.print(f"failed: {failure}")
            raise PredictError(f"{len(failures)} of {len(jobs)} patient(s) failed (listed above); "
                               f"{len(written)} written", out)
    for item in written:
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(item.labels.items()) if k)
        console.print(f"{item.patient} -> {item.segmentation} (tumour voxels {shown or 'none'})"
                      + (f" + {item.probabilities.name}" if item.probabilities else ""))
    return written


# ---------------------------------------------------------------- inputs


def plan_jobs(inputs: Sequence[Path | str], out: Path) -> tuple[list[Job], bool, list[str]]:
    """The patients to predict and their output paths; whether `inputs` is a folder of patients;
    the patients a scan of such a folder left out, one line each."""
    from etl.sources import label_convention, scan_source

    items = [str(i) for i in inputs]
    if not items:
        raise PredictError("--input: give a patient folder, a folder of patients, or the modality files")
    folder = Path(items[0])
    if len(items) == 1 and "=" not in items[0] and folder.is_dir() and not _holds_nifti(folder):
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


def _outputs(job: Job, probabilities: bool) -> list[Path]:
    return [job.out, *([_probabilities_path(job.out)] if probabilities else [])]


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of the file `path` reaches (links followed, `..` and case as the file
    system resolves them); None when nothing is there."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


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


def _holds_nifti(folder: Path) -> bool:
    try:
        return any(p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES) for p in folder.iterdir())
    except OSError as exc:
        raise PredictError(f"cannot be listed ({exc.strerror or exc})", folder) from None


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


def _single_out(out: Path, patient: str) -> Path:
    if out.is_dir():
        return out / f"{patient}.nii.gz"
    if not out.name.lower().endswith(NIFTI_SUFFIXES):
        raise PredictError("--out must end in .nii.gz or .nii (or be an existing folder)", out)
    return out


# ---------------------------------------------------------------- one patient


class Predictor:
    """A checkpoint loaded once and applied to many patients, like nnU-Net's `nnUNetPredictor`;
    `train predict` runs each of its patients through one.

        predictor = Predictor("runs/v2", device="cpu")             # the run's best.pt
        seg = predictor.predict("BraTS20_Training_001/")           # uint8 (H, W, D), labels 0/1/2/4
        segs = predictor.predict([volume_a, volume_b])             # arrays (4, H, W, D) -> a list

    `checkpoint`: a checkpoint file, a run folder (its checkpoints/best.pt), a `model.onnx` from
    `train export`, or a list of them (an ensemble: their probabilities averaged). Loading checks
    the checkpoint and builds the model once; `predict` then reads, preprocesses and predicts
    each patient exactly as `train predict` does, returning its label map on the input's grid.
    """

    def __init__(self, checkpoint: str | Path | Sequence[str | Path], *, device: str = "auto",
                 batch_size: int = 32, tta: bool = False, min_et_voxels: int = 0) -> None:
        check_options(batch_size, min_et_voxels, device)
        paths = [resolve_checkpoint(p) for p in inference.checkpoint_paths(checkpoint)]
        options = inference.InferenceOptions(tta=tta, min_et_voxels=min_et_voxels)
        self.batch_size = batch_size
        self.loaded = inference.load_ensemble(paths, device, onnx=True, options=options, batch_size=batch_size)

    @property
    def channels(self) -> list[str]:
        """The modalities the model reads, in its order."""
        return list(self.loaded.channels)

    def predict(self, patients: Any, *, channels: Sequence[str] = CHANNELS,
                labels: Convention | None = None) -> Any:
        """The uint8 label map (H, W, D) of a patient, or a list of them for a list of patients.

        A patient is a patient folder, its modality files as {"t1ce": path, "flair": path, ...},
        or an array (C, H, W, D) of the modalities `channels` (default t1, t1ce, t2, flair) as
        stored, skull-stripped, background 0 (the brain is "any modality non-zero", as for files).
        Labels are in the input's convention (BraTS 2020/2021: 0/1/2/4; 2023: 0/1/2/3) and 0/1/2/4
        for arrays, or in `labels` ("brats2020", "brats2023", "msd" or a {source value: label} map).
        """
        if isinstance(patients, list):
            return [self._label_map(p, channels, labels) for p in patients]
        return self._label_map(patients, channels, labels)

    def _label_map(self, patient: Any, channels: Sequence[str], labels: Convention | None) -> np.ndarray:
        if isinstance(patient, (str, os.PathLike, Mapping)):
            items = [f"{k}={v}" for k, v in patient.items()] if isinstance(patient, Mapping) else [str(patient)]
            if not isinstance(patient, Mapping) and Path(patient).is_dir() and not _holds_nifti(Path(patient)):
                raise PredictError("holds no NIfTI image: give one patient's folder (a list of them for several)",
                                   patient)
            ref, convention = patient_of(items)
            volume = self._read(ref)
            prediction = self._segment(volume.volume, volume.brain)
        else:
            convention = "brats2020"
            prediction = self._segment(*self._from_array(patient, channels))
        return decode_labels(prediction.labels, labels if labels is not None else convention)

    def _read(self, ref: Any) -> Any:
        """One patient's volumes as the ETL reads them (`etl.sources.load_patient`)."""
        from etl.sources import load_patient

        ref.files.pop("seg", None)
        inference.check_input_channels(self.loaded, [c for c in CHANNELS if c in ref.files], ref.meta.get("folder"))
        return load_patient(ref, channels=self.loaded.channels, require_labels=False)

    def _from_array(self, array: Any, channels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(volume in the model's channels, brain mask) of an array patient, checked like a file's."""
        names = [str(c) for c in channels]
        data = np.asarray(array)
        if data.ndim != 4 or data.shape[0] != len(names):
            raise PredictError(f"an array patient must be (C, H, W, D) with C = {len(names)} channels "
                               f"({','.join(names)}), got shape {data.shape}")
        if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
            raise PredictError(f"an array patient must hold integers or floats, got {data.dtype}")
        inference.check_input_channels(self.loaded, names)
        # Each channel Fortran-ordered in float32, as the NIfTI reader loads files: the same sums, the same labels.
        stack = np.empty((data.shape[0], *data.shape[:0:-1]), dtype=np.float32).transpose(0, 3, 2, 1)
        np.copyto(stack, data, casting="unsafe")
        bad = int(np.count_nonzero(~np.isfinite(stack)))
        if bad:
            raise PredictError(f"the array patient holds {bad} non-finite value(s) (NaN or inf, or beyond float32)")
        return stack[[names.index(c) for c in self.loaded.channels]], brain_mask(stack)

    def _segment(self, volume: np.ndarray, brain: np.ndarray, probabilities: bool = False) -> Any:
        return inference.predict_volume(self.loaded, volume, brain, batch_size=self.batch_size,
                                        probabilities=probabilities)


def check_options(batch_size: int, min_et_voxels: int, device: str = "auto") -> None:
    """The option values, before anything is read: those `train run` shares checked as it checks them."""
    check_option("device", device)
    check_option("batch_size", batch_size)
    if min_et_voxels < 0:
        raise PredictError(f"--min-et-voxels: must be >= 0, got {min_et_voxels}")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint path as given, or for a run folder its best checkpoint (checkpoints/best.pt)."""

    path = Path(path)
    if not path.is_dir():
        return path
    best = rundir.checkpoint_path(path, rundir.BEST)
    if not best.is_file():
        raise PredictError(f"is a folder without {best.relative_to(path)}; give a checkpoint file or the folder "
                           "of a run that has validated once", path)
    return best


def predict_patient(predictor: Predictor, job: Job, probabilities: bool, console: Any,
                    overwrite: bool = False) -> Written:
    """Load, predict and write one patient (replacing an existing output only with `overwrite`)."""
    loaded = predictor.loaded
    ref = job.ref
    volume = predictor._read(ref)
    warnings = list(volume.warnings)
    for line in warnings:
        console.print(f"warning: {ref.id}: {line} (predicted anyway)")
    prediction = predictor._segment(volume.volume, volume.brain, probabilities)
    del volume
    labels = decode_labels(prediction.labels, job.convention)
    reference = ref.files[loaded.channels[0]]
    seg_path = job.out
    prob_path = _probabilities_path(seg_path) if probabilities else None
    outputs = [(seg_path, _label_image(labels, reference, loaded))]
    if prob_path is not None:
        outputs.append((prob_path, _probability_image(prediction.probabilities, reference, prediction.channel_names)))
    write_atomic(outputs, overwrite=overwrite)
    values, counts = np.unique(labels, return_counts=True)
    return Written(ref.id, seg_path, prob_path, {int(v): int(c) for v, c in zip(values, counts)}, warnings)


def _predict_many(predictor: Predictor, jobs: list[Job], probabilities: bool, console: Any,
                  overwrite: bool) -> tuple[list[Written], list[str]]:
    from shards_spec.progress import Progress

    written, failures = [], []
    bar = Progress(console, "predict", len(jobs), transient=False)
    with bar as advance:
        for job in jobs:
            bar.describe(f"predict {job.ref.id}")
            try:
                written.append(predict_patient(predictor, job, probabilities, console, overwrite))
            except ToolError as exc:
                failures.append(str(exc))
            advance()
    return written, failures


def _probabilities_path(seg_path: Path) -> Path:
    name = seg_path.name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
    return seg_path.with_name(f"{stem}_probabilities.nii.gz")


# ---------------------------------------------------------------- NIfTI output


def _reference_header(reference: str) -> Any:
    import nibabel as nib

    return nib.load(reference)


def _label_image(labels: np.ndarray, reference: str, loaded: inference.LoadedModel) -> Any:
    """uint8 label image with the reference's affine, qform/sform and header geometry."""
    ref = _reference_header(reference)
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    img = type(ref)(np.asarray(labels, dtype=np.uint8), ref.affine, header)
    img.header.set_slope_inter(1.0, 0.0)  # labels are stored as they are, never rescaled
    img.header["cal_min"], img.header["cal_max"] = 0, int(labels.max()) if labels.size else 0
    img.header["descrip"] = f"brats-shards prediction ({loaded.target}, epoch {loaded.epoch})"[:79].encode()
    _copy_codes(ref, img)
    return img


def _probability_image(probs: np.ndarray, reference: str, names: Sequence[str]) -> Any:
    """float32 4D (H, W, D, 3) probabilities with the reference's geometry."""
    ref = _reference_header(reference)
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    data = np.ascontiguousarray(np.moveaxis(np.asarray(probs, dtype=np.float32), 0, -1))
    img = type(ref)(data, ref.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, 1.0
    img.header["descrip"] = ("p(" + "),p(".join(names) + ")")[:79].encode()
    zooms = tuple(ref.header.get_zooms()[:3]) + (1.0,)
    img.header.set_zooms(zooms)
    _copy_codes(ref, img)
    return img


def _copy_codes(ref: Any, img: Any) -> None:
    """Keep the reference's qform and sform with their codes (nibabel resets codes of a new image)."""
    qform, qcode = ref.header.get_qform(coded=True)
    sform, scode = ref.header.get_sform(coded=True)
    if qform is not None:
        img.header.set_qform(qform, int(qcode))
    else:
        img.header.set_qform(ref.affine, 0)
    if sform is not None:
        img.header.set_sform(sform, int(scode))
    else:
        img.header.set_sform(ref.affine, 0)


def write_atomic(outputs: list[tuple[Path, Any]], overwrite: bool = False) -> None:
    """Write every image under a temporary name in its folder (`shards_spec.fileio.atomic_path`),
    then rename them all into place; an output that exists by then is replaced only with
    `overwrite` (checked again here: another process may have written it since the start)."""
    import contextlib

    import nibabel as nib

    from shards_spec.fileio import atomic_path

    try:
        with contextlib.ExitStack() as stack:
            for path, img in outputs:
                suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
                nib.save(img, str(stack.enter_context(atomic_path(path, suffix=suffix))))
            taken = [path for path, _ in outputs if os.path.lexists(path)]
            if taken and not overwrite:
                raise PredictError("was written by someone else while predicting; pass --overwrite to replace it",
                                   taken[0])
    except OSError as exc:
        raise PredictError(f"cannot write the output ({exc.strerror or exc})", exc.filename or outputs[0][0]) from None


__all__ = ["Job", "PredictError", "Predictor", "Written", "main", "patient_of", "plan_jobs", "predict_patient",
           "resolve_checkpoint", "write_atomic"]
