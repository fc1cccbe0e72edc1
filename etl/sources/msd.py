"""The Medical Segmentation Decathlon's `Task01_BrainTumour`: 4D NIfTI images described by dataset.json.

    Task01_BrainTumour/
        dataset.json                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                                    "labels": {"0": "background", "1": "edema",
                                               "2": "non-enhancing tumor", "3": "enhancing tumour"}
        imagesTr/BRATS_001.nii.gz   (H, W, D, 4): the last axis holds the modalities in "modality" order
        labelsTr/BRATS_001.nii.gz   (H, W, D), values as "labels" names them
        imagesTs/BRATS_485.nii.gz   no labels: like a validation set

The modality order and the label values are read from dataset.json, never assumed (the MSD
relabelled BraTS: its 1 is edema and 2 the non-enhancing core, our 2 and 1): a dataset.json
without either map, or naming a modality or a label we do not know, is refused in one line. The
release's archive holds macOS `._BRATS_NNN.nii.gz` resource forks beside the images: hidden files,
skipped with a note.

A patient's `files` name its 4D image under every modality it holds (and `seg`); `meta` records
each modality's index on the last axis (`channel_index`) and the label values (`labels`), so
loading, `train predict` and writing labels back need nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards_spec.checked_io import cut, read_json, shown
from shards_spec.errors import SourceError
from shards_spec.labels import CHANNELS, CONVENTION_OF_LAYOUT, Convention, convention_from_names
from shards_spec.preprocess import brain_mask

from .base import (BYTES_PER_VOXEL, MAX_PATIENT_BYTES, PatientRef, PatientVolume, Scan, SourceLayout,
                   geometry_warnings, patient_size_problem, safe_id, skull_strip_warning)
from .nifti import BRAIN_MASK_RULE, list_files, nifti_stem
from .nifti_volume import (READ_ERRORS, fmt_shape, load_header, read_labels, spatial_shape, truncation_problem,
                           whole_gzip)

DATASET_JSON = "dataset.json"
TRAINING, LABELS, TEST = "imagesTr", "labelsTr", "imagesTs"
MAX_DESCRIPTION_BYTES = 16 << 20
"""dataset.json is read whole; the release's is 70 KB."""

MODALITY_NAMES: dict[str, str] = {
    "flair": "flair", "t2flair": "flair", "t2f": "flair",
    "t1": "t1", "t1w": "t1", "t1n": "t1", "nativet1": "t1",
    "t1gd": "t1ce", "t1ce": "t1ce", "t1c": "t1ce", "t1post": "t1ce", "t1contrast": "t1ce",
    "t2": "t2", "t2w": "t2",
}
"""Modality names as dataset.json files write them (lower case, without spaces, '-' or '_') -> ours."""


class MsdLayout(SourceLayout):
    """The `msd` layout: the folder holding dataset.json (the task folder) is the source."""

    name = "msd"
    label_convention = CONVENTION_OF_LAYOUT["msd"]
    brain_mask_rule = BRAIN_MASK_RULE
    expected = "an MSD Task01_BrainTumour folder (dataset.json, imagesTr/)"

    def is_data_file(self, name: str) -> bool:
        return name == DATASET_JSON

    def scan(self, root: Path, folders: list[Path], *, require_labels: bool, check_headers: bool,
             max_patient_bytes: int = MAX_PATIENT_BYTES) -> Scan:
        if len(folders) > 1:
            shown = ", ".join(str(f) for f in folders[:4])
            raise SourceError(f"several folders hold a {DATASET_JSON} ({shown}): point --src at one task folder", root)
        return scan_msd(folders[0], root, require_labels, check_headers, max_patient_bytes)

    def load(self, ref: PatientRef, channels: list[str], *, require_labels: bool,
             max_patient_bytes: int = MAX_PATIENT_BYTES, **options) -> PatientVolume:
        return load_msd_patient(ref, channels, require_labels, max_patient_bytes)

    def convention_of(self, ref: PatientRef) -> Convention:
        return {int(value): label for value, label in ref.meta["labels"].items()}

    def patient_of(self, name: str) -> str | None:
        stem = nifti_stem(name)
        return safe_id(stem) if stem and not name.startswith(".") else None


SOURCE = MsdLayout()


# ------------------------------------------------------------------------------ dataset.json


def read_description(path: Path) -> tuple[dict[str, int], dict[int, int]]:
    """(our modality -> index on the images' last axis, source label value -> shard label) from an
    MSD dataset.json; SourceError naming it when it is not one we can read."""
    data = read_json(path, MAX_DESCRIPTION_BYTES, SourceError, "; an MSD dataset.json is a few KB")
    if not isinstance(data, dict):
        raise SourceError("is not a JSON object", path)
    for key, what in (("modality", "the modality at each index of the 4D images' last axis"),
                      ("labels", "the meaning of each label value")):
        if not isinstance(data.get(key), dict):
            hint = " (it has \"channel_names\": an nnU-Net v2 dataset.json, not the MSD's)" \
                if "channel_names" in data else ""
            raise SourceError(f'has no "{key}" map: an MSD dataset.json names {what}{hint}', path)
    channel_index = parse_modalities(data["modality"], path)
    try:
        labels = convention_from_names(data["labels"])
    except ValueError as exc:
        raise SourceError(f'"labels": {cut(str(exc), 200)}', path) from None
    return channel_index, labels


