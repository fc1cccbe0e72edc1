"""Applying a checkpoint to whole volumes: the one home of it, for `train predict` and `train evaluate --src`.

A volume goes through the very recipe the ETL cut the shards with, then back, in this order:

1. load the model and what it was trained on from the checkpoint (`load_model`, from
   `train.runfiles.checkpoint.describe`): architecture, channels (by name), target (classes or
   regions), and the manifest's preprocessing (`size`, `norm`); nothing else is needed, nothing
   is guessed;
2. preprocess the patient with `shards_spec.preprocess.preprocess_volume` and those settings,
   keeping every axial slice (`keep_empty=True`), so each native slice gets a prediction; the
   brain mask is the source reader's (any modality non-zero), exactly as the ETL used it;
3. apply the model slice-batched (`predict_slices`): three sigmoid probabilities per voxel on the
   shard grid (float32; no autocast, so CPU and GPU agree to float rounding);
4. resize the probabilities back to the native in-plane grid (`shards_spec.preprocess.resize_back`,
   bilinear) — labels are decided after resizing, never resized themselves, so the label rule
   sees smooth probabilities on the grid it is scored on;
5. decide labels by the checkpoint's target (`train.metrics.probs_to_labels`, threshold 0.5:
   the nested regions, innermost first: ET, else NEC/NET where TC, else ED where WT; for
   `classes` the regions' probabilities are sums of the classes') and zero everything outside the
   native brain mask;
6. optionally, the BraTS post-processing (`train.apply.postprocess`): a patient whose predicted ET is
   smaller than `min_et_voxels` gets it relabelled NEC/NET.

Two options change step 3 (`InferenceOptions`; both measured in docs/quality.md): `tta`
averages the probabilities of the slice and its three mirror images (W, H, both), flipped back;
an ensemble (`load_ensemble`: several checkpoints of the same channels, target and
preprocessing, such as the folds of `--val-split foldK`) averages its members' probabilities.

An ONNX file from `train export` can stand in for the checkpoint in `predict` (`load_model(...,
onnx=True)`): step 1 then checks the file against the config stored in it and the limits
(`train.runfiles.onnx_check`: a file from someone else may ask onnxruntime for any amount of memory),
reads the same settings from that config and runs the network with onnxruntime (`OnnxModel`,
always `batch_size` images per call, the batch the check was made for); steps 2, 4 and 5 are
unchanged.

The result is a 0..3 label map (H, W, D) on the input's grid; `predict` maps it to the source
convention (`shards_spec.labels.decode_labels`) when writing NIfTI, `evaluate` scores it
against the original segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shards_spec.errors import ToolError
from shards_spec.labels import CHANNELS, target_names
from shards_spec.preprocess import preprocess_volume, resize_back

from ..config.options import stacked_channels
from ..data import stack_volume
from ..metrics import THRESHOLD, probs_to_labels
from ..runfiles import checkpoint as ckpt
from ..runfiles.export import ExportError
from ..runfiles.onnx_check import load_checked
from ..runtime.devices import check as check_device, resolve
from ..runtime.extras import require
from .postprocess import relabel_small_et

"""Probability above which a channel (or a region's summed class probabilities) counts as present."""


class InferenceError(ToolError):
    """A checkpoint that cannot be applied to this input (channels, shapes, settings)."""


@dataclass(frozen=True)
class InferenceOptions:
    """How probabilities are made and labels decided beyond the checkpoint itself."""

    tta: bool = False  # average the four mirrorings (none, W, H, both)
    min_et_voxels: int = 0  # BraTS post-processing: ET below this many native voxels becomes NEC/NET

    def describe(self) -> str:
        parts = ["mirroring TTA" if self.tta else "no TTA"]
        parts.append(f"ET below {self.min_et_voxels} voxels -> NEC/NET" if self.min_et_voxels else "no post-processing")
        return ", ".join(parts)


@dataclass
class LoadedModel:
    """A model ready for inference plus everything the checkpoint says about its inputs."""

    model: Any  # torch.nn.Module in eval mode on `device`, or an `OnnxModel`
    device: Any  # torch.device (for an `OnnxModel`: where onnxruntime runs it)
    path: Path
    channels: list[str]  # input channels, in the model's order
    target: str  # "classes" or "regions"
    size: int  # shard grid (size x size)
    norm: str  # "slice" or "volume"
    preprocessing: dict  # the manifest's preprocessing record
    manifest_digest: str
    epoch: int
    variant: str | None
    config: dict
    best_mean_dice: float | None = None
    warnings: list[str] = field(default_factory=list)
    members: list = field(default_factory=list)  # every model whose probabilities are averaged (`model` first)
    options: InferenceOptions = InferenceOptions()
    context: int = 0  # 2.5D: neighbours on each side stacked after the slice's own channels

    @classmethod
    def described(cls, description: ckpt.ModelDescription, path: Path) -> LoadedModel:
        """What a checkpoint or an exported config describes (`checkpoint.describe`), its model not yet built."""
        d = description
        return cls(model=None, device=None, path=path, channels=list(d.channels), target=d.target, size=d.size,
                   norm=d.norm, preprocessing=dict(d.preprocessing), manifest_digest=d.manifest_digest, epoch=d.epoch,
                   variant=d.variant, config=dict(d.config), best_mean_dice=d.best_mean_dice,
                   warnings=list(d.warnings), context=d.context)

    @property
    def in_channels(self) -> int:
        return stacked_channels(len(self.channels), self.context)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Names of the three output channels."""
        return target_names(self.target)


@dataclass
class VolumePrediction:
    """A whole patient predicted on its native grid."""

    labels: np.ndarray  # uint8 (H, W, D) label map 0..3, 0 outside the brain
    probabilities: np.ndarray | None  # float32 (3, H, W, D), 0 outside the brain; None unless asked
    channel_names: tuple[str, ...]  # names of the probability channels


def resolve_device(device: str) -> Any:
    """The torch device of `--device` (auto, cpu, cuda, cuda:N, mps: `train.runtime.devices.resolve`);
    one clear line when it is misspelt or not on this machine."""

    return resolve(device)


def load_model(path: str | Path, device: str = "auto", *, onnx: bool = False, batch_size: int = 32) -> LoadedModel:
    """Read a checkpoint (weights_only) and build its model in eval mode on `device`; with `onnx`,
    a `.onnx` file from `train export` is checked and run by onnxruntime instead (`load_onnx`,
    `batch_size` images per call)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if not onnx:
            raise InferenceError("an ONNX model is accepted by `train predict` only; give the .pt checkpoint", path)
        return load_onnx(path, device, batch_size)
    payload = ckpt.load(path)
    loaded = LoadedModel.described(ckpt.describe(payload), path)
    torch_device = resolve_device(device)
    loaded.model, loaded.device = ckpt.build_model_of(payload, path).to(torch_device), torch_device
    loaded.members = [loaded.model]
    return loaded


ENSEMBLE_KEYS = ("channels", "target", "size", "norm", "context")


def checkpoint_paths(checkpoint: str | Path | Sequence[str | Path]) -> list[Path]:
    """One `--checkpoint` or several (an ensemble) as a list of paths."""
    if isinstance(checkpoint, (str, Path)):
        return [Path(checkpoint)]
    return [Path(p) for p in checkpoint]


def load_ensemble(paths: Sequence[str | Path], device: str = "auto", *, onnx: bool = False,
                  options: InferenceOptions = InferenceOptions(), batch_size: int = 32) -> LoadedModel:
    """One model, or several averaged: the first checkpoint describes the inputs; every other must
    take the same channels, target and preprocessing (refused in one line otherwise)."""
    paths = list(paths)
    if not paths:
        raise InferenceError("--checkpoint: give at least one")
    loaded = [load_model(p, device, onnx=onnx, batch_size=batch_size) for p in paths]
    first = loaded[0]
    for other in loaded[1:]:
        differs = [k for k in ENSEMBLE_KEYS if getattr(other, k) != getattr(first, k)]
        if other.preprocessing.get("brain_mask") != first.preprocessing.get("brain_mask"):
            differs.append("brain mask")
        if differs:
            raise InferenceError(f"cannot be ensembled with {first.path}: its {', '.join(differs)} differ", other.path)
        first.members.append(other.model)
        first.warnings += [w for w in other.warnings if w not in first.warnings]
    first.options = options
    return first


class OnnxModel:
    """A checked ONNX model run by onnxruntime: images (B, C, H, W) -> sigmoid probabilities, as
    `apply_model` gives for the torch model; no torch model is built. Every call to onnxruntime
    gets exactly `batch` images (a shorter batch is padded with zeros), the input its sizes were
    checked for (`train.runfiles.onnx_check`)."""

    def __init__(self, session: Any, batch: int) -> None:
        self.session = session
        self.batch = batch
        self.input = session.get_inputs()[0].name
        self.output = session.get_outputs()[0].name

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        import torch

        images = np.asarray(images, dtype=np.float32)
        out = []
        for start in range(0, len(images), self.batch):
            part = images[start:start + self.batch]
            feed = np.zeros((self.batch, *images.shape[1:]), dtype=np.float32)
            feed[:len(part)] = part
            logits = self.session.run([self.output], {self.input: feed})[0][:len(part)]
            out.append(torch.sigmoid(torch.from_numpy(logits).float()).numpy())  # the very sigmoid of the torch path
        return np.concatenate(out) if out else np.zeros((0, 3, *images.shape[2:]), dtype=np.float32)


def load_onnx(path: Path, device: str = "auto", batch_size: int = 32) -> LoadedModel:
    """An `.onnx` file from `train export`, checked against the config stored in it (or beside it)
    and the limits before onnxruntime sees it (`train.runfiles.onnx_check`), run `batch_size` images per call."""
    import torch


    ort = require("onnxruntime", "export", "an ONNX model")
    if batch_size < 1:
        raise InferenceError(f"--batch-size: must be >= 1, got {batch_size}")
    checked = load_checked(path, batch_size)  # its config passed `checkpoint.check_description`
    loaded = LoadedModel.described(ckpt.describe(checked.config), path)
    check_device(device)
    if device == "mps":
        raise InferenceError("--device: mps runs torch checkpoints; onnxruntime runs on cpu or cuda")
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device.startswith("cuda") and not cuda:
        raise InferenceError(f"--device: {device} was asked for, but onnxruntime has no CUDA provider "
                             "(install onnxruntime-gpu, or use --device cpu or auto)")
    use_cuda = cuda and device != "cpu"
    gpu = int(device.partition(":")[2] or 0)
    providers = [("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"] if use_cuda \
        else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(checked.data, providers=providers)  # the bytes checked, not the path again
    except Exception as exc:  # onnxruntime's own error types (InvalidGraph, Fail, ...)
        raise ExportError(f"onnxruntime cannot load it ({str(exc).strip().splitlines()[0][:160]})", path) from None
    loaded.model = OnnxModel(session, checked.batch)
    loaded.members = [loaded.model]
    loaded.device = torch.device("cuda", gpu) if use_cuda else torch.device("cpu")
    return loaded


def apply_model(model: Any, batch: Any) -> Any:
    """Sigmoid probabilities (B, 3, H, W) of one batch of images (B, C, H, W) on the model's device."""
    import torch

    with torch.no_grad():
        return torch.sigmoid(model(batch).float())


MIRRORS = ((), (-1,), (-2,), (-2, -1))
"""Axes flipped by test-time augmentation: none, W, H, both."""


def predict_slices(loaded: LoadedModel, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities float32 (S, 3, size, size) of preprocessed slices (S, C', size, size), C' the
    model's input channels (2.5D stacks included: `train.data.stack_volume`): the mean over the
    ensemble's members and, with `options.tta`, over the mirrorings (each flipped back)."""
    if batch_size < 1:
        raise InferenceError(f"--batch-size: must be >= 1, got {batch_size}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != loaded.in_channels:
        raise InferenceError(f"slices of shape {images.shape} do not fit a model of {loaded.in_channels} "
                             f"channels ({','.join(loaded.channels)}, {loaded.context} neighbour(s) each side)")
    members = loaded.members or [loaded.model]
    mirrors = MIRRORS if loaded.options.tta else MIRRORS[:1]
    out = np.empty((images.shape[0], 3, *images.shape[2:]), dtype=np.float32)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].astype(np.float32)
        total = np.zeros((batch.shape[0], 3, *batch.shape[2:]), dtype=np.float64)
        for model in members:
            for axes in mirrors:
                view = np.flip(batch, axes) if axes else batch
                probs = _probabilities(model, loaded.device, np.ascontiguousarray(view))
                total += np.flip(probs, axes) if axes else probs
        out[start:start + batch_size] = total / (len(members) * len(mirrors))
    return out


def _probabilities(model: Any, device: Any, batch: np.ndarray) -> np.ndarray:
    if isinstance(model, OnnxModel):
        return model.probabilities(batch)
    import torch

    return apply_model(model, torch.from_numpy(batch).to(device)).cpu().numpy()


def context_window(image: np.ndarray, start: int, stop: int, context: int) -> np.ndarray:
    """Slices `start:stop` of a whole volume's preprocessed slices (D, C, H, W), each with its
    `context` neighbours on each side stacked after it (zeros beyond the volume), as training saw them."""
    if context == 0:
        return image[start:stop]

    low, high = max(0, start - context), min(len(image), stop + context)
    stacked = stack_volume(image[low:high], range(low, high), context)
    return stacked[start - low:stop - low]


def check_input_channels(loaded: LoadedModel, available: Sequence[str], where: object = None) -> None:
    """One clear line when the input lacks a channel the model was trained on."""
    missing = [c for c in loaded.channels if c not in available]
    if missing:
        raise InferenceError(
            f"the checkpoint was trained on {','.join(loaded.channels)} but the input has no "
            f"{','.join(missing)} (it has {','.join(c for c in CHANNELS if c in available) or 'none'})", where)


def predict_volume(loaded: LoadedModel, volume: np.ndarray, brain: np.ndarray, *, batch_size: int = 32,
                   probabilities: bool = False, threshold: float = THRESHOLD) -> VolumePrediction:
    """Predict one patient: `volume` float32 (C, H, W, D) in `loaded.channels` order, `brain`
    bool (H, W, D), both as the source reader returns them (see the module docstring)."""

    volume = np.asarray(volume)
    brain = np.asarray(brain, dtype=bool)
    if volume.ndim != 4 or volume.shape[0] != len(loaded.channels) or volume.shape[1:] != brain.shape:
        raise InferenceError(f"volume of shape {volume.shape} and brain mask {brain.shape} do not fit a model of "
                             f"{len(loaded.channels)} channels")
    height, width, depth = brain.shape
    slices = preprocess_volume(volume, brain, None, size=loaded.size, norm=loaded.norm, keep_empty=True)
    labels = np.zeros((height, width, depth), dtype=np.uint8)
    probs_out = np.zeros((3, height, width, depth), dtype=np.float32) if probabilities else None
    # Resize back and decide labels a chunk of slices at a time: bounds memory at 3 x H x W x chunk floats.
    chunk = max(1, batch_size)
    for start in range(0, depth, chunk):
        stop = min(depth, start + chunk)
        probs = predict_slices(loaded, context_window(slices.image, start, stop, loaded.context), batch_size)
        native = resize_back(probs, (height, width))  # (s, 3, H, W)
        native = np.clip(native, 0.0, 1.0)  # antialiased bilinear can overshoot by rounding
        decided = probs_to_labels(native, loaded.target, threshold=threshold, channel_axis=1)  # (s, H, W)
        labels[..., start:stop] = np.moveaxis(decided, 0, -1)
        if probs_out is not None:
            probs_out[..., start:stop] = np.moveaxis(native, 0, -1)
    labels[~brain] = 0
    if loaded.options.min_et_voxels:

        labels = relabel_small_et(labels, loaded.options.min_et_voxels)
    if probs_out is not None:
        probs_out[:, ~brain] = 0.0
    return VolumePrediction(labels=labels, probabilities=probs_out, channel_names=loaded.channel_names)


__all__ = [
    "InferenceError",
    "InferenceOptions",
    "LoadedModel",
    "OnnxModel",
    "THRESHOLD",
    "VolumePrediction",
    "apply_model",
    "check_input_channels",
    "checkpoint_paths",
    "load_ensemble",
    "load_model",
    "load_onnx",
    "predict_slices",
    "predict_volume",
    "resolve_device",
]
