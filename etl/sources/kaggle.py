"""The Kaggle 2D export of BraTS 2020: `volume_V_slice_S.h5`, one axial slice per file.

Each file holds `image` (H, W, 4) and `mask` (H, W, 3) with disjoint NEC/NET, ED, ET channels.
A patient is a volume: its slices sorted by S and stacked along the third axis give (H, W, D),
as the NIfTI releases store it. The export carries no geometry, so the affine is the identity
and the spacing is assumed to be 1 mm (said once in the patient's meta, not warned per patient).

Two things about the export are not documented, so they are handled here, inside this layout:

* The image channel order: the option `kaggle_channel_order` (`--kaggle-channel-order`,
  default `KAGGLE_CHANNEL_ORDER`), checked against the image contrast (`kaggle_order`).
* The background. Intensities may have been normalised per volume (or per slice), leaving the
  background a non-zero constant. Per channel and slice, the background is the most frequent value
  on the slice's in-plane border (the corners of an axial slice lie outside the head); the brain
  is any channel differing from its background, and background voxels are set to 0 before
  returning, because preprocessing expects a zero background.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from shards_spec.errors import SourceError, ToolError
from shards_spec.labels import CHANNELS, CONVENTION_OF_LAYOUT, encode_onehot

from .base import (MAX_PATIENT_BYTES, PatientRef, PatientVolume, Scan, SourceLayout, channel_problem,
                   geometry_warnings, patient_size_problem, skull_strip_warning)
from .kaggle_order import KAGGLE_CHANNEL_ORDER, KAGGLE_ORDERS, check_kaggle_channel_order, parse_order

SLICE_NAME = re.compile(r"^volume_(\d+)_slice_(\d+)\.h5$")
METADATA_FILES = ("meta_data.csv", "BraTS20 Training Metadata.csv")
GEOMETRY_NOTE = "the Kaggle export stores no geometry: affine is the identity, spacing assumed 1 mm"
BRAIN_MASK_RULE = "any channel differs from its detected background value; the background is then set to 0"
ORDER_OPTION = "kaggle_channel_order"

BACKGROUND_MIN_FRACTION = 0.5
"""A border's most frequent value is the background only if it covers at least this fraction of
the border voxels; a channel where neither a slice's border nor the whole volume's has such a
value keeps background 0 for that slice, with a warning."""


class KaggleLayout(SourceLayout):
    """The `kaggle-h5` layout: one folder of `volume_V_slice_S.h5` files, a patient per volume."""

    name = "kaggle-h5"
    label_convention = CONVENTION_OF_LAYOUT["kaggle-h5"]
    brain_mask_rule = BRAIN_MASK_RULE
    expected = "Kaggle volume_V_slice_S.h5 files"
    options = {ORDER_OPTION: KAGGLE_CHANNEL_ORDER}

    def is_data_file(self, name: str) -> bool:
        return bool(SLICE_NAME.match(name))

    def scan(self, root: Path, folders: list[Path], *, require_labels: bool, check_headers: bool,
             max_patient_bytes: int = MAX_PATIENT_BYTES) -> Scan:
        if len(folders) > 1:
            shown = ", ".join(str(f) for f in folders[:4])
            raise SourceError(f"several folders hold volume_V_slice_S.h5 files ({shown}): point the source at one", root)
        patients, problems, notes, inputs = scan_kaggle_folder(folders[0], root, check_headers, max_patient_bytes)
        patients.sort(key=lambda p: p.id)
        notes.append(f"kaggle-h5: {len(patients)} volume(s) ready, {len(problems)} problem(s)")
        return Scan(layout=self.name, root=root, patients=patients, unlabelled=[], problems=problems, notes=notes,
                    inputs=inputs)

    def load(self, ref: PatientRef, channels: list[str], *, require_labels: bool,
             max_patient_bytes: int = MAX_PATIENT_BYTES,
             kaggle_channel_order: Sequence[str] | str | None = None) -> PatientVolume:
        order = KAGGLE_CHANNEL_ORDER if kaggle_channel_order is None else kaggle_channel_order
        return load_kaggle_patient(ref, channels, order, require_labels, max_patient_bytes)

    def resolve_options(self, given: dict) -> dict:
        order = given.get(ORDER_OPTION)
        order = KAGGLE_CHANNEL_ORDER if order is None else tuple(order)
        problem = channel_problem(order)
        if problem:
            raise ToolError(f"--kaggle-channel-order: {problem}")
        if sorted(order) != sorted(CHANNELS):
            raise ToolError(f"--kaggle-channel-order must name all of {', '.join(CHANNELS)} once")
        return {ORDER_OPTION: order}

    def recorded_options(self, resolved: dict) -> dict:
        return {ORDER_OPTION: list(resolved[ORDER_OPTION])}

    def patient_of(self, name: str) -> str | None:
        match = SLICE_NAME.match(name)
        return f"volume_{int(match.group(1))}" if match else None


SOURCE = KaggleLayout()

__all__ = ["KAGGLE_CHANNEL_ORDER", "KAGGLE_ORDERS", "SOURCE", "check_kaggle_channel_order", "parse_order"]


# --------------------------------------------------------------------------------------- scan


def scan_kaggle_folder(data_dir: Path, root: Path, check_headers: bool, max_patient_bytes: int = MAX_PATIENT_BYTES):
    """(patients, problems, notes, inputs) of one folder of volume_V_slice_S.h5 files."""
    slices, problems = _list_slices(data_dir)
    notes: list[str] = []
    inputs: list[tuple[str, int]] = []
    if not slices:
        return [], problems, notes, inputs
    depth = Counter(max(s) + 1 for s in slices.values()).most_common(1)[0][0]
    metadata = _metadata_csv(data_dir, root)
    if metadata is not None:
        notes.append(f"Kaggle metadata CSV {metadata[0]} lists {metadata[1]} slices")
        inputs.append((metadata[0].name, metadata[0].stat().st_size))

    patients = []
    for volume in sorted(slices):
        have = slices[volume]
        name = f"volume_{volume}"
        missing = sorted(set(range(depth)) - set(have))
        extra = sorted(set(have) - set(range(depth)))
        if missing or extra:
            shown = ", ".join(map(str, (missing or extra)[:8])) + (" ..." if len(missing or extra) > 8 else "")
            what = "is missing slice(s)" if missing else "has slice(s) beyond"
            problems.append(
                SourceError(
                    f"{name} {what} {shown} (expected slices 0..{depth - 1}, as most volumes have)",
                    data_dir / f"{name}_slice_{(missing or extra)[0]}.h5",
                )
            )
            continue
        empty = [s for s in sorted(have) if have[s] == 0]
        if empty:
            problems.append(SourceError("empty file (0 bytes)", data_dir / f"{name}_slice_{empty[0]}.h5"))
            continue
        first = data_dir / f"{name}_slice_0.h5"
        if check_headers:
            try:
                handle, image, _ = _slice_shapes(first, None)
                with handle:
                    too_big = patient_size_problem((*image.shape[:2], depth), first, max_patient_bytes)
                if too_big:
                    raise too_big
            except SourceError as exc:
                problems.append(exc)
                continue
        patients.append(
            PatientRef(
                id=name,
                layout="kaggle-h5",
                files={"slices": str(data_dir)},
                grade=None,
                meta={"volume": volume, "slices": depth, "geometry": GEOMETRY_NOTE},
            )
        )
        inputs.extend((f"{name}_slice_{s}.h5", have[s]) for s in sorted(have))
    notes.append(GEOMETRY_NOTE)
    return patients, problems, notes, inputs


def _list_slices(data_dir: Path) -> tuple[dict[int, dict[int, int]], list[SourceError]]:
    """(volume -> slice -> file size, slice entries whose type or size cannot be read)."""
    slices: dict[int, dict[int, int]] = {}
    problems: list[SourceError] = []
    try:
        with os.scandir(data_dir) as it:
            for entry in it:
                m = SLICE_NAME.match(entry.name)
                if not m:
                    continue
                try:
                    if entry.is_file():
                        slices.setdefault(int(m.group(1)), {})[int(m.group(2))] = entry.stat().st_size
                    elif not entry.is_dir():
                        problems.append(SourceError("is a symbolic link to nothing", entry.path))
                except OSError as exc:
                    problems.append(SourceError(f"cannot be read ({exc.strerror or exc})", entry.path))
    except OSError as exc:
        problems.append(SourceError(f"cannot be listed ({exc.strerror or exc})", data_dir))
    return slices, problems


def _metadata_csv(data_dir: Path, root: Path) -> tuple[Path, int] | None:
    """The export's metadata CSV beside the data or in an ancestor up to `root`: (path, rows)."""
    folder = data_dir
    while True:
        for name in METADATA_FILES:
            path = folder / name
            if path.is_file():
                return path, _check_metadata(path)
        if folder == root or folder.parent == folder or root not in folder.parents:
            return None
        folder = folder.parent


