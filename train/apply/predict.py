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

The inputs and outputs are planned and checked in `train.apply.predict_jobs`, the NIfTI files
made and written in `train.apply.predict_nifti`; this module loads the checkpoint (`Predictor`)
and runs each patient through it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards_spec.errors import ToolError
from shards_spec.labels import CHANNELS, Convention, decode_labels
from shards_spec.preprocess import brain_mask

from ..config.options import check_option
from ..runfiles import rundir
from . import inference
from .predict_jobs import (
    Job,
    PredictError,
    check_outputs,
    holds_nifti,
    patient_of,
    plan_jobs,
    probabilities_path,
)
from .predict_nifti import label_image, probability_image, write_atomic


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
            if not isinstance(patient, Mapping) and Path(patient).is_dir() and not holds_nifti(Path(patient)):
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
    prob_path = probabilities_path(seg_path) if probabilities else None
    outputs = [(seg_path, label_image(labels, reference, loaded))]
    if prob_path is not None:
        outputs.append((prob_path, probability_image(prediction.probabilities, reference, prediction.channel_names)))
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


__all__ = ["Job", "PredictError", "Predictor", "Written", "check_outputs", "main", "patient_of", "plan_jobs",
           "predict_patient", "resolve_checkpoint", "write_atomic"]
