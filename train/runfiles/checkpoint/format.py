"""What a checkpoint holds, and how the model it describes is built and described.

Keys (`FORMAT` "brats-train-checkpoint/1"; `resume.payload` writes them):

    format, epoch (completed epochs), state (see `RunState`), variant, model {name, kwargs,
    in_channels, out_channels}, model_state, channels, target, preprocessing (manifest
    content's), labels, manifest_digest, config (dict), optimizer, scheduler, scaler,
    rng {torch, cuda, numpy, python, augmenter}, best_mean_dice, best_epoch, steps,
    schedule_steps, epoch_step, epoch_loss, stale, val_seconds, history (one dict per completed
    epoch: the metrics.csv rows), epoch_seconds, versions {torch}

The config `train export` writes beside an exported model repeats the keys a model is described
by (`ModelDescription.record`: model, channels, target, preprocessing, labels, manifest_digest,
epoch, variant, best_mean_dice, config), so `describe` reads either, once `check_description` has
passed it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from shards_spec.errors import ToolError
from shards_spec.labels import target_names

from ...config.options import stacked_channels
from ...models import MODELS, build_model

FORMAT = "brats-train-checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"
REQUIRED = ("format", "epoch", "state", "model", "model_state", "channels", "target", "manifest_digest", "config")
OUT_CHANNELS = 3
DEFAULT_DEPTH = 4
"""The U-Nets' down-sampling levels when a model's kwargs do not name them."""


class CheckpointError(ToolError):
    """A file that is not a readable checkpoint of this tool, or one that does not fit the run."""


class RunState(str, enum.Enum):
    """Where a run stands, as recorded in its last checkpoint.

    Transitions (the training loop makes exactly these, each by writing last.pt at the end of
    an epoch):

        (no checkpoint) --epoch done--> RUNNING --epoch done--> RUNNING ...
        RUNNING --the last requested epoch done--> FINISHED
        FINISHED --`--resume --epochs M` (M larger), epoch done--> RUNNING or FINISHED

    Nothing else writes a checkpoint. The time budget stops before an epoch, so last.pt stays
    RUNNING (resumable as it is); a signal (SIGINT/SIGTERM) stops inside an epoch, the partial
    epoch is lost and last.pt stays whatever the last completed epoch wrote.
    """

    RUNNING = "running"
    FINISHED = "finished"


def model_spec(config: Any) -> dict[str, Any]:
    """The `model` entry of a run's checkpoint: what `build_model` is called with for `config`
    (a `train.config.options.Config`)."""
    return {"name": config.model, "kwargs": config.model_kwargs, "in_channels": config.in_channels,
            "out_channels": OUT_CHANNELS}


# ---------------------------------------------------------------- the description of a model


@dataclass(frozen=True)
class ModelDescription:
    """What a checked checkpoint (or an exported config) says about its model and its inputs:
    all `train predict`, `evaluate` and `export` need besides the weights."""

    model: dict  # {name, kwargs, in_channels, out_channels}
    channels: list[str]  # input channels, in the model's order
    target: str  # "classes" or "regions"
    size: int  # shard grid (size x size)
    norm: str  # "slice" or "volume"
    context: int  # 2.5D: neighbours on each side stacked after the slice's own channels
    preprocessing: dict  # the manifest's preprocessing record
    labels: dict
    manifest_digest: str
    epoch: int
    variant: str | None
    best_mean_dice: float | None  # None before any validation (or not a finite number)
    config: dict  # the run's resolved options
    warnings: list[str] = field(default_factory=list)

    @property
    def in_channels(self) -> int:
        return stacked_channels(len(self.channels), self.context)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Names of the three output channels."""
        return target_names(self.target)

    @property
    def spatial_multiple(self) -> int:
        """What the input's height and width must be a multiple of: 2**depth, once more for a stride-2 stem."""
        kwargs = self.model["kwargs"]
        return 2 ** (int(kwargs.get("depth", DEFAULT_DEPTH)) + (int(kwargs.get("stem", 1)) == 2))

    def record(self) -> dict[str, Any]:
        """The description as the plain keys a checkpoint and an exported config share."""
        return {"model": {**self.model, "kwargs": dict(self.model["kwargs"])}, "channels": list(self.channels),
                "target": self.target, "preprocessing": dict(self.preprocessing), "labels": dict(self.labels),
                "manifest_digest": self.manifest_digest, "epoch": self.epoch, "variant": self.variant,
                "best_mean_dice": self.best_mean_dice, "config": dict(self.config)}


KAGGLE_WARNING = ("the checkpoint was trained on shards of the Kaggle 2D export, whose brain mask is detected from "
                  "a possibly non-zero background; NIfTI inputs use 'any modality non-zero'")


def describe(payload: dict[str, Any]) -> ModelDescription:
    """The description of a checkpoint or an exported config that `check_description` passed
    (`load` and `train.runfiles.onnx_check.load_checked` run it), so nothing here is guessed."""
    spec, channels = payload["model"], [str(c) for c in payload["channels"]]
    preprocessing, config = dict(payload["preprocessing"]), dict(payload["config"])
    best = payload.get("best_mean_dice")
    warnings = [KAGGLE_WARNING] if "kaggle" in str(preprocessing.get("brain_mask", "")).lower() else []
    return ModelDescription(
        model={"name": str(spec["name"]), "kwargs": dict(spec.get("kwargs") or {}),
               "in_channels": int(spec.get("in_channels", len(channels))),
               "out_channels": int(spec.get("out_channels", OUT_CHANNELS))},
        channels=channels, target=str(payload["target"]), size=int(preprocessing["size"]),
        norm=str(preprocessing["norm"]), context=int(config.get("context", 0)), preprocessing=preprocessing,
        labels=dict(payload.get("labels") or {}), manifest_digest=str(payload["manifest_digest"]),
        epoch=int(payload["epoch"]), variant=payload.get("variant"),
        best_mean_dice=None if best is None or not math.isfinite(float(best)) else float(best),
        config=config, warnings=warnings)


# ---------------------------------------------------------------- the model it describes


def meta_model(spec: dict[str, Any], path: object) -> Any:
    """The model `spec` describes, built on torch's `meta` device: shapes without memory."""
    import torch

    if spec["name"] not in MODELS:
        raise CheckpointError(f"its model {spec['name']!r} is not one of the registered {sorted(MODELS)}", path)
    try:
        with torch.device("meta"):
            return build_model(spec["name"], in_channels=int(spec.get("in_channels", 1)),
                               out_channels=OUT_CHANNELS, **dict(spec.get("kwargs") or {}))
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"its model description {spec['name']!r} {shown(spec.get('kwargs'))} cannot be "
                              f"built ({reason})", path) from None


def build_model_of(payload: dict, where: object) -> Any:
    """The checkpoint's model with its weights, in eval mode on the CPU (`predict`, `evaluate`, `export`):
    call it after `load`, whose checks make building it cost what the file holds."""
    spec = payload["model"]
    try:
        model = build_model(str(spec["name"]), in_channels=int(spec.get("in_channels", len(payload["channels"]))),
                            out_channels=int(spec.get("out_channels", OUT_CHANNELS)), **dict(spec.get("kwargs") or {}))
        model.load_state_dict(payload["model_state"])
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint weights do not fit its model {spec.get('name')!r} ({reason[:160]})",
                              where) from None
    return model.eval()


def shown(value: Any) -> str:
    """A value for a message, at most 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
