"""On-disk layouts of the BraTS releases: file names, NIfTI/HDF5 bytes, CSV side files.

Every file is written atomically and durably (``shards_spec.fileio``: a temporary name beside
it, fsynced, then renamed), so an interrupted run leaves complete files or none.  Bytes are reproducible: NIfTI headers are filled field by field with no date or
description, ``.nii.gz`` streams carry mtime 0 and no file name, HDF5 datasets carry no
timestamps, CSVs use ``\\n`` line ends.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from etl.synth.anatomy import Rendered
from shards_spec.fileio import atomic_path, write_atomic

# The BraTS (SRI24 atlas) voxel-to-world affine as nibabel reports it for the 2020 release:
# x and y flipped, origin (0, 239, 0) in RAS, i.e. ITK/LPS origin (0, -239, 0).
BRATS_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
QUIRK_355_SEG = "W39_1998.09.19_Segm.nii"

BRATS2020_DIR = "MICCAI_BraTS2020_TrainingData"
BRATS2021_DIR = "BraTS2021_Training_Data"
BRATS2023_DIR = "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
MSD_DIR = "Task01_BrainTumour"
KAGGLE_DIR = Path("BraTS2020_training_data", "content", "data")

NAME_MAPPING_HEADER = (
    "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,"
    "BraTS_2019_subject_ID,BraTS_2020_subject_ID"
)
SURVIVAL_HEADER = "Brats20ID,Age,Survival_days,Extent_of_Resection"
KAGGLE_META_HEADER = (
    "slice_path,target,volume,slice,label0_pxl_cnt,label1_pxl_cnt,label2_pxl_cnt,background_ratio"
)
# BraTS 2023 renamed the modalities; 2020 and 2021 use the left-hand names.
BRATS2023_NAMES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


# ------------------------------------------------------------------------------------ writing


def nifti_bytes(data: np.ndarray) -> bytes:
    """An uncompressed NIfTI-1 single file (.nii) with the BraTS affine and 1 mm voxels."""
    import nibabel as nib

    img = nib.Nifti1Image(data, BRATS_AFFINE)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_zooms((1.0,) * data.ndim)
    hdr["descrip"] = b""
    hdr["aux_file"] = b""
    hdr["db_name"] = b""
    img.set_qform(BRATS_AFFINE, code=1)
    img.set_sform(BRATS_AFFINE, code=1)
    return img.to_bytes()


def write_nifti(path: Path, data: np.ndarray) -> None:
    raw = nifti_bytes(data)
    if path.name.endswith(".gz"):
        # gzip.compress with mtime=0 writes no time and no file name: reproducible bytes.
        # Level 1: twice as fast as 6 for ~5% larger files.
        raw = gzip.compress(raw, compresslevel=1, mtime=0)
    write_atomic(path, raw)


def write_csv(path: Path, header: str, rows: list[list[object]]) -> None:
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))


# ------------------------------------------------------------------------------- the layouts


def brats2021_number(index: int) -> int:
    """Five-digit case number of patient ``index`` (0-based) in the 2021/2023 layouts.

    The real numbers have gaps (00000, 00002, 00003, 00005, 00006, 00008, ...); ``(3i+1)//2``
    reproduces that start and keeps numbers unique and stable when patients are added.
    """
    return (3 * index + 1) // 2


def write_brats2020(root: Path, index: int, patient: Rendered, *, quirk_seg: bool) -> str:
    pid = f"BraTS20_Training_{index + 1:03d}"
    folder = root / BRATS2020_DIR / pid
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in patient.images.items():
        write_nifti(folder / f"{pid}_{name}.nii", data)
    seg_name = QUIRK_355_SEG if quirk_seg else f"{pid}_seg.nii"
    write_nifti(folder / seg_name, patient.seg)
    return pid


def write_brats2021(root: Path, index: int, patient: Rendered) -> str:
    pid = f"BraTS2021_{brats2021_number(index):05d}"
    folder = root / BRATS2021_DIR / pid
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in patient.images.items():
        write_nifti(folder / f"{pid}_{name}.nii.gz", data)
    write_nifti(folder / f"{pid}_seg.nii.gz", patient.seg)
    return pid


def write_brats2023(root: Path, index: int, patient: Rendered) -> str:
    pid = f"BraTS-GLI-{brats2021_number(index):05d}-000"
    folder = root / BRATS2023_DIR / pid
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in patient.images.items():
        write_nifti(folder / f"{pid}-{BRATS2023_NAMES[name]}.nii.gz", data)
    seg = patient.seg.copy()
    seg[seg == 4] = 3  # 2023: 1 NCR, 2 SNFH (edema), 3 ET
    write_nifti(folder / f"{pid}-seg.nii.gz", seg)
    return pid


def write_kaggle(
    root: Path,
    index: int,
    patient: Rendered,
    *,
    channel_order: tuple[str, ...],
    background: float | None,
) -> tuple[str, list[list[object]]]:
    """One volume of the Kaggle 2D export: an .h5 per axial slice; returns its meta rows.

    ``image`` (H, W, 4) float64 in ``channel_order``; ``mask`` (H, W, 3) uint8 one-hot
    NCR/NET, ED, ET.  With ``background`` set, each channel is z-scored over the brain voxels of
    the whole volume and the background set to that constant (as some copies seem to be).
    """
    import h5py

    volume = index + 1
    folder = root / KAGGLE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    channels = []
    for name in channel_order:
        v = patient.images[name].astype(np.float64)
        if background is not None:
            inside = v[patient.brain]
            v = (v - inside.mean()) / max(float(inside.std()), 1e-8)
            v[~patient.brain] = background
        channels.append(v)
    image = np.stack(channels, axis=-1)  # (H, W, D, 4)
    seg = patient.seg
    mask = np.stack([seg == 1, seg == 2, seg == 4], axis=-1).astype(np.uint8)  # (H, W, D, 3)
    rows = []
    pixels = seg.shape[0] * seg.shape[1]
    for s in range(seg.shape[2]):
        name = f"volume_{volume}_slice_{s}.h5"
        with atomic_path(folder / name) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("image", data=np.ascontiguousarray(image[:, :, s, :]))
                f.create_dataset("mask", data=np.ascontiguousarray(mask[:, :, s, :]))
        counts = [int(mask[:, :, s, k].sum()) for k in range(3)]
        tumour = sum(counts)
        rows.append([f"/content/data/{name}", int(tumour > 0), volume, s, *counts, repr(1.0 - tumour / pixels)])
    return f"volume_{volume}", rows


MSD_MODALITIES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
"""The release's dataset.json maps, word for word (their capitals and spellings included)."""


