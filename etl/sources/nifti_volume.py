"""Reading NIfTI volumes: header checks (cheap, at scan time) and the patient's data (in the task).

Checks are split by cost. The scan reads headers only (every file present, non-empty, a NIfTI
header nibabel accepts, 3D, the same shape in every file, an uncompressed file as long as its
header says); `load_nifti_patient` reads the data and checks its values (finite images, labels in
the release's set, a complete gzip stream). Arrays keep the stored axis order; spacing comes from
the header zooms and the affine from the image.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from shards_spec.errors import SourceError
from shards_spec.labels import CHANNELS, Convention, encode_labels
from shards_spec.preprocess import brain_mask

from .base import (MAX_PATIENT_BYTES, PatientRef, PatientVolume, geometry_warnings, patient_size_problem,
                   skull_strip_warning)

AFFINE_TOLERANCE = 1e-3
GZIP_SLACK_BYTES = 1 << 16
"""Bytes a .nii.gz may hold beyond what its header declares (padding) before it is refused."""

# What a damaged file raises while nibabel reads it (truncated gzip, short .nii, bad header).
READ_ERRORS = (OSError, EOFError, ValueError, TypeError, zlib.error, struct.error, IndexError)


def truncation_problem(img, shape: tuple[int, ...], path: str | Path, size: int) -> SourceError | None:
    """An uncompressed `.nii` of `size` bytes shorter than its header says `shape` needs (a `.nii.gz`
    is checked whole when it is read)."""
    if not str(path).lower().endswith(".nii"):
        return None
    needed = int(img.header.get("vox_offset", 0)) + math.prod(shape) * img.header.get_data_dtype().itemsize
    return SourceError(f"truncated file: {size} bytes, its header needs {needed}", path) if size < needed else None


def check_headers(files: dict[str, str], max_patient_bytes: int = MAX_PATIENT_BYTES) -> list[SourceError]:
    """Header-level checks: readable NIfTI, 3D, a size within `max_patient_bytes`, same shape
    everywhere, uncompressed length."""
    problems: list[SourceError] = []
    reference: tuple[str, tuple[int, ...]] | None = None
    for key in (*CHANNELS, "seg"):
        path = files.get(key)
        if path is None:
            continue
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            problems.append(SourceError(f"cannot be read ({exc.strerror or exc})", path))
            continue
        if size == 0:
            continue  # reported by match_files
        try:
            img = load_header(path)
        except SourceError as exc:
            problems.append(exc)
            continue
        shape = spatial_shape(img.shape, path)
        if isinstance(shape, SourceError):
            problems.append(shape)
            continue
        too_big = None if reference is not None and shape == reference[1] else \
            patient_size_problem(shape, path, max_patient_bytes)  # once per patient, and for an odd file
        if too_big:
            problems.append(too_big)
            reference = reference or (key, shape)
            continue
        truncated = truncation_problem(img, shape, path, size)
        if truncated:
            problems.append(truncated)
            continue
        if reference is None:
            reference = (key, shape)
        elif shape != reference[1]:
            problems.append(
                SourceError(
                    f"shape {fmt_shape(shape)} differs from the {reference[0]} image's {fmt_shape(reference[1])}", path
                )
            )
    return problems


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def load_header(path: str):
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for non-NIfTI bytes; all mean "not NIfTI"
        if isinstance(exc, MemoryError):
            raise
        raise SourceError(f"not a readable NIfTI file ({type(exc).__name__}: {exc})", path) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise SourceError(f"not a NIfTI image (nibabel read it as {type(img).__name__})", path)
    return img


def spatial_shape(shape: tuple[int, ...], path: str) -> tuple[int, int, int] | SourceError:
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        return SourceError(f"4D image of shape {fmt_shape(shape)}: expected one 3D volume per file", path)
    if len(shape) != 3:
        return SourceError(f"{len(shape)}D image of shape {fmt_shape(shape)}: expected a 3D volume", path)
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def whole_gzip(img, path: str, what: str):
    """`img` read back from its whole gzip stream, CRC and length checked (a .nii.gz only).

    nibabel decompresses only as far as the voxels reach, so the gzip trailer is never checked
    and a stream with damaged bytes in the middle decodes to wrong voxels without an error.
    Decompressing the file once here, in full, costs what nibabel's own read would.
    """
    if not str(path).lower().endswith(".gz"):
        return img
    import gzip

    header = img.header
    cap = int(header.get("vox_offset", 0)) + math.prod(int(n) for n in img.shape) * header.get_data_dtype().itemsize \
        + GZIP_SLACK_BYTES
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read(cap + 1)  # a shorter read is the stream's end: its CRC has been checked
        if len(raw) > cap:
            raise SourceError(f"its gzip stream holds more than the {cap} bytes its header declares (a gzip bomb?)",
                              path)
        return type(img).from_bytes(raw)
    except READ_ERRORS as exc:
        raise SourceError(
            f"cannot read the {what} data, the file may be truncated or corrupt ({type(exc).__name__}: {exc})",
            path,
        ) from None


def _read_into(out: np.ndarray, img, path: str) -> None:
    """Copy the image data (scaled by scl_slope/inter) into float32 `out`, reading it once."""
    img = whole_gzip(img, path, "image")
    try:
        data = np.asanyarray(img.dataobj)
        if data.ndim == 4:
            data = data[..., 0]
        np.copyto(out, data, casting="unsafe")
    except READ_ERRORS as exc:
        raise SourceError(
            f"cannot read the image data, the file may be truncated or corrupt ({type(exc).__name__}: {exc})",
            path,
        ) from None
    if not np.isfinite(out).all():
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise SourceError(f"image holds {bad} non-finite value(s) (NaN or inf, or beyond float32)", path)


def load_nifti_patient(
    ref: PatientRef, channels: list[str], require_labels: bool, convention: Convention,
    max_patient_bytes: int = MAX_PATIENT_BYTES,
) -> PatientVolume:
    """Read one NIfTI patient.

    The brain mask is computed from every modality the patient has, not only the requested
    channels, so a two-channel model sees the same mask as the four-channel shards were cut with.
    """
    _require_files(ref, channels, require_labels)
    order = list(channels) + [m for m in CHANNELS if m in ref.files and m not in channels]
    images = [load_header(ref.files[m]) for m in order]
    shape = _common_shape(ref, order, images, max_patient_bytes)
    stack = _read_stack(ref, order, images, shape)
    brain = brain_mask(stack)
    first = images[0]
    affine = np.asarray(first.affine, dtype=np.float64)
    spacing = tuple(float(z) for z in first.header.get_zooms()[:3])
    warnings = _volume_warnings(order, images, shape, spacing, affine, brain)
    labels = read_labels(ref.files["seg"], convention, shape) if "seg" in ref.files else None
    dtypes = sorted({str(img.get_data_dtype()) for img in images})
    return PatientVolume(
        volume=stack[: len(channels)],
        brain=brain,
        labels=labels,
        affine=affine,
        spacing=spacing,  # type: ignore[arg-type]
        shape=shape,
        warnings=warnings,
        source_dtype=",".join(dtypes),
    )


def _require_files(ref: PatientRef, channels: list[str], require_labels: bool) -> None:
    """Refuse a patient without one of `channels` or, when `require_labels`, its segmentation."""
    for ch in channels:
        if ch not in ref.files:
            raise SourceError(f"patient {ref.id} has no {ch} image", ref.meta.get("folder"))
    if require_labels and "seg" not in ref.files:
        raise SourceError(f"patient {ref.id} has no segmentation", ref.meta.get("folder"))


def _common_shape(ref: PatientRef, order: list[str], images: list, max_patient_bytes: int) -> tuple[int, int, int]:
    """The 3D shape every image of `order` has (refused when one is not 3D, differs from the first,
    or the patient's volume exceeds `max_patient_bytes`)."""
    shapes = []
    for m, img in zip(order, images):
        shape = spatial_shape(img.shape, ref.files[m])
        if isinstance(shape, SourceError):
            raise shape
        shapes.append(shape)
    shape = shapes[0]
    for m, s in zip(order, shapes):
        if s != shape:
            raise SourceError(f"shape {fmt_shape(s)} differs from the {order[0]} image's {fmt_shape(shape)}", ref.files[m])
    too_big = patient_size_problem(shape, ref.files[order[0]], max_patient_bytes)
    if too_big:
        raise too_big
    return shape


def _read_stack(ref: PatientRef, order: list[str], images: list, shape: tuple[int, int, int]) -> np.ndarray:
    """float32 (C, *shape), one channel per image of `order`.

    Each channel is Fortran-ordered, as NIfTI stores it: reading is then one straight copy (a C-order
    target costs a transpose per channel), and an axial slice [..., d] is contiguous.
    """
    stack = np.empty((len(order), *shape[::-1]), dtype=np.float32).transpose(0, 3, 2, 1)
    for i, (m, img) in enumerate(zip(order, images)):
        _read_into(stack[i], img, ref.files[m])
    return stack


def _volume_warnings(order: list[str], images: list, shape: tuple[int, int, int], spacing: tuple[float, ...],
                     affine: np.ndarray, brain: np.ndarray) -> list[str]:
    """A grid unlike BraTS's, an image whose affine differs from the first's (the first's is used),
    a brain mask that does not look skull-stripped."""
    warnings = geometry_warnings(shape, spacing)
    for m, img in zip(order[1:], images[1:]):
        if not np.allclose(img.affine, affine, atol=AFFINE_TOLERANCE):
            warnings.append(f"the {m} image's affine differs from the {order[0]} image's (used {order[0]}'s)")
    strip = skull_strip_warning(brain)
    if strip:
        warnings.append(strip)
    return warnings


def read_labels(path: str, convention: Convention, shape: tuple[int, int, int]) -> np.ndarray:
    """The segmentation at `path` as a 0..3 label map, checked against the images' `shape`."""
    img = load_header(path)
    seg_shape = spatial_shape(img.shape, path)
    if isinstance(seg_shape, SourceError):
        raise seg_shape
    if seg_shape != shape:
        raise SourceError(f"segmentation shape {fmt_shape(seg_shape)} differs from the images' {fmt_shape(shape)}", path)
    img = whole_gzip(img, path, "segmentation")
    try:
        # dataobj applies scl_slope/inter when the header sets them (then the values are float and
        # encode_labels checks they are whole numbers); otherwise it is the stored integer array.
        seg = np.asanyarray(img.dataobj)
    except READ_ERRORS as exc:
        raise SourceError(
            f"cannot read the segmentation data, the file may be truncated or corrupt ({type(exc).__name__}: {exc})",
            path,
        ) from None
    if seg.ndim == 4:
        seg = seg[..., 0]
    return encode_label_volume(seg, convention, path)


def encode_label_volume(seg: np.ndarray, convention: Convention, path: object) -> np.ndarray:
    """`encode_labels` for a whole volume, fast: it maps the distinct values, a table does the rest.

    Calling `encode_labels` on 9M voxels costs ~0.5 s (int64 copies and a sort); here byte-range
    integer values are narrowed to uint8, their distinct values found with a bincount, validated
    and mapped by `encode_labels` itself, and applied with a 256-entry table. Anything else
    (negative, large, fractional, NaN) goes to `encode_labels` whole, which raises its error.
    """
    small = None
    if seg.dtype == np.uint8:
        small = seg
    elif seg.size and (np.issubdtype(seg.dtype, np.integer) or np.issubdtype(seg.dtype, np.floating)):
        lo, hi = seg.min(), seg.max()
        if lo >= 0 and hi <= 255:  # False for NaN
            narrowed = seg.astype(np.uint8)
            if np.issubdtype(seg.dtype, np.integer) or np.array_equal(narrowed, seg):
                small = narrowed
    if small is None:
        return encode_labels(seg, convention, path)
    present = np.flatnonzero(np.bincount(small.ravel(order="K"), minlength=256)).astype(np.uint8)
    table = np.zeros(256, dtype=np.uint8)
    table[present] = encode_labels(present, convention, path)
    return table[small]
