"""Run configuration: a variant preset, then the user's overrides, validated, saved beside the run.

Resolution order (timm's `args.yaml`, nanoGPT's config dict, not a subclass per setting):

    COMMON  <-  PRESETS[variant]  <-  options given on the command line

and when resuming, the run's saved `config.json` takes the place of the first two, so that
`train run --out runs/a --resume --epochs 80` only changes what it names. The result is a frozen
`Config`; `config.json` holds it with the preset name, the overrides as given and the
manifest's content digest.

Presets (README "train run"):

    v1: unet,           t1ce + flair,            loss dice,     augmentation none
    v2: attention_unet, t1 + t1ce + t2 + flair,  loss dice_bce, augmentation light

Both: the BraTS regions as outputs (`--target regions`: WT, TC, ET; NEC/NET = TC - ET), tumour
slices twice per epoch (`--oversample-tumour 2`), Adam, a warm-up then cosine decay per step (or
`--schedule plateau`: ReduceLROnPlateau on the validation mean Dice), outputs started at their
class prior, checkpoint every epoch, best by mean Dice. Sizes (width, stem, batch, loader workers)
default per device (`DEVICE_DEFAULTS`). Each of these was measured against the seed's choices
with bench/quality.py (README "Quality").

Every problem is a `ConfigError` naming the command-line option (`--epochs: must be >= 1, got
0`), so the CLI prints one line.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from shards_spec.errors import ToolError
from shards_spec.labels import CHANNELS, TARGETS

from .budget import parse_duration

MAX_CONTEXT = 3
"""`--context`: at most this many neighbouring slices on each side as 2.5D input."""

SCHEDULES = ("cosine", "poly", "plateau")
HEAD_BIASES = ("prior", "zero")

DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"base": 32, "stem": 2, "batch_size": 16, "workers": 1},
    "cuda": {"base": 32, "stem": 1, "batch_size": 32, "workers": 2},
}
"""Sizes that fit the device, under the preset and the options given. On a CUDA GPU (a T4) the
seed's U-Net (base 32, every level at full resolution, batch 32, fp16 autocast). On a CPU the same
width with a stride-2 first convolution (`--stem 2`: 4.96 instead of 18.5 GFLOP per 128² slice)
and batch 16, which reached the best validation patients' Dice in a fixed number of CPU minutes
of everything `bench/quality.py` tried (README "Quality"); with bf16 autocast where the CPU computes bf16
natively (`engine.autocast_dtype`), which is not a size and so not in this table."""
VAL_SPLIT = re.compile(r"^(val|fold\d+)$")

PRESETS: dict[str, dict[str, Any]] = {
    "v1": {"model": "unet", "channels": ["t1ce", "flair"], "loss": "dice", "augment": "none"},
    "v2": {"model": "attention_unet", "channels": list(CHANNELS), "loss": "dice_bce", "augment": "light"},
}

RESUME_MAY_CHANGE = frozenset({"epochs", "time_budget", "workers", "device", "cache_dir", "shards", "out", "report",
                               "on_bad_shard", "early_stop"})
"""Options a resumed run may change without `--force`: where and how long, not what is trained.
`shards` is the location only; the data themselves are compared by manifest digest."""


class ConfigError(ToolError):
    """A bad option value or combination; the message starts with the option's name."""