def _msd_order() -> tuple[str, ...]:
    from etl.sources.msd import MODALITY_NAMES

    return tuple(MODALITY_NAMES[name.lower()] for name in MSD_MODALITIES.values())


MSD_ORDER = _msd_order()
"""Our names of `MSD_MODALITIES`, in its order (read through the layout's own name table)."""


def msd_is_test(index: int) -> bool:
    """Whether patient ``index`` goes to imagesTs (every fourth; the release holds 266 of 750 there).
    A function of the index alone, so a grown dataset keeps every patient where it was."""
    return index % 4 == 3


def write_msd(root: Path, index: int, patient: Rendered) -> str:
    """One case of Task01_BrainTumour: a 4D float32 image (modalities in `MSD_ORDER` on the last
    axis) in imagesTr/ or imagesTs/, and for imagesTr its labels in the MSD's values."""
    from shards_spec.labels import decode_labels, encode_labels

    pid = f"BRATS_{index + 1:03d}"
    task = root / MSD_DIR
    images = np.stack([patient.images[m].astype(np.float32) for m in MSD_ORDER], axis=-1)
    folder = task / ("imagesTs" if msd_is_test(index) else "imagesTr")
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(folder / f"{pid}.nii.gz", images)
    if not msd_is_test(index):
        (task / "labelsTr").mkdir(parents=True, exist_ok=True)
        seg = decode_labels(encode_labels(patient.seg, "brats2020"), "msd")
        write_nifti(task / "labelsTr" / f"{pid}.nii.gz", seg)
    return pid


