"""The shards' recipe written independently of `shards_spec.preprocess`, to compare built shards
with: float64 z-score per slice over brain voxels, torch bilinear+antialias resize, nearest-exact
masks, background re-zeroed, float16; source files read with nibabel / h5py directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers.etl_runs import find_one

NIFTI_SUFFIX = {
    "brats2020": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}
ET_SOURCE = {"brats2020": 4, "brats2021": 4, "brats2023": 3}


def read_source(src: Path, layout: str, pid: str) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W, D) float64 in t1, t1ce, t2, flair order and the 0..3 label map, read directly."""
    if layout == "kaggle-h5":
        import h5py

        number = int(pid.split("_")[1])
        files = sorted((p for p in src.rglob(f"volume_{number}_slice_*.h5")),
                       key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        images, masks = [], []
        for path in files:
            with h5py.File(path, "r") as f:
                images.append(np.asarray(f["image"], dtype=np.float64))
                masks.append(np.asarray(f["mask"]))
        image = np.stack(images, axis=-1)  # (H, W, 4, D) in flair, t1, t1ce, t2
        order = ("flair", "t1", "t1ce", "t2")
        volume = np.stack([image[:, :, order.index(m)] for m in ("t1", "t1ce", "t2", "flair")])
        onehot = np.stack(masks, axis=-1)  # (H, W, 3, D)
        labels = (onehot[:, :, 0] * 1 + onehot[:, :, 1] * 2 + onehot[:, :, 2] * 3).astype(np.uint8)
        return volume, labels
    import nibabel as nib

    suffix = NIFTI_SUFFIX[layout]
    volume = np.stack([np.asarray(nib.load(find_one(src, rf"^{pid}{suffix[m]}\.nii(\.gz)?$")).dataobj, dtype=np.float64)
                       for m in ("t1", "t1ce", "t2", "flair")])
    seg = np.asarray(nib.load(find_one(src, rf"^{pid}{suffix['seg']}\.nii(\.gz)?$")).dataobj).astype(np.int64)
    labels = np.select([seg == 1, seg == 2, seg == ET_SOURCE[layout]], [1, 2, 3], 0).astype(np.uint8)
    return volume, labels


def expected_slice(volume: np.ndarray, labels: np.ndarray, z: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F

    planes = volume[..., z]  # (C, H, W)
    brain = np.any(planes != 0, axis=0)
    normalised = np.zeros_like(planes)
    for c, plane in enumerate(planes):
        values = plane[brain]
        mean, std = values.mean(), values.std()
        std = std if std >= 1e-6 else 1.0
        normalised[c] = np.where(brain, (plane - mean) / std, 0.0)
    image = F.interpolate(torch.from_numpy(normalised.astype(np.float32))[None], size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)[0].numpy()
    small_brain = F.interpolate(torch.from_numpy(brain.astype(np.float32))[None, None], size=(size, size),
                                mode="nearest-exact")[0, 0].numpy() > 0.5
    small_labels = F.interpolate(torch.from_numpy(labels[..., z].astype(np.float32))[None, None], size=(size, size),
                                 mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
    image = np.where(small_brain[None], image, 0).astype(np.float16)
    return image, np.where(small_brain, small_labels, 0).astype(np.uint8)
