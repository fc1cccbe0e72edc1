"""`train predict`'s NIfTI output: the label map (uint8) and the probabilities (float32, 4D) in the
geometry of the first modality file (affine, qform/sform with their codes, header zooms), written
under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import inference
from .predict_jobs import PredictError


def label_image(labels: np.ndarray, reference: str, loaded: inference.LoadedModel) -> Any:
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


def probability_image(probs: np.ndarray, reference: str, names: Sequence[str]) -> Any:
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


def _reference_header(reference: str) -> Any:
    import nibabel as nib

    return nib.load(reference)


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


__all__ = ["label_image", "probability_image", "write_atomic"]