def write_msd_description(root: Path, ids: list[str]) -> None:
    """The task's dataset.json, listing every case as the release's does."""
    import json

    train = [pid for i, pid in enumerate(ids) if not msd_is_test(i)]
    test = [pid for i, pid in enumerate(ids) if msd_is_test(i)]
    description = {
        "name": "BRATS",
        "description": "Gliomas segmentation tumour and oedema in brain images (synthetic: etl synth)",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
        "licence": "CC-BY-SA 4.0",
        "release": "2.0 04/05/2018",
        "tensorImageSize": "4D",
        "modality": MSD_MODALITIES,
        "labels": MSD_LABELS,
        "numTraining": len(train),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{pid}.nii.gz", "label": f"./labelsTr/{pid}.nii.gz"} for pid in train],
        "test": [f"./imagesTs/{pid}.nii.gz" for pid in test],
    }
    write_atomic(root / MSD_DIR / "dataset.json", (json.dumps(description, indent=4) + "\n").encode("utf-8"))


# ------------------------------------------------------------------------ clinical side files

_INSTITUTIONS = ("CBICA", "CBICA", "CBICA", "TCIA01", "TCIA02", "TCIA03", "TCIA04", "TCIA06", "TCIA08", "TMC", "2013")


def _letters(n: int) -> str:
    a = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return a[(n // 676) % 26] + a[(n // 26) % 26] + a[n % 26]


def name_mapping_row(rng: np.random.Generator, index: int, grade: str) -> list[object]:
    """A plausible ``name_mapping.csv`` row: IDs from earlier challenges or NA if newer."""
    inst = _INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))]
    if inst == "CBICA":
        case = f"CBICA_{_letters((index * 4099 + 17) % 17576)}_1"
    elif inst == "2013":
        case = f"2013_{index % 40}_1"
    else:
        case = f"{inst}_{100 + (index * 37) % 900}_1"
    first = int(rng.choice((2017, 2018, 2019, 2020), p=(0.5, 0.1, 0.2, 0.2)))
    tcga = "NA"
    if inst.startswith("TCIA"):
        site = ("02", "06", "08", "12", "14", "19", "76")[int(rng.integers(7))] if grade == "HGG" else ("CS", "DU", "FG", "HT")[int(rng.integers(4))]
        tcga = f"TCGA-{site}-{int(rng.integers(1000, 9999)):04d}"
    pid = f"BraTS20_Training_{index + 1:03d}"
    b17 = f"Brats17_{case}" if first <= 2017 else "NA"
    b18 = f"Brats18_{case}" if first <= 2018 else "NA"
    b19 = f"BraTS19_{case}" if first <= 2019 else "NA"
    return [grade, b17, b18, tcga, b19, pid]


def survival_row(rng: np.random.Generator, index: int, grade: str) -> list[object] | None:
    """A ``survival_info.csv`` row for most HGG patients (about 236 of 293 in 2020), else None."""
    if grade != "HGG" or rng.uniform() > 0.8:
        return None
    age = float(np.clip(rng.normal(61.5, 12.0), 18.0, 87.0))
    days = int(np.clip(rng.lognormal(np.log(380.0), 0.75), 5, 1800))
    survival = f"ALIVE ({days} days later)" if rng.uniform() < 0.03 else str(days)
    resection = str(rng.choice(("GTR", "STR", "NA"), p=(0.4, 0.08, 0.52)))
    return [f"BraTS20_Training_{index + 1:03d}", f"{age:.3f}", survival, resection]