def _check_metadata(path: Path) -> int:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            if "volume" not in header or "slice" not in header:
                raise SourceError("malformed Kaggle metadata CSV: no 'volume' and 'slice' columns", path)
            return sum(1 for row in reader if row)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"malformed Kaggle metadata CSV ({exc})", path) from None


def _slice_shapes(path: Path, expect: tuple[int, int] | None):
    """Open one slice and check its datasets; returns (h5 file, image dataset, mask dataset)."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise SourceError(f"not a readable HDF5 file ({exc})", path) from None
    try:
        missing = [k for k in ("image", "mask") if handle.get(k, getlink=True) is None]
        if missing:
            raise SourceError(f"has no {' or '.join(repr(k) for k in missing)} dataset (keys: {list(handle)})", path)
        image, mask = _stored_dataset(handle, "image", path), _stored_dataset(handle, "mask", path)
        if image.ndim != 3 or image.shape[2] != 4:
            raise SourceError(f"image has shape {image.shape}, expected (H, W, 4)", path)
        if mask.ndim != 3 or mask.shape[2] != 3 or mask.shape[:2] != image.shape[:2]:
            raise SourceError(f"mask has shape {mask.shape}, expected {image.shape[:2] + (3,)}", path)
        if expect is not None and image.shape[:2] != expect:
            raise SourceError(f"slice is {image.shape[0]}x{image.shape[1]}, the volume's first is {expect[0]}x{expect[1]}", path)
    except BaseException:
        handle.close()
        raise
    return handle, image, mask


def _stored_dataset(handle, key: str, path: Path):
    """`handle[key]` if it is a dataset whose data lie inside this file, else a SourceError.

    HDF5 can point a dataset at other files: an external link (`/image` -> another .h5), a
    virtual dataset (mapped from other files), or external storage (raw bytes of any file, by
    path and offset). Followed, any of them reads a file the user never meant to put into shards
    (`/etc/passwd`, a key), so only hard links to contiguous, chunked or compact datasets (all
    stored in the file itself) are read, checked before a byte of data is."""
    import h5py

    link = handle.get(key, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise SourceError(f"{key!r} is an HDF5 external link to {link.filename}:{link.path}; only data stored "
                          "inside the file are read", path)
    if not isinstance(link, h5py.HardLink):
        raise SourceError(f"{key!r} is an HDF5 {type(link).__name__}; only datasets stored inside the file are read",
                          path)
    dataset = handle[key]
    if not isinstance(dataset, h5py.Dataset):
        raise SourceError(f"{key!r} is not a dataset", path)
    if dataset.is_virtual:
        raise SourceError(f"{key!r} is an HDF5 virtual dataset (its data lie in other files); only data stored "
                          "inside the file are read", path)
    external = dataset.external
    if external:
        raise SourceError(f"{key!r} uses HDF5 external storage ({os.fsdecode(external[0][0])}); only data stored inside the "
                          "file are read", path)
    layout = dataset.id.get_create_plist().get_layout()
    if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT):
        raise SourceError(f"{key!r} has an HDF5 storage layout ({layout}) other than contiguous, chunked or compact",
                          path)
    return dataset


# --------------------------------------------------------------------------------------- load


def load_kaggle_patient(
    ref: PatientRef, channels: list[str], order: Sequence[str] | str, require_labels: bool,
    max_patient_bytes: int = MAX_PATIENT_BYTES,
) -> PatientVolume:
    """Read one volume's slices, find and zero its background, check the channel order."""
    order = parse_order(order)
    raw, labels, dtype = _read_volume(ref, max_patient_bytes)
    brain, warnings, notes = _zero_background(raw, order, ref.id)
    shape = tuple(int(s) for s in raw.shape[1:])
    warnings += geometry_warnings(shape, None)
    strip = skull_strip_warning(brain)
    if strip:
        warnings.append(strip)
    contradiction = check_kaggle_channel_order(raw, labels, order, brain=brain)
    if contradiction:
        warnings.append(contradiction)

    volume = raw[[order.index(ch) for ch in channels]]
    return PatientVolume(
        volume=volume,
        brain=brain,
        labels=labels,
        affine=np.eye(4, dtype=np.float64),
        spacing=(1.0, 1.0, 1.0),
        shape=shape,  # type: ignore[arg-type]
        warnings=warnings,
        source_dtype=dtype,
        notes=notes,
    )


