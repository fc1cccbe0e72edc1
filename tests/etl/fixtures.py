"""Tiny BraTS-like datasets written in the real releases' layouts, for tests.

The phantom follows the contrast facts of real MRI (so the Kaggle channel-order check can be
tested on it): a brain ellipsoid with white matter, a grey-matter shell, CSF (ventricles and a
sulcal rim) and a tumour made of necrosis, enhancing rim and edema. Relative intensities:

    tissue   WM    GM    CSF   NEC   ED    ET
    t1       0.80  0.55  0.15  0.20  0.40  0.45
    t1ce     0.80  0.55  0.15  0.20  0.40  0.95   (enhancement)
    t2       0.35  0.50  1.00  0.80  0.80  0.60   (CSF bright)
    flair    0.45  0.55  0.10  0.50  0.90  0.65   (CSF dark, edema bright)

`tiny_brats(tmp_path, layout, patients, shape)` returns the dataset root a user would pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

TISSUES = ("WM", "GM", "CSF", "NEC", "ED", "ET")
CONTRAST = {
    "t1": (0.80, 0.55, 0.15, 0.20, 0.40, 0.45),
    "t1ce": (0.80, 0.55, 0.15, 0.20, 0.40, 0.95),
    "t2": (0.35, 0.50, 1.00, 0.80, 0.80, 0.60),
    "flair": (0.45, 0.55, 0.10, 0.50, 0.90, 0.65),
}
LABEL_OF_TISSUE = (0, 0, 0, 1, 2, 3)  # shard labels 0..3
MODALITIES = ("t1", "t1ce", "t2", "flair")
FILE_SUFFIX = {
    "brats2020": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}
SOURCE_LABEL = {"brats2020": (0, 1, 2, 4), "brats2021": (0, 1, 2, 4), "brats2023": (0, 1, 2, 3)}


def phantom(shape: Sequence[int], seed: int = 0, tumour: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({modality: float32 image, background 0}, uint8 label map 0..3) of a synthetic brain."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    tissue = np.full(shape, -1, dtype=np.int8)
    tissue[r < 0.85] = 2  # sulcal CSF rim
    tissue[r < 0.72] = 1  # GM
    tissue[r < 0.55] = 0  # WM
    tissue[(x / 0.15) ** 2 + (y / 0.35) ** 2 + (z / 0.35) ** 2 < 1] = 2  # ventricles
    if tumour:
        c = (0.3 + 0.05 * rng.uniform(-1, 1), 0.3, 0.0)
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        inside = r < 0.85
        tissue[(d < 0.38) & inside] = 4
        tissue[(d < 0.26) & inside] = 5
        tissue[(d < 0.13) & inside] = 3
    brain = tissue >= 0
    images = {}
    for m in MODALITIES:
        lut = np.array(CONTRAST[m], dtype=np.float32)
        img = lut[np.clip(tissue, 0, None)] + rng.normal(0, 0.03, shape).astype(np.float32)
        images[m] = np.where(brain, np.clip(img, 0.02, None), 0).astype(np.float32)
    labels = np.array(LABEL_OF_TISSUE, dtype=np.uint8)[np.clip(tissue, 0, None)]
    labels[~brain] = 0
    return images, labels


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None, zooms=None) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    if zooms is not None:
        img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return path


def brats_id(layout: str, number: int, validation: bool = False) -> str:
    if layout == "brats2020":
        return f"BraTS20_{'Validation' if validation else 'Training'}_{number:03d}"
    if layout == "brats2021":
        return f"BraTS2021_{number:05d}"
    return f"BraTS-GLI-{number:05d}-000"


def write_nifti_patient(
    folder: Path, pid: str, layout: str, shape, seed: int = 0, ext: str = ".nii", seg: bool = True,
    seg_name: str | None = None,
) -> Path:
    """One patient folder in `layout`'s naming; images int16 (x1000), seg uint8 in source labels."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = phantom(shape, seed)
    for m in MODALITIES:
        write_nifti(folder / f"{pid}{FILE_SUFFIX[layout][m]}{ext}", np.round(images[m] * 1000).astype(np.int16))
    if seg:
        source = np.array(SOURCE_LABEL[layout], dtype=np.uint8)[labels]
        write_nifti(folder / (seg_name or f"{pid}{FILE_SUFFIX[layout]['seg']}{ext}"), source)
    return folder


