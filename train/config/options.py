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

Every option is declared once, as a field of `Config` (`train.config.schema`: type, default, help,
range or choices); `check_option` checks a value by that declaration, for the command line, a
`--config` file or a saved run alike, and looks the choices of a registry-backed option (`--model`,
`--loss`, `--augment`, `--schedule`) up in its registry (`REGISTRIES`). Every problem is a
`ConfigError` naming the command-line option (`--epochs: must be in 1..100000, got 0`), so the CLI
prints one line.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from shards_spec.checked_io import shown

from ..models import MODELS
from ..recipe.augment import AUGMENTATIONS
from ..recipe.losses import LOSSES
from ..recipe.schedules import SCHEDULES
from .schema import (
    AMP_DTYPES,
    DEVICE_DEFAULTS,
    FIELDS,
    HEAD_BIASES,
    INT64_MAX,
    MAX_CONTEXT,
    MAX_EPOCHS,
    MAX_OVERSAMPLE,
    MAX_STEPS,
    NUMBERS,
    POLICIES,
    PRESETS,
    VAL_SPLIT,
    Config,
    ConfigError,
    Range,
    number_problem,
    option_name,
    option_problem,
    parse_channels,
    stacked_channels,
)

REGISTRIES: dict[str, Any] = {
    "models": lambda: sorted(MODELS),
    "losses": lambda: sorted(LOSSES),
    "augmentations": lambda: list(AUGMENTATIONS),
    "schedules": lambda: list(SCHEDULES),
}
"""The names a registry-backed option may take (`option(registry=...)`), read when a value is
checked, so that a name registered by then is accepted."""

RESUME_MAY_CHANGE = frozenset({"epochs", "time_budget", "workers", "threads", "device", "cache_dir", "shards", "out",
                               "report", "on_bad_shard", "early_stop"})
"""Options a resumed run may change without `--force`: where and how long, not what is trained.
`shards` is the location only; the data themselves are compared by manifest digest."""


def choices_of(name: str) -> list[str] | tuple[str, ...] | None:
    """The words option `name` may take: its registry's names now, or its declared choices."""
    metadata = FIELDS[name].metadata
    return REGISTRIES[metadata["registry"]]() if metadata["registry"] else metadata["choices"]


def check_option(name: str, value: Any) -> None:
    """Refuse a value that the declaration of option `name` (`train.config.schema`) does not allow,
    in one line naming it (`--epochs: must be in 1..100000, got 0`): `train run`'s check, which
    `train evaluate` and `predict` use for the options they share with it."""
    problem = option_problem(name, value, choices_of(name))
    if problem is not None:
        raise ConfigError(f"{option_name(name)}: {problem}")


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
    `DEVICE_DEFAULTS[device_kind]` ("cpu", "cpu-fp32" or "cuda": `devices.defaults_kind`) between
    the common defaults and the preset.
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
        check_option("variant", variant)
        if device_kind not in DEVICE_DEFAULTS:
            raise ValueError(f"device_kind must be one of {list(DEVICE_DEFAULTS)}, got {device_kind!r}")
        values = {**_defaults(), **DEVICE_DEFAULTS[device_kind], **PRESETS[variant], **given}
    values.setdefault("out", None)
    if values.get("shards") is None:
        raise ConfigError("--shards: required (a shard folder or URL holding manifest.json)")
    if values["out"] is None:
        raise ConfigError("--out: required")
    values["channels"] = tuple(parse_channels(values["channels"]))
    missing = [name for name, f in FIELDS.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{option_name(missing[0])}: missing from the configuration")
    config = Config(**values)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check every option by its declaration, in their order; raise `ConfigError` naming the first bad one."""
    for name in FIELDS:
        check_option(name, getattr(config, name))


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


__all__ = ["AMP_DTYPES", "DEVICE_DEFAULTS", "FIELDS", "HEAD_BIASES", "INT64_MAX", "MAX_CONTEXT", "MAX_EPOCHS",
           "MAX_OVERSAMPLE", "MAX_STEPS", "NUMBERS", "POLICIES", "PRESETS", "REGISTRIES", "RESUME_MAY_CHANGE",
           "VAL_SPLIT", "Config", "ConfigError", "Range", "check_against_manifest", "check_option", "choices_of",
           "config_record", "differences", "number_problem", "option_name", "resolve", "stacked_channels",
           "train_splits_of", "validate"]
