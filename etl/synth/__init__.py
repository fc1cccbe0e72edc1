"""Synthetic BraTS-like glioma patients, written in the real releases' on-disk layouts.

There is no real BraTS data in the repository (it may not be redistributed), so tests, examples
and benchmarks run on these.  They are made to be hard to segment rather than easy: irregular
tumours with fuzzy borders and overlapping class intensities, unlabelled look-alikes (vessels,
choroid plexus, white-matter hyperintensities), bias fields, noise, thick-slice acquisitions and
scanner-to-scanner intensity changes.  See :mod:`etl.synth.anatomy` for the phantom and
:mod:`etl.synth.layouts` for the file formats.

Example::

    from etl.synth import synthesize
    ids = synthesize(Path("data"), patients=20, layout="brats2020", seed=0)
    ids = synthesize(Path("tiny"), patients=3, shape=(48, 48, 24), layout="kaggle-h5",
                     kaggle_channel_order=("t1", "t1ce", "t2", "flair"), kaggle_background=0.0)

Layouts (``out`` is the folder given):

``brats2020``
    ``MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/BraTS20_Training_NNN_{flair,t1,t1ce,t2,seg}.nii``
    (uncompressed), NNN = 001...; labels 0, 1 NCR/NET, 2 ED, 4 ET; ``name_mapping.csv`` (every
    patient) and ``survival_info.csv`` (most HGG patients) beside the patient folders.  Patient
    355's segmentation is named ``W39_1998.09.19_Segm.nii`` as in the release (``quirk_355_at``
    moves that quirk to another patient number so that small runs can exercise it).
``brats2021``
    ``BraTS2021_Training_Data/BraTS2021_NNNNN/BraTS2021_NNNNN_{flair,t1,t1ce,t2,seg}.nii.gz``,
    labels 0/1/2/4.  Case numbers have gaps like the release: patient i gets ``(3i+1)//2``
    (00000, 00002, 00003, 00005, ...).
``brats2023``
    ``ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData/BraTS-GLI-NNNNN-000/BraTS-GLI-NNNNN-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``
    (t1n = T1, t1c = T1ce, t2w = T2, t2f = FLAIR), labels 0, 1 NCR, 2 ED (SNFH), 3 ET; the
    same numbering as 2021.
``kaggle-h5``
    ``BraTS2020_training_data/content/data/volume_V_slice_S.h5`` (V = 1..patients,
    S = 0..D-1) with ``image`` (H, W, 4) float64 and ``mask`` (H, W, 3) uint8 one-hot
    NCR/NET, ED, ET, plus ``meta_data.csv`` there.  ``volume_V`` is the same synthetic patient
    as ``BraTS20_Training_{V:03d}`` (the real mapping is unknown).  Metadata columns:
    ``target`` 1 when the slice has any tumour, ``labelK_pxl_cnt`` the pixels of mask channel
    K, ``background_ratio`` the fraction of the slice's pixels with no tumour label (our
    reading of the real column; its exact definition is not documented).
``msd``
    The Medical Segmentation Decathlon's ``Task01_BrainTumour/``: ``imagesTr/BRATS_NNN.nii.gz``
    (NNN = 001...), one 4D float32 file per case with the modalities FLAIR, T1w, t1gd, T2w on its
    last axis, ``labelsTr/BRATS_NNN.nii.gz`` in the MSD's values (0 background, 1 edema,
    2 non-enhancing tumour, 3 enhancing tumour), every fourth case in ``imagesTs/`` without
    labels, and a ``dataset.json`` with the release's "modality" and "labels" maps and case
    lists (its name, licence and release fields copied from the public release's; the float32
    images are our reading of the release, not checked against its files).

NIfTI files: int16 images, uint8 segmentations, shape ``shape`` (240x240x155 by default), 1 mm
voxels, qform = sform (code 1) = the BraTS/SRI24 affine as nibabel reports it,
``[[-1,0,0,0],[0,-1,0,239],[0,0,1,0]]`` (ITK/LPS origin (0, -239, 0)).  That affine is an
assumption from public notes on SRI24-registered volumes (the BraTS atlas space), not read from
a release file.  The grid always covers the 240x240x155 mm template, so a smaller ``shape``
gives the same patient at a coarser sampling, but the header still says 1 mm.

Reproducibility: patient i is drawn from ``numpy.random.default_rng([seed, i])`` alone (its
clinical CSV values from ``[seed, i, 1]``), so it is the same whatever ``patients`` is and
whichever layout is asked for; the same arguments give byte-identical files on the same
machine (numpy's float kernels may differ in the last bit between CPU families).

Speed, measured on this project's 2-core development machine (``OMP_NUM_THREADS=1``, 5 patients,
seed 0): rendering one 240x240x155 patient takes 0.8-1.1 s when the machine is otherwise idle
and 1.1-2 s while other jobs share it (median 1.3 s at load 3); writing adds ~0.3 s for the
uncompressed .nii files, ~0.6 s for .nii.gz (gzip level 1) and a few seconds for the 155 .h5
files of the Kaggle layout.  Command::

    python -c "import time, numpy as np; from etl.synth.anatomy import draw_patient, render;
    p = draw_patient(np.random.default_rng([0, 0])); t = time.perf_counter();
    render(p, (240, 240, 155)); print(time.perf_counter() - t)"

Public sources for the naming conventions (read, not copied):

- BraTS 2020 layout, CSV headers, patient 355's ``W39_1998.09.19_Segm.nii``: this project's
  ``DATA_FACTS.md``; the W39 file is also the subject of iolag/UPD_study pull request #3
  ("Fix renaming command", prepare_BraTS.sh renames it).
- BraTS 2023 names and the modality mapping t1->t1n, t1ce->t1c, t2->t2w, flair->t2f:
  mobaidoctor/med-ddpm pull request #20; the ``ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData``
  folder and ``<case>-t1n.nii.gz`` names: MIC-DKFZ/nnUNet issue #2653.
- The SRI24 affine: a public data note printing nibabel's affine for SRI24-registered IvyGAP
  volumes (the W-numbered TCIA patients, like W39), 240x240x155, 1 mm.
- Kaggle export file names, keys, shapes and metadata columns: ``DATA_FACTS.md`` (the image
  channel order and normalisation are unverified there, hence the two options).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from etl.sources import LAYOUTS, KAGGLE_CHANNEL_ORDER
from etl.synth import layouts
from etl.synth.folder import record_complete
from etl.synth.anatomy import MODALITIES, draw_patient, render
from etl.synth.profiles import PROFILES, Profile
from shards_spec.errors import ToolError
from shards_spec.fileio import refusal

__all__ = ["LAYOUTS", "check_arguments", "synthesize"]
MIN_SHAPE = (16, 16, 8)
MAX_SIDE = 1024
MAX_PATIENTS = {"brats2020": 999, "brats2021": 60000, "brats2023": 60000, "kaggle-h5": 60000, "msd": 999}
"""The layouts synth writes (of `etl.sources.LAYOUTS`), with the most patients each numbering allows."""
QUIRK_PATIENT = 355


def synthesize(
    out: Path,
    *,
    patients: int = 10,
    layout: str = "brats2020",
    shape: tuple[int, int, int] = (240, 240, 155),
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    quirk_355_at: int | None = None,
    kaggle_channel_order: Sequence[str] = KAGGLE_CHANNEL_ORDER,
    kaggle_background: float | None = None,
    profile: str = "default",
) -> list[str]:
    """Writes ``patients`` synthetic patients under ``out`` in ``layout``; returns patient ids.

    The ids are the release's own: ``BraTS20_Training_001``, ``BraTS2021_00000``,
    ``BraTS-GLI-00000-000``, ``BRATS_001`` (msd) or, for ``kaggle-h5``, ``volume_1``.  ``shape`` is (H, W, D) of
    every volume.  ``progress``, if given, is called after each patient with the number of
    patients written so far (1, 2, ..., patients).  ``quirk_355_at`` names the patient number
    (1-based) whose segmentation gets the odd name ``W39_1998.09.19_Segm.nii`` instead of 355
    (``brats2020`` only).  ``kaggle_channel_order`` is the order of the four modalities in the
    Kaggle ``image`` array; ``kaggle_background`` None keeps raw intensities with a zero
    background, a number z-scores each channel over the brain of the volume and sets the
    background to that number.  ``profile`` names the ranges patients are drawn from
    (:mod:`etl.synth.profiles`: ``default``, or ``shifted`` for a second data set with more
    variety).  Side files (CSVs) are written after the last patient.

    Raises ValueError on a bad argument, naming it and the allowed values, and a ToolError naming
    the file when a write is refused (a full disk): every file is written whole or not at all, so
    the same call again finishes the dataset.
    """
    check_arguments(patients, layout, shape, seed, quirk_355_at, kaggle_channel_order, kaggle_background, profile)
    out = Path(out)
    shape = tuple(int(v) for v in shape)
    quirk = QUIRK_PATIENT if quirk_355_at is None else int(quirk_355_at)
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _write_patients(out, patients, layout, shape, seed, progress, quirk, kaggle_channel_order,
                               kaggle_background, PROFILES[profile])
    except OSError as exc:  # a full disk, a quota, a size limit: every file written is whole (atomic)
        raise ToolError(f"cannot be written ({refusal(exc)}); every file written is whole: free space and run "
                        "the same command again to finish", exc.filename or out) from None


def _write_patients(out: Path, patients: int, layout: str, shape: tuple[int, int, int], seed: int,
                    progress: Callable[[int], None] | None, quirk: int, kaggle_channel_order: Sequence[str],
                    kaggle_background: float | None, profile: Profile) -> list[str]:
    ids: list[str] = []
    mapping_rows, survival_rows, meta_rows = [], [], []
    for index in range(patients):
        params = draw_patient(np.random.default_rng([seed, index]), profile)
        patient = render(params, shape)
        if layout == "brats2020":
            ids.append(layouts.write_brats2020(out, index, patient, quirk_seg=index + 1 == quirk))
            clinical = np.random.default_rng([seed, index, 1])
            mapping_rows.append(layouts.name_mapping_row(clinical, index, params.grade))
            row = layouts.survival_row(clinical, index, params.grade)
            if row is not None:
                survival_rows.append(row)
        elif layout == "brats2021":
            ids.append(layouts.write_brats2021(out, index, patient))
        elif layout == "brats2023":
            ids.append(layouts.write_brats2023(out, index, patient))
        elif layout == "msd":
            ids.append(layouts.write_msd(out, index, patient))
        else:
            pid, rows = layouts.write_kaggle(
                out, index, patient, channel_order=tuple(kaggle_channel_order), background=kaggle_background
            )
            ids.append(pid)
            meta_rows.extend(rows)
        if progress is not None:
            progress(index + 1)
    if layout == "brats2020":
        root = out / layouts.BRATS2020_DIR
        layouts.write_csv(root / "name_mapping.csv", layouts.NAME_MAPPING_HEADER, mapping_rows)
        layouts.write_csv(root / "survival_info.csv", layouts.SURVIVAL_HEADER, survival_rows)
    elif layout == "kaggle-h5":
        layouts.write_csv(out / layouts.KAGGLE_DIR / "meta_data.csv", layouts.KAGGLE_META_HEADER, meta_rows)
    elif layout == "msd":
        layouts.write_msd_description(out, ids)
    record_complete(out, patients)
    return ids


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def check_arguments(patients, layout, shape, seed, quirk_355_at=None, channel_order=KAGGLE_CHANNEL_ORDER,
                    background=None, profile="default") -> None:
    """Raise ValueError naming the first bad argument of `synthesize` (before anything is written)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {str(profile)[:80]!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout not in MAX_PATIENTS:
        raise ValueError(f"synth cannot write the {layout} layout: it writes {', '.join(MAX_PATIENTS)}")
    n = _as_int(patients, "patients")
    if not 1 <= n <= MAX_PATIENTS[layout]:
        raise ValueError(f"patients must be between 1 and {MAX_PATIENTS[layout]} for {layout}, got {n}")
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be three integers (H, W, D), got {shape!r}") from None
    if len(dims) != 3:
        raise ValueError(f"shape must be three integers (H, W, D), got {shape!r}")
    for name, v, lo in zip("HWD", dims, MIN_SHAPE):
        v = _as_int(v, f"shape {name}")
        if not lo <= v <= MAX_SIDE:
            raise ValueError(f"shape {name} must be between {lo} and {MAX_SIDE}, got {v} (shape {tuple(shape)!r})")
    if _as_int(seed, "seed") < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if quirk_355_at is not None:
        if layout != "brats2020":
            raise ValueError(f"quirk_355_at applies to the brats2020 layout only, not {layout}")
        q = _as_int(quirk_355_at, "quirk_355_at")
        if not 1 <= q <= n:
            raise ValueError(f"quirk_355_at must be a patient number between 1 and {n}, got {q}")
    order = tuple(channel_order)
    if sorted(order) != sorted(MODALITIES):
        raise ValueError(f"kaggle_channel_order must be an ordering of {', '.join(MODALITIES)}, got {order!r}")
    if background is not None:
        try:
            ok = np.isfinite(float(background))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"kaggle_background must be None or a finite number, got {background!r}")