def option_name(field_name: str) -> str:
    """The command-line spelling of a `Config` field (`batch_size` -> `--batch-size`)."""
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class Config:
    """Everything that defines a run. Field names are the CLI options with '-' -> '_'."""

    variant: str
    shards: str
    out: str
    model: str
    channels: tuple[str, ...]
    loss: str
    augment: str
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    val_split: str = "val"
    target: str = "regions"
    oversample_tumour: int = 2
    base: int = 32
    depth: int = 4
    batch_norm: bool = True
    shuffle_buffer: int = 2000
    time_budget: str | None = None
    cache_dir: str | None = None
    amp: bool = True
    amp_dtype: str = "auto"
    report: bool = True
    on_bad_shard: str = "fail"
    schedule: str = "cosine"
    warmup: int = 100
    early_stop: int | None = None
    head_bias: str = "prior"
    stem: int = 1
    deep_supervision: bool = False
    context: int = 0

    # ------------------------------------------------------------ derived values

    @property
    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"base": self.base, "depth": self.depth, "batch_norm": self.batch_norm}
        if self.stem != 1:  # only when used, so checkpoints of models without the options still load
            kwargs["stem"] = self.stem
        if self.deep_supervision:
            kwargs["deep_supervision"] = True
        return kwargs

    @property
    def in_channels(self) -> int:
        """The model's input channels: each channel of the slice and of its 2K neighbours (2.5D)."""
        return len(self.channels) * (2 * self.context + 1)

    @property
    def time_budget_seconds(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["channels"] = list(self.channels)
        return out


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _defaults() -> dict[str, Any]:
    return {
        name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for name, f in FIELDS.items()
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def resolve(overrides: dict[str, Any], saved: dict[str, Any] | None = None, device_kind: str = "cpu") -> Config:
    """Preset (or the saved config when resuming) + overrides -> a validated `Config`.

    `overrides` holds only the options the user gave (None values are ignored), keyed by field
    name. Unknown keys are refused, naming the option. A new run takes the sizes of
    `DEVICE_DEFAULTS[device_kind]` ("cpu" or "cuda") between the common defaults and the preset.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in given:
        if key not in FIELDS:
            raise ConfigError(f"{option_name(key)}: unknown option")
    if saved is not None:
        values = {k: v for k, v in saved.items() if k in FIELDS}
        values.update(given)
    else:
        variant = given.get("variant")
        if variant is None:
            raise ConfigError("--variant: required for a new run (v1 or v2)")
        if variant not in PRESETS:
            raise ConfigError(f"--variant: must be one of {sorted(PRESETS)}, got {variant!r}")
        if device_kind not in DEVICE_DEFAULTS:
            raise ValueError(f"device_kind must be one of {list(DEVICE_DEFAULTS)}, got {device_kind!r}")
        values = {**_defaults(), **DEVICE_DEFAULTS[device_kind], **PRESETS[variant], **given}
    values.setdefault("out", None)
    if values.get("shards") is None:
        raise ConfigError("--shards: required (a shard folder or URL holding manifest.json)")
    if values["out"] is None:
        raise ConfigError("--out: required")
    if isinstance(values.get("channels"), str):
        values["channels"] = [c.strip() for c in values["channels"].split(",") if c.strip()]
    values["channels"] = tuple(values["channels"])
    missing = [name for name, f in FIELDS.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{option_name(missing[0])}: missing from the configuration")
    config = Config(**values)
    validate(config)
    return config


def _choice(config: Config, name: str, allowed: tuple[str, ...] | list[str]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ConfigError(f"{option_name(name)}: must be one of {list(allowed)}, got {value!r}")


def _at_least(config: Config, name: str, low: float, kind: type = int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ConfigError(f"{option_name(name)}: must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if value < low:
        raise ConfigError(f"{option_name(name)}: must be >= {low}, got {value}")


def _check_device(device: object) -> None:
    """`--device` spelling (auto, cpu, cuda, cuda:N, mps; `train.devices`): whether it is there is
    asked when the run starts."""
    from .devices import DeviceError, check

    try:
        check(device)
    except DeviceError as exc:
        raise ConfigError(str(exc)) from None


def validate(config: Config) -> None:
    """Check every field; raise `ConfigError` naming the first bad option."""
    from .augment import AUGMENTATIONS
    from .data import POLICIES
    from .engine import AMP_DTYPES
    from .losses import LOSSES
    from .models import MODELS

    _choice(config, "variant", sorted(PRESETS))
    _choice(config, "model", sorted(MODELS))
    _choice(config, "loss", sorted(LOSSES))
    _choice(config, "augment", list(AUGMENTATIONS))
    _check_device(config.device)
    _choice(config, "target", TARGETS)
    _choice(config, "amp_dtype", AMP_DTYPES)
    _choice(config, "on_bad_shard", POLICIES)
    _choice(config, "schedule", SCHEDULES)
    _choice(config, "head_bias", HEAD_BIASES)
    if config.stem not in (1, 2) or isinstance(config.stem, bool):
        raise ConfigError(f"--stem: must be 1 (none) or 2 (a stride-2 first convolution), got {config.stem!r}")
    channels = list(config.channels)
    if not channels or len(set(channels)) != len(channels) or any(c not in CHANNELS for c in channels):
        raise ConfigError(f"--channels: must be distinct names from {list(CHANNELS)}, got {channels}")
    if not VAL_SPLIT.match(str(config.val_split)):
        raise ConfigError(f"--val-split: must be 'val' or 'foldK' (fold0, fold1, ...), got {config.val_split!r}")
    for name in ("epochs", "batch_size", "base", "depth", "oversample_tumour", "shuffle_buffer",
                 "plateau_patience"):
        _at_least(config, name, 1 if name != "plateau_patience" else 0)
    _at_least(config, "workers", 0)
    _at_least(config, "warmup", 0)
    _at_least(config, "context", 0)
    if config.context > MAX_CONTEXT:
        raise ConfigError(f"--context: must be in 0..{MAX_CONTEXT} (neighbours on each side), got {config.context}")
    if config.early_stop is not None:
        _at_least(config, "early_stop", 1)
    _at_least(config, "seed", 0)
    _at_least(config, "lr", 0.0, float)
    if not config.lr > 0:
        raise ConfigError(f"--lr: must be > 0, got {config.lr}")
    _at_least(config, "weight_decay", 0.0, float)
    _at_least(config, "plateau_factor", 0.0, float)
    if not 0 < config.plateau_factor < 1:
        raise ConfigError(f"--plateau-factor: must be in (0, 1), got {config.plateau_factor}")
    for name in ("batch_norm", "amp", "report", "deep_supervision"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{option_name(name)}: must be true or false, got {getattr(config, name)!r}")
    if config.time_budget is not None:
        try:
            parse_duration(config.time_budget)
        except ValueError as exc:
            raise ConfigError(f"--time-budget: {exc}") from None


def check_against_manifest(config: Config, manifest: Any) -> None:
    """Options that only the data can check: channels present, validation split present."""
    missing = [c for c in config.channels if c not in manifest.channels]
    if missing:
        raise ConfigError(f"--channels: {missing} not in these shards, which hold {manifest.channels}")
    if config.val_split not in manifest.splits:
        raise ConfigError(f"--val-split: {config.val_split!r} is not a split of these shards; they have {manifest.splits}")
    if config.val_split == "val" and "train" not in manifest.splits:
        raise ConfigError(f"--val-split: these shards have no 'train' split to train on ({manifest.splits}); use --val-split foldK")


def train_splits_of(config: Config, manifest: Any) -> list[str]:
    """`train` for `--val-split val`; every other fold for `--val-split foldK`."""
    if config.val_split == "val":
        return ["train"]
    folds = [s for s in manifest.splits if re.match(r"^fold\d+$", s) and s != config.val_split]
    if not folds:
        raise ConfigError(f"--val-split: no other fold to train on besides {config.val_split!r} ({manifest.splits})")
    return folds


def differences(saved: dict[str, Any], config: Config) -> list[str]:
    """Options that differ from a saved run's and may not change on resume without `--force`."""
    now = config.to_dict()
    changed = []
    for name in FIELDS:
        if name in RESUME_MAY_CHANGE:
            continue
        before = saved.get(name)
        if name == "channels" and before is not None:
            before = list(before)
        if before != now[name]:
            changed.append(f"{option_name(name)} {before!r} -> {now[name]!r}")
    return changed


def config_record(config: Config, preset: str, overrides: dict[str, Any], manifest_digest: str) -> dict[str, Any]:
    """What `config.json` holds: the resolved config, how it was made, the data it was made on."""
    return {
        "config": config.to_dict(),
        "preset": preset,
        "overrides": {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items() if v is not None},
        "manifest_digest": manifest_digest,
    }