def parse_modalities(modality: dict, path: Path) -> dict[str, int]:
    """{"0": "FLAIR", ...} -> {"flair": 0, ...}; indices 0..n-1, each of our modalities at most once."""
    if sorted(modality) != [str(i) for i in range(len(modality))]:
        raise SourceError(f'"modality": its keys must be the indices 0..{len(modality) - 1}, got '
                          f"{shown(list(modality))}", path)
    index: dict[str, int] = {}
    for key, name in sorted(modality.items(), key=lambda item: int(item[0])):
        ours = MODALITY_NAMES.get("".join(c for c in name.lower() if c not in " -_")) if isinstance(name, str) else None
        if ours is None:
            raise SourceError(f'"modality": {key} is {shown(name)}, which is none of FLAIR, T1w, T1gd, T2w '
                              f"(the modalities are {', '.join(CHANNELS)})", path)
        if ours in index:
            raise SourceError(f'"modality": {ours} is named twice (indices {index[ours]} and {key})', path)
        index[ours] = int(key)
    return {m: index[m] for m in CHANNELS if m in index}


# ------------------------------------------------------------------------------ scan


def scan_msd(task: Path, root: Path, require_labels: bool, check_headers: bool, max_patient_bytes: int) -> Scan:
    """Every case of the task folder: imagesTr (with labelsTr) and imagesTs."""
    description = task / DATASET_JSON
    channel_index, labels = read_description(description)
    scan = Scan(layout=SOURCE.name, root=root, patients=[], unlabelled=[], problems=[], notes=[])
    scan.inputs.append((DATASET_JSON, description.stat().st_size))
    if not (task / TRAINING).is_dir() and not (task / TEST).is_dir():
        raise SourceError(f"holds a {DATASET_JSON} but no {TRAINING}/ or {TEST}/ folder of images", task)
    training, testing, annotated = (_cases(task / sub, scan) for sub in (TRAINING, TEST, LABELS))
    meta = {"channel_index": channel_index, "labels": {str(k): v for k, v in labels.items()}}
    for pid in sorted(set(annotated) - set(training)):
        scan.problems.append(SourceError(f"has no image in {TRAINING}/", annotated[pid][0]))
    for pid in sorted(set(training) & set(testing)):
        scan.problems.append(SourceError(f"case {pid} is present twice (also {training[pid][0]})", testing[pid][0]))
    cases = [(pid, entry, annotated.get(pid), TRAINING) for pid, entry in training.items()]
    cases += [(pid, entry, None, TEST) for pid, entry in testing.items() if pid not in training]
    for pid, (image, size), seg, sub in sorted(cases):
        problems = _check_case(image, seg[0] if seg else None, len(channel_index), max_patient_bytes) \
            if check_headers else []
        if problems:
            scan.problems += problems
            continue
        if seg is None and require_labels:
            scan.unlabelled.append(str(image))
            continue
        files = {m: str(image) for m in channel_index}
        if seg:
            files["seg"] = str(seg[0])
        scan.patients.append(PatientRef(id=pid, layout=SOURCE.name, files=files,
                                        meta={"folder": str(task / sub), **meta}))
        scan.inputs += [(f"{sub}/{image.name}", size)] + ([(f"{LABELS}/{seg[0].name}", seg[1])] if seg else [])
    order = ", ".join(f"{m}={i}" for m, i in channel_index.items())
    scan.notes.append(f"msd: {task / DATASET_JSON}: modalities {order} on the images' last axis, labels "
                      + ", ".join(f"{v}->{k}" for v, k in sorted(labels.items())) + " (source value -> ours)")
    scan.notes.append(f"msd: {len(scan.patients)} patient(s) ready, {len(scan.problems)} problem(s), "
                      f"{len(scan.unlabelled)} without labels" + (" (left out)" if scan.unlabelled else ""))
    return scan


def _cases(folder: Path, scan: Scan) -> dict[str, tuple[Path, int]]:
    """Case id -> (NIfTI file, size) in `folder` (missing: none); problems and notes into `scan`."""
    if not folder.is_dir():
        return {}
    try:
        entries, unread = list_files(folder)
    except OSError as exc:
        scan.problems.append(SourceError(f"cannot be listed ({exc.strerror or exc})", folder))
        return {}
    scan.problems += unread
    forks = sorted(name for name in entries if name.startswith("._"))
    if forks:
        scan.notes.append(f"msd: {folder.name}/: skipped {len(forks)} macOS '._' resource-fork file(s) (not images)")
    cases: dict[str, tuple[Path, int]] = {}
    for name in sorted(entries):
        stem = nifti_stem(name)
        if stem is None or name.startswith("."):
            continue
        pid = safe_id(stem)
        if pid in cases:
            scan.problems.append(SourceError(f"case {pid} is present twice (also {cases[pid][0].name}): "
                                             "remove one copy", folder / name))
            continue
        if entries[name] == 0:
            scan.problems.append(SourceError("empty file (0 bytes)", folder / name))
        cases[pid] = (folder / name, entries[name])
    return cases


