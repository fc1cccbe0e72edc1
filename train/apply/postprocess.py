"""The BraTS post-processing of the 2020 winner (Isensee et al., nnU-Net for BraTS 2020): a
patient whose predicted enhancing tumour is smaller than a threshold has it relabelled NEC/NET.

Why: BraTS scores ET as Dice 1 when prediction and truth are both empty and 0 when only the
prediction is not, so a handful of false ET voxels in a tumour without enhancement (most
lower-grade gliomas) costs a whole patient's ET score; relabelling them NEC/NET keeps the tumour
core and whole tumour unchanged. The threshold is a number of voxels on the native grid, chosen
on validation data (nnU-Net picked it by cross-validation); `bench/quality.py --score-variant`
measures it.
"""

from __future__ import annotations

import numpy as np

from shards_spec.labels import LABEL_NAMES

ET = next(k for k, v in LABEL_NAMES.items() if v == "ET")
NEC = next(k for k, v in LABEL_NAMES.items() if v == "NEC/NET")


def relabel_small_et(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """A copy of the 0..3 label map with every ET voxel NEC/NET when there are fewer than `min_voxels`."""
    labels = np.asarray(labels)
    if min_voxels <= 0:
        return labels
    out = labels.copy()
    et = out == ET
    if 0 < np.count_nonzero(et) < min_voxels:
        out[et] = NEC
    return out


def scaled_threshold(min_voxels: int, native_shape: tuple[int, ...] | list[int] | None, size: int) -> int:
    """The threshold for a label map on the shard grid (size x size in-plane): the native voxel count
    scaled by the in-plane area ratio, so both grids post-process the same tumours."""
    if min_voxels <= 0 or not native_shape:
        return min_voxels
    height, width = int(native_shape[0]), int(native_shape[1])
    return max(1, int(round(min_voxels * size * size / (height * width))))


__all__ = ["relabel_small_et", "scaled_threshold"]
