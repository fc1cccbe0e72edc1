"""Presets, overrides, resume resolution and option-naming errors of `train.config.options`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from train.config.options import (
    PRESETS,
    ConfigError,
    check_against_manifest,
    config_record,
    differences,
    resolve,
    train_splits_of,
)

REQUIRED = {"shards": "shards/", "out": "runs/x"}


@pytest.mark.parametrize("variant,model,channels,loss,augment", [
    ("v1", "unet", ("t1ce", "flair"), "dice", "none"),
    ("v2", "attention_unet", ("t1", "t1ce", "t2", "flair"), "dice_bce", "light"),
])
def test_presets(variant, model, channels, loss, augment):
    config = resolve({**REQUIRED, "variant": variant})
    assert (config.model, config.channels, config.loss, config.augment) == (model, channels, loss, augment)
    # shared by both variants
    assert (config.epochs, config.val_split, config.target, config.amp) == (50, "val", "regions", True)
    assert config.oversample_tumour == 2 and config.schedule == "cosine" and config.head_bias == "prior"
    assert config.model_kwargs == {"base": 32, "depth": 4, "batch_norm": True, "stem": 2}  # the CPU defaults
    assert (config.batch_size, config.workers) == (16, 1)


def test_device_defaults_size_a_new_run_and_options_still_win():
    gpu = resolve({**REQUIRED, "variant": "v2"}, device_kind="cuda")
    assert (gpu.base, gpu.stem, gpu.batch_size, gpu.workers) == (32, 1, 32, 2)  # the seed's size on a GPU
    given = resolve({**REQUIRED, "variant": "v2", "base": 8, "batch_size": 4}, device_kind="cuda")
    assert (given.base, given.batch_size) == (8, 4)
    saved = resolve({"epochs": 3}, saved=gpu.to_dict())  # a resumed run keeps its own sizes on any device
    assert (saved.base, saved.batch_size, saved.epochs) == (32, 32, 3)
    with pytest.raises(ValueError, match="device_kind"):
        resolve({**REQUIRED, "variant": "v2"}, device_kind="tpu")


def test_overrides_apply_and_none_is_not_given():
    config = resolve({**REQUIRED, "variant": "v1", "model": "attention_unet", "channels": "t1, flair",
                      "epochs": 3, "lr": 0.01, "augment": "light", "base": 8, "time_budget": "90m",
                      "target": "regions", "val_split": "fold2", "batch_size": None})
    assert config.model == "attention_unet" and config.channels == ("t1", "flair")
    assert (config.epochs, config.lr, config.augment, config.base) == (3, 0.01, "light", 8)
    assert config.time_budget_seconds == 5400 and config.batch_size == 16  # the CPU default
    assert config.loss == "dice"  # untouched preset value
    assert PRESETS["v1"]["channels"] == ["t1ce", "flair"]  # presets are not mutated


@pytest.mark.parametrize("overrides,option", [
    ({"variant": "v3"}, "--variant"),
    ({"variant": "v1", "epochs": 0}, "--epochs"),
    ({"variant": "v1", "batch_size": -1}, "--batch-size"),
    ({"variant": "v1", "lr": 0.0}, "--lr"),
    ({"variant": "v1", "workers": -1}, "--workers"),
    ({"variant": "v1", "channels": "t1ce,dwi"}, "--channels"),
    ({"variant": "v1", "channels": "flair,flair"}, "--channels"),
    ({"variant": "v1", "val_split": "test"}, "--val-split"),
    ({"variant": "v1", "target": "labels"}, "--target"),
    ({"variant": "v1", "device": "tpu"}, "--device"),
    ({"variant": "v1", "time_budget": "12x"}, "--time-budget"),
    ({"variant": "v1", "time_budget": "0s"}, "--time-budget"),
    ({"variant": "v1", "model": "vit"}, "--model"),
    ({"variant": "v1", "loss": "focal"}, "--loss"),
    ({"variant": "v1", "amp_dtype": "int8"}, "--amp-dtype"),
    ({"variant": "v1", "oversample_tumour": 0}, "--oversample-tumour"),
    ({"variant": "v1", "epochs": 2.5}, "--epochs"),
    ({"variant": "v1", "colour": "red"}, "--colour"),
    ({}, "--variant"),
])
def test_errors_name_the_option(overrides, option):
    with pytest.raises(ConfigError) as info:
        resolve({**REQUIRED, **overrides})
    assert str(info.value).startswith(option + ":"), str(info.value)


def test_shards_and_out_are_required():
    with pytest.raises(ConfigError, match="^--shards:"):
        resolve({"variant": "v1", "out": "runs/x"})
    with pytest.raises(ConfigError, match="^--out:"):
        resolve({"variant": "v1", "shards": "s"})


def test_resume_takes_the_saved_config_and_reports_differences():
    saved = resolve({**REQUIRED, "variant": "v2", "lr": 0.01, "epochs": 5}).to_dict()
    resumed = resolve({"out": "runs/x", "epochs": 9, "workers": 0}, saved)
    assert (resumed.variant, resumed.lr, resumed.epochs, resumed.workers) == ("v2", 0.01, 9, 0)
    assert differences(saved, resumed) == []  # where and how long may change
    changed = differences(saved, resolve({"lr": 0.1, "augment": "none"}, saved))
    assert [c.split()[0] for c in changed] == ["--lr", "--augment"]  # in the options' order (train run --help)
    assert differences(saved, resolve({"shards": "https://elsewhere/shards"}, saved)) == []


def test_manifest_checks_and_fold_training_splits():
    manifest = SimpleNamespace(channels=["t1", "t1ce", "t2", "flair"], splits=["fold0", "fold1", "fold2"])
    config = resolve({**REQUIRED, "variant": "v1", "val_split": "fold1"})
    check_against_manifest(config, manifest)
    assert train_splits_of(config, manifest) == ["fold0", "fold2"]
    with pytest.raises(ConfigError, match="^--val-split:"):
        check_against_manifest(resolve({**REQUIRED, "variant": "v1"}), manifest)
    with pytest.raises(ConfigError, match="^--channels:"):
        check_against_manifest(config, SimpleNamespace(channels=["t1", "t2"], splits=manifest.splits))
    val = resolve({**REQUIRED, "variant": "v1"})
    assert train_splits_of(val, SimpleNamespace(channels=manifest.channels, splits=["train", "val"])) == ["train"]


def test_config_record_is_json_ready():
    import json

    config = resolve({**REQUIRED, "variant": "v1", "channels": "flair"})
    record = config_record(config, "v1", {"channels": ("flair",), "lr": None}, "ab" * 32)
    assert json.loads(json.dumps(record)) == record
    assert record["overrides"] == {"channels": ["flair"]} and record["manifest_digest"] == "ab" * 32