def tiny_brats(
    tmp_path: Path,
    layout: str = "brats2020",
    patients: int | Sequence[int] = 2,
    shape: Sequence[int] = (32, 32, 16),
    *,
    ext: str | None = None,
    unlabelled: int = 0,
    csv: bool = True,
    quirk_355: bool = False,
    kaggle_order: Sequence[str] = ("flair", "t1", "t1ce", "t2"),
    kaggle_background: bool | str = False,
) -> Path:
    """Write a tiny dataset in `layout` under tmp_path/<layout> and return that root.

    brats2020 nests patients in MICCAI_BraTS2020_TrainingData (and ..._ValidationData for
    `unlabelled` folders) with name_mapping.csv and survival_info.csv; `quirk_355` adds
    BraTS20_Training_355 with its real-release segmentation name. kaggle-h5 writes
    BraTS2020_training_data/content/data/volume_V_slice_S.h5 with the image channels stored in
    `kaggle_order`, optionally z-scored over the whole volume (a non-zero constant background).
    """
    shape = tuple(shape)
    numbers = list(range(1, patients + 1)) if isinstance(patients, int) else list(patients)
    root = Path(tmp_path) / layout
    if layout == "kaggle-h5":
        data = root / "BraTS2020_training_data" / "content" / "data"
        data.mkdir(parents=True, exist_ok=True)
        for v in numbers:
            write_kaggle_volume(data, v, shape, seed=v, order=kaggle_order, background=kaggle_background)
        return root
    ext = ext or (".nii" if layout == "brats2020" else ".nii.gz")
    base = root / "MICCAI_BraTS2020_TrainingData" if layout == "brats2020" else root
    for n in numbers:
        pid = brats_id(layout, n)
        write_nifti_patient(base / pid, pid, layout, shape, seed=n, ext=ext)
    if quirk_355:
        pid = brats_id(layout, 355)
        write_nifti_patient(base / pid, pid, layout, shape, seed=355, ext=ext, seg_name="W39_1998.09.19_Segm.nii")
        numbers.append(355)
    for k in range(1, unlabelled + 1):
        if layout == "brats2020":
            pid = brats_id(layout, k, validation=True)
            folder = root / "MICCAI_BraTS2020_ValidationData" / pid
        else:
            pid = brats_id(layout, 900 + k)
            folder = base / pid
        write_nifti_patient(folder, pid, layout, shape, seed=1000 + k, ext=ext, seg=False)
    if csv and layout == "brats2020":
        write_brats2020_csvs(base, numbers)
    return root


def write_brats2020_csvs(folder: Path, numbers: Sequence[int]) -> None:
    mapping = ["Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,BraTS_2020_subject_ID"]
    survival = ["Brats20ID,Age,Survival_days,Extent_of_Resection"]
    for i, n in enumerate(numbers):
        grade = "LGG" if i % 2 else "HGG"
        mapping.append(f"{grade},Brats17_TCIA_{n:03d}_1,Brats18_TCIA_{n:03d}_1,TCGA-XX-{n:04d},BraTS19_TCIA_{n:03d}_1,BraTS20_Training_{n:03d}")
        if grade == "HGG":
            days = "ALIVE (361 days later)" if i == 0 else str(100 + n)
            survival.append(f"BraTS20_Training_{n:03d},{60.5 + i},{days},{'GTR' if i == 0 else 'NA'}")
    (folder / "name_mapping.csv").write_text("\n".join(mapping) + "\n")
    (folder / "survival_info.csv").write_text("\n".join(survival) + "\n")


def write_kaggle_volume(
    data: Path, volume: int, shape, seed: int = 0, order: Sequence[str] = ("flair", "t1", "t1ce", "t2"),
    background: bool | str = False, slices: Sequence[int] | None = None,
) -> None:
    """volume_V_slice_S.h5 files of one phantom: image float64 (H, W, 4) in `order`, mask uint8 (H, W, 3).

    `background`: False keeps it 0; True (or "volume") z-scores the volume over all voxels, "slice"
    each slice, so the background becomes a non-zero constant per volume or per slice.
    """
    import h5py

    images, labels = phantom(shape, seed)
    stack = np.stack([images[m] for m in order], axis=-1).astype(np.float64)  # (H, W, D, 4)
    if background == "slice":  # z-score each slice over the whole slice: a constant per slice
        std = stack.std(axis=(0, 1), keepdims=True)
        stack = (stack - stack.mean(axis=(0, 1), keepdims=True)) / np.where(std > 0, std, 1.0)
    elif background:  # z-score over the whole volume, as a careless export would: background != 0
        stack = (stack - stack.mean(axis=(0, 1, 2))) / stack.std(axis=(0, 1, 2))
    onehot = np.stack([labels == k for k in (1, 2, 3)], axis=-1).astype(np.uint8)
    for s in range(shape[2]) if slices is None else slices:
        with h5py.File(data / f"volume_{volume}_slice_{s}.h5", "w") as f:
            f["image"] = stack[:, :, s, :]
            f["mask"] = onehot[:, :, s, :]