def _read_volume(ref: PatientRef, max_patient_bytes: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(stored channels (4, H, W, D) float32, label map (H, W, D), image dtype) of one volume."""
    data_dir = Path(ref.files["slices"])
    volume_no, depth = int(ref.meta["volume"]), int(ref.meta["slices"])

    def slice_path(s: int) -> Path:
        return data_dir / f"volume_{volume_no}_slice_{s}.h5"

    # Stored as (4, D, H, W) and (D, H, W, 3) so each slice is one contiguous copy; the returned
    # (4, H, W, D) view keeps every axial slice contiguous, like a NIfTI channel.
    planes = masks = None
    dtype = "unknown"
    for s in range(depth):
        path = slice_path(s)
        handle, image_ds, mask_ds = _slice_shapes(path, None if planes is None else planes.shape[2:])
        with handle:
            too_big = None if planes is not None else \
                patient_size_problem((*image_ds.shape[:2], depth), path, max_patient_bytes)
            if too_big:  # from the declared shape, before a voxel is read
                raise too_big
            try:
                image, mask = image_ds[()], mask_ds[()]
            except (OSError, ValueError, TypeError) as exc:
                raise SourceError(f"cannot read the slice data, the file may be truncated ({exc})", path) from None
        if planes is None:
            planes = np.empty((4, depth, *image.shape[:2]), dtype=np.float32)
            masks = np.empty((depth, *mask.shape), dtype=mask.dtype)
            dtype = str(image.dtype)
        if not np.issubdtype(image.dtype, np.number):
            raise SourceError(f"image has non-numeric dtype {image.dtype}", path)
        planes[:, s] = image.transpose(2, 0, 1)
        if not np.isfinite(planes[:, s]).all():
            raise SourceError("image holds non-finite values (NaN or inf, or beyond float32)", path)
        if mask.dtype != masks.dtype:
            encode_onehot(mask, path)  # a cast into the first slice's dtype must not hide bad values
        masks[s] = mask
    if planes is None:
        raise SourceError(f"{ref.id} has no slices", data_dir)
    try:
        labels = encode_mask_volume(masks).transpose(1, 2, 0)
    except SourceError:
        for s in range(depth):  # find the slice to name
            encode_onehot(masks[s], slice_path(s))
        raise
    return planes.transpose(0, 2, 3, 1), labels, dtype


def _zero_background(raw: np.ndarray, order: Sequence[str], pid: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Set each channel's detected background to 0 in place; return (brain, warnings, notes)."""
    warnings: list[str] = []
    notes: list[str] = []
    background = find_background(raw)  # (C, D)
    for c, name in enumerate(order):
        if np.isnan(background[c]).any():
            warnings.append(
                f"stored channel {name}: no constant background on the slice borders; "
                "background taken as 0 (the brain mask may include non-brain voxels)"
            )
    background = np.nan_to_num(background, nan=0.0).astype(np.float32)
    brain = np.zeros(raw.shape[1:], dtype=bool)
    for c in range(len(raw)):
        brain |= raw[c] != background[c]
    outside = ~brain
    for c in range(len(raw)):
        np.copyto(raw[c], 0.0, where=outside)
    if np.any(background != 0):
        notes.append(f"{pid}: non-zero background ({_describe_background(order, background)}) detected and set to 0")
    return brain, warnings, notes


def encode_mask_volume(masks: np.ndarray) -> np.ndarray:
    """`encode_onehot` for a whole volume (..., 3), fast: it maps the distinct channel patterns.

    With 0/1 masks every voxel's pattern is a 3-bit code; `encode_onehot` validates and maps the
    (at most 8) distinct patterns and a table applies them, instead of ~1 s of full-size
    temporaries. Other values go to `encode_onehot` whole, which raises its error.
    """
    if masks.dtype == np.uint8 or masks.dtype == np.bool_:
        small = masks.view(np.uint8)
        if small.size and small.max() <= 1:
            codes = small[..., 0] | (small[..., 1] << 1) | (small[..., 2] << 2)
            present = np.flatnonzero(np.bincount(codes.ravel(), minlength=8))
            patterns = ((present[:, None] >> np.arange(3)) & 1).astype(np.uint8)
            table = np.zeros(8, dtype=np.uint8)
            table[present] = encode_onehot(patterns)
            return table[codes]
    return encode_onehot(masks)


def find_background(raw: np.ndarray) -> np.ndarray:
    """Background value of each channel and slice of (C, H, W, D): float64 (C, D), NaN if none.

    The background of a slice is the most frequent value on its in-plane border when it covers at
    least BACKGROUND_MIN_FRACTION of it (per-slice normalisation gives each slice its own
    constant); a slice whose border is mostly head takes the volume's most frequent border value.
    """
    channels, _, _, depth = raw.shape
    out = np.full((channels, depth), np.nan)
    for c in range(channels):
        border = np.concatenate([raw[c, 0], raw[c, -1], raw[c, 1:-1, 0], raw[c, 1:-1, -1]])  # (n, D)
        whole_value, whole_share = _mode(border.ravel())
        for d in range(depth):
            value, share = _mode(border[:, d])
            if share >= BACKGROUND_MIN_FRACTION:
                out[c, d] = value
            elif whole_share >= BACKGROUND_MIN_FRACTION:
                out[c, d] = whole_value
    return out


def _mode(values: np.ndarray) -> tuple[float, float]:
    uniques, counts = np.unique(values, return_counts=True)
    best = int(np.argmax(counts))
    return float(uniques[best]), float(counts[best]) / max(values.size, 1)


def _describe_background(order: Sequence[str], background: np.ndarray) -> str:
    parts = []
    for name, values in zip(order, background):
        lo, hi = float(values.min()), float(values.max())
        parts.append(f"{name}={lo:g}" if lo == hi else f"{name}={lo:g}..{hi:g} by slice")
    return ", ".join(parts)