def _check_case(image: Path, seg: Path | None, channels: int, max_patient_bytes: int) -> list[SourceError]:
    """Header-level checks of one case: a 4D image with `channels` volumes, a 3D label of its shape."""
    try:
        shape, _ = image_header(image, channels, max_patient_bytes)
    except SourceError as exc:
        return [exc]
    if seg is None:
        return []
    try:
        header = load_header(str(seg))
    except SourceError as exc:
        return [exc]
    seg_shape = spatial_shape(header.shape, str(seg))
    if isinstance(seg_shape, SourceError):
        return [seg_shape]
    if seg_shape != shape:
        return [SourceError(f"label shape {fmt_shape(seg_shape)} differs from the image's {fmt_shape(shape)}", seg)]
    return _truncated(header, seg_shape, seg)


def image_header(path: Path, channels: int, max_patient_bytes: int):
    """((H, W, D), the nibabel image) of a 4D MSD image holding `channels` volumes, header only;
    SourceError when it is not one, or when loading it would need more than `max_patient_bytes`."""
    img = load_header(str(path))
    shape = tuple(int(n) for n in img.shape)
    if len(shape) != 4 or shape[3] != channels:
        raise SourceError(f"image of shape {fmt_shape(shape)}: expected 4D with the {channels} modalities "
                          f"{DATASET_JSON} names on its last axis", path)
    # the decompressed file is held while its volumes are copied out, beside what a 3D layout needs
    per_voxel = BYTES_PER_VOXEL + channels * img.header.get_data_dtype().itemsize
    too_big = patient_size_problem(shape[:3], path, max_patient_bytes, per_voxel)
    if too_big:
        raise too_big
    problems = _truncated(img, shape, path)
    if problems:
        raise problems[0]
    return shape[:3], img


def _truncated(img, shape: tuple[int, ...], path: Path) -> list[SourceError]:
    problem = truncation_problem(img, shape, path, path.stat().st_size)
    return [problem] if problem else []


# ------------------------------------------------------------------------------ load


def load_msd_patient(ref: PatientRef, channels: list[str], require_labels: bool,
                     max_patient_bytes: int = MAX_PATIENT_BYTES) -> PatientVolume:
    """Read one case: its modalities out of the 4D image in `channels` order, its labels mapped.

    The brain mask is "any modality non-zero" over every modality the image holds, as for the
    BraTS releases, so a two-channel build sees the mask a four-channel one does."""
    index = {m: int(i) for m, i in ref.meta["channel_index"].items()}
    path = Path(ref.files[next(iter(index))])  # every modality names the one 4D image
    for ch in channels:
        if ch not in index:
            raise SourceError(f"patient {ref.id} has no {ch} image ({DATASET_JSON} names "
                              f"{', '.join(index)})", path)
    if require_labels and "seg" not in ref.files:
        raise SourceError(f"patient {ref.id} has no label file in {LABELS}/", path)
    shape, img = image_header(path, len(index), max_patient_bytes)
    img = whole_gzip(img, str(path), "image")
    order = list(channels) + [m for m in CHANNELS if m in index and m not in channels]
    # each channel Fortran-ordered, as NIfTI stores it: an axial slice [..., d] is contiguous
    stack = np.empty((len(order), *shape[::-1]), dtype=np.float32).transpose(0, 3, 2, 1)
    for i, m in enumerate(order):
        _read_channel(stack[i], img, index[m], path)
    brain = brain_mask(stack)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    warnings = geometry_warnings(shape, spacing)
    strip = skull_strip_warning(brain)
    if strip:
        warnings.append(strip)
    labels = read_labels(ref.files["seg"], SOURCE.convention_of(ref), shape) if "seg" in ref.files else None
    return PatientVolume(volume=stack[: len(channels)], brain=brain, labels=labels,
                         affine=np.asarray(img.affine, dtype=np.float64), spacing=spacing,  # type: ignore[arg-type]
                         shape=shape, warnings=warnings, source_dtype=str(img.get_data_dtype()))


def _read_channel(out: np.ndarray, img, index: int, path: Path) -> None:
    """Volume `index` of the 4D image (scaled by scl_slope/inter) into float32 `out`."""
    try:
        np.copyto(out, np.asanyarray(img.dataobj[..., index]), casting="unsafe")
    except READ_ERRORS as exc:
        raise SourceError(f"cannot read the image data, the file may be truncated or corrupt "
                          f"({type(exc).__name__}: {exc})", path) from None
    if not np.isfinite(out).all():
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise SourceError(f"image volume {index} holds {bad} non-finite value(s) (NaN or inf, or beyond float32)",
                          path)


__all__ = ["DATASET_JSON", "MODALITY_NAMES", "SOURCE", "MsdLayout", "load_msd_patient", "read_description",
           "scan_msd"]
