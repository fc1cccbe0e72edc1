"""Run configuration: a variant preset, then the user's overrides, validated, saved beside the run.

Resolution order (timm's `args.yaml`, nanoGPT's config dict, not a subclass per setting):

    COMMON  <-  PRESETS[variant]  <-  options given on the command line

and when resuming, the run's saved `config.json` takes the place of the first two, so that
`train run --out runs/a --resume --epochs 80` only changes what it names. The result is a frozen
`Config`; `config.json` holds it with the preset name, the overrides as given and the
manifest's content digest.

Presets (docs/commands.md, `train run`):

    v1: unet,           t1ce + flair,            loss dice,     augmentation none
    v2: attention_unet, t1 + t1ce + t2 + flair,  loss dice_bce, augmentation light

Both: the BraTS regions as outputs (`--target regions`: WT, TC, ET; NEC/NET = TC - ET), tumour
slices twice per epoch (`--oversample-tumour 2`), Adam, a warm-up then cosine decay per step (or
`--schedule plateau`: ReduceLROnPlateau on the validation mean Dice), outputs started at their
class prior, checkpoint every epoch, best by mean Dice. Sizes (width, stem, batch, loader workers)
default per device (`DEVICE_DEFAULTS`). Each of these was measured against the seed's choices
with bench/quality.py (docs/quality.md).

Every problem is a `ConfigError` naming the command-line option (`--epochs: must be in
1..100000, got 0`), so the CLI prints one line. Every numeric option has its range in one table,
`NUMBERS`, checked for a value from the command line, a `--config` file or a saved run alike.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from shards_spec.checked_io import cut, shown
from shards_spec.errors import ToolError
from shards_spec.labels import CHANNELS, TARGETS

from ..models import MODELS
from ..recipe.augment import AUGMENTATIONS
from ..recipe.losses import LOSSES
from ..recipe.schedules import SCHEDULES
from ..runtime.devices import DeviceError, check
from .durations import parse_duration

MAX_CONTEXT = 3
"""`--context`: at most this many neighbouring slices on each side as 2.5D input."""


def stacked_channels(channels: int, context: int) -> int:
    """The model's input channels with 2.5D input: each channel of the slice and of its `context`
    neighbours on each side (`train.data.slices.stack_context` stacks them in this number)."""
    return channels * (2 * context + 1)

INT64_MAX = 2**63 - 1
"""Integers reach torch and numpy as int64 (the seed: `torch.manual_seed`, `torch.Generator`)."""
MAX_EPOCHS = 100_000
MAX_STEPS = 1_000_000_000
MAX_OVERSAMPLE = 100


@dataclass(frozen=True)
class Range:
    """The values a numeric option may take: `low` to `high`, each end included unless `open_low`
    / `open_high`. A float option must also be finite: nan passes every comparison's negation
    (`nan < 0` is False) and inf trains to NaN."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False
    hint: str = ""

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def text(self, integer: bool) -> str:
        if integer:
            span = f"{self.low}..{self.high}"
        else:
            span = f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        return f"{span} ({self.hint})" if self.hint else span


NUMBERS: dict[str, Range] = {
    "epochs": Range(1, MAX_EPOCHS),
    "batch_size": Range(1, INT64_MAX),  # the upper bounds of these five: train.runfiles.checkpoint.LIMITS (fit.check_sizes)
    "base": Range(1, INT64_MAX),
    "depth": Range(1, INT64_MAX),
    "shuffle_buffer": Range(1, INT64_MAX),
    "workers": Range(0, INT64_MAX),
    "lr": Range(0, 1, open_low=True, hint="Adam's step size"),
    "weight_decay": Range(0, 1),
    "plateau_factor": Range(0, 1, open_low=True, open_high=True),
    "plateau_patience": Range(0, MAX_EPOCHS),
    "seed": Range(0, INT64_MAX),
    "oversample_tumour": Range(1, MAX_OVERSAMPLE),
    "warmup": Range(0, MAX_STEPS),
    "early_stop": Range(1, MAX_EPOCHS),
    "stem": Range(1, 2, hint="1: none, 2: a stride-2 first convolution"),
    "context": Range(0, MAX_CONTEXT, hint="neighbouring slices on each side"),
}
"""Every int and float option of `Config` and the values it may take (a test checks that none is
missing): the one place a number from the command line, a --config file or a saved run is checked."""

POLICIES = ("fail", "skip")
"""`--on-bad-shard`: stop at the first bad shard, or leave bad shards out and count them."""
AMP_DTYPES = ("auto", "float16", "bfloat16")
"""`--amp-dtype`: auto is fp16 on CUDA, bf16 on a CPU that computes it natively (`engine.autocast_dtype`)."""
HEAD_BIASES = ("prior", "zero")

DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"base": 32, "stem": 2, "batch_size": 16, "workers": 1},
    "cuda": {"base": 32, "stem": 1, "batch_size": 32, "workers": 2},
}
"""Sizes that fit the device, under the preset and the options given. On a CUDA GPU (a T4) the
seed's U-Net (base 32, every level at full resolution, batch 32, fp16 autocast). On a CPU the same
width with a stride-2 first convolution (`--stem 2`: 4.96 instead of 18.5 GFLOP per 128² slice)
and batch 16, which reached the best validation patients' Dice in a fixed number of CPU minutes
of everything `bench/quality.py` tried (docs/quality.md); with bf16 autocast where the CPU computes bf16
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
        return stacked_channels(len(self.channels), self.context)

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
            raise ConfigError(f"--variant: must be one of {sorted(PRESETS)}, got {shown(variant)}")
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
        raise ConfigError(f"{option_name(name)}: must be one of {list(allowed)}, got {shown(value)}")


def number_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for the numeric option `name` (`NUMBERS`), or None (also for a
    non-numeric option, and for None where the option is optional)."""
    bounds = NUMBERS.get(name)
    if bounds is None:
        return None
    annotation = str(FIELDS[name].type)
    if value is None and "None" in annotation:
        return None
    integer = annotation.startswith("int")
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"must be {'an integer' if integer else 'a number'}, got {shown(value)}"
    if not integer:
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond any float
            finite = False
        if not finite:
            return f"must be a finite number in {bounds.text(False)}, got {shown(value)}"
    if value not in bounds:
        return f"must be in {bounds.text(integer)}, got {shown(value)}"
    return None


def _check_device(device: object) -> None:
    """`--device` spelling (auto, cpu, cuda, cuda:N, mps; `train.runtime.devices`): whether it is there is
    asked when the run starts."""

    try:
        check(device)
    except DeviceError as exc:
        raise ConfigError(cut(str(exc), 200)) from None


def validate(config: Config) -> None:
    """Check every field; raise `ConfigError` naming the first bad option."""

    _choice(config, "variant", sorted(PRESETS))
    _choice(config, "model", sorted(MODELS))
    _choice(config, "loss", sorted(LOSSES))
    _choice(config, "augment", list(AUGMENTATIONS))
    _check_device(config.device)
    _choice(config, "target", TARGETS)
    _choice(config, "amp_dtype", AMP_DTYPES)
    _choice(config, "on_bad_shard", POLICIES)
    _choice(config, "schedule", list(SCHEDULES))
    _choice(config, "head_bias", HEAD_BIASES)
    for name in NUMBERS:
        problem = number_problem(name, getattr(config, name))
        if problem is not None:
            raise ConfigError(f"{option_name(name)}: {problem}")
    channels = list(config.channels)
    if not channels or len(set(channels)) != len(channels) or any(c not in CHANNELS for c in channels):
        raise ConfigError(f"--channels: must be distinct names from {list(CHANNELS)}, got {shown(channels)}")
    if not VAL_SPLIT.match(str(config.val_split)):
        raise ConfigError(f"--val-split: must be 'val' or 'foldK' (fold0, fold1, ...), got {shown(config.val_split)}")
    for name in ("batch_norm", "amp", "report", "deep_supervision"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{option_name(name)}: must be true or false, got {shown(getattr(config, name))}")
    if config.time_budget is not None:
        try:
            parse_duration(config.time_budget)
        except ValueError as exc:
            raise ConfigError(f"--time-budget: {cut(str(exc), 200)}") from None


def check_against_manifest(config: Config, manifest: Any) -> None:
    """Options that only the data can check: channels present, validation split present."""
    missing = [c for c in config.channels if c not in manifest.channels]
    if missing:
        raise ConfigError(f"--channels: {missing} not in these shards, which hold {manifest.channels}")
    if config.val_split not in manifest.splits:
        raise ConfigError(f"--val-split: {shown(config.val_split)} is not a split of these shards; they have {manifest.splits}")
    if config.val_split == "val" and "train" not in manifest.splits:
        raise ConfigError(f"--val-split: these shards have no 'train' split to train on ({manifest.splits}); use --val-split foldK")


def train_splits_of(config: Config, manifest: Any) -> list[str]:
    """`train` for `--val-split val`; every other fold for `--val-split foldK`."""
    if config.val_split == "val":
        return ["train"]
    folds = [s for s in manifest.splits if re.match(r"^fold\d+$", s) and s != config.val_split]
    if not folds:
        raise ConfigError(f"--val-split: no other fold to train on besides {shown(config.val_split)} ({manifest.splits})")
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
            changed.append(f"{option_name(name)} {shown(before)} -> {shown(now[name])}")
    return changed


def config_record(config: Config, preset: str, overrides: dict[str, Any], manifest_digest: str) -> dict[str, Any]:
    """What `config.json` holds: the resolved config, how it was made, the data it was made on."""
    return {
        "config": config.to_dict(),
        "preset": preset,
        "overrides": {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items() if v is not None},
        "manifest_digest": manifest_digest,
    }
