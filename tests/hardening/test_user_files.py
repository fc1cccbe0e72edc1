"""Options and files a user hands over (issue 20, items 1 and 5), tried as an attacker would.

- class 1: every numeric `train run` option, from the command line or a `--config` file, is an
  integer or a finite number within its range (`train.config.options.NUMBERS`), refused in one line
  otherwise: a seed of 2**64 was a torch traceback, `weight-decay = nan` an Adam traceback and
  `lr = inf` a run that trained to NaN and exited 0;
- class 5: every JSON or TOML file a user hands over (a `--config`, nnU-Net's `splits_final.json`,
  the MSD's `dataset.json`) is read by one bounded, strict reader: nested 100,000 deep (200 KB,
  under every size limit) was a RecursionError traceback, a key given twice was taken silently,
  and a huge value was echoed whole in the error line;
- an `--out` that is a symbolic link leading nowhere (dangling, or a loop) is one line naming it,
  not "File exists" or a RuntimeError traceback, and the link is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from shards_spec.checked_io import MAX_DEPTH
from train.config.options import FIELDS, NUMBERS, ConfigError, resolve

from .conftest import BUILD_ARGS, SHAPE, TRAIN_ARGS
from .helpers import assert_one_line, run_cli_inprocess

DEEP = 100_000
"""Nesting of the crafted files: 200 KB of brackets, under every size limit."""
REQUIRED = {"variant": "v1", "shards": "shards/", "out": "runs/x"}


def _deep(kind: str) -> str:
    value = "[" * DEEP + "]" * DEEP
    return f'{{"epochs": {value}}}' if kind == "json" else f"epochs = {value}\n"


# ------------------------------------------------------------------ class 1: numeric options


def _numeric_fields() -> set[str]:
    return {name for name, f in FIELDS.items() if str(f.type).split(" |")[0] in ("int", "float")}


def test_every_numeric_option_has_a_range_that_refuses_what_torch_cannot_take():
    """One table covers every int and float option; each refuses a non-finite value, a value past
    either end and an integer beyond int64, and takes both closed ends (the control)."""
    assert set(NUMBERS) == _numeric_fields()
    for name, bounds in NUMBERS.items():
        integer = str(FIELDS[name].type).startswith("int")
        bad = [2**63, 2**64, bounds.low - 1] if integer else [math.nan, math.inf, -math.inf, bounds.high * 2 + 1]
        if bounds.open_low:
            bad.append(bounds.low)
        if bounds.open_high:
            bad.append(bounds.high)
        if bounds.high < 2**63 - 1:
            bad.append(bounds.high + 1)
        for value in bad:
            with pytest.raises(ConfigError) as info:
                resolve({**REQUIRED, name: value})
            assert str(info.value).startswith(f"--{name.replace('_', '-')}: must be"), (name, value, info.value)
        for value in (bounds.low, bounds.high):
            closed = not (bounds.open_low if value == bounds.low else bounds.open_high)
            if closed and value < 2**40:  # the sized options' int64 end is left to train.runfiles.checkpoint.LIMITS
                assert getattr(resolve({**REQUIRED, name: value}), name) == value, name


def test_bad_numbers_on_the_command_line_or_in_a_config_file_are_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli_inprocess("train", ["run", "--shards", tmp_path / "s", "--variant", "v1", "--out", out,
                                               "--seed", str(2**64)], capsys)
    assert_one_line(code, err, "--seed", "0..9223372036854775807")
    files = {
        "seed.toml": ("seed = 18446744073709551616\n", "seed: must be in 0.."),
        "decay.toml": ("weight-decay = nan\n", "weight-decay: must be a finite number"),
        "lr.toml": ("lr = inf\n", "lr: must be a finite number"),
        "lr.json": ('{"lr": 1e400}', "lr: must be a finite number"),
        "huge-int.json": ('{"lr": ' + "9" * 400 + "}", "lr: must be a finite number"),
        "epochs.json": ('{"epochs": 1e400}', "epochs: must be an integer"),
    }
    for name, (text, fragment) in files.items():
        path = tmp_path / name
        path.write_text(text)
        code, _, err = run_cli_inprocess("train", ["run", "--config", path, "--shards", tmp_path / "s", "--out", out],
                                         capsys)
        line = assert_one_line(code, err, fragment)
        assert line.startswith(f"error: {path}: "), line
        assert not out.exists()
    good = tmp_path / "good.toml"
    good.write_text('variant = "v1"\nseed = 9223372036854775807\nweight-decay = 0.0001\nlr = 0.01\n')
    code, _, err = run_cli_inprocess("train", ["run", "--config", good, "--shards", tmp_path / "s", "--out", out],
                                     capsys)
    assert_one_line(code, err, f"{tmp_path / 's'}: does not exist")  # the options passed; the data are missing


def test_a_config_nested_deep_with_a_key_twice_or_a_huge_value_is_one_short_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run without --out would go to ./runs/
    cases = {
        "deep.json": (_deep("json"), f"nested more than {MAX_DEPTH} deep"),
        "deep.toml": (_deep("toml"), f"nested more than {MAX_DEPTH} deep"),
        "twice.json": ('{"variant": "v1", "epochs": 1, "epochs": 500}', "key 'epochs' appears twice"),
        "huge-type.json": (json.dumps({"epochs": "x" * 300_000}), "epochs: must be an integer, got 'xxx"),
        "huge-key.json": (json.dumps({"x" * 300_000: 1}), "unknown key 'xxx"),
        "huge-choice.toml": (f'variant = "{"x" * 300_000}"\n', "--variant: must be one of"),
    }
    for name, (text, fragment) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        assert path.stat().st_size < 1 << 20  # under the --config size limit: the reader itself must hold
        code, _, err = run_cli_inprocess("train", ["run", "--config", path, "--shards", tmp_path / "s",
                                                   "--out", tmp_path / "run"], capsys)
        line = assert_one_line(code, err, fragment)
        assert len(line) < 400, (name, len(line))
    code, _, err = run_cli_inprocess("train", ["run", "--config", tmp_path / "huge-choice.toml",  # no --out:
                                               "--shards", tmp_path / "s"], capsys)  # not named after the variant
    assert len(assert_one_line(code, err, "--variant: must be one of")) < 400 and not (tmp_path / "runs").exists()
    control = tmp_path / "control.json"
    control.write_text('{"variant": "v1", "epochs": 3}')
    code, _, err = run_cli_inprocess("train", ["run", "--config", control, "--shards", tmp_path / "s",
                                               "--out", tmp_path / "run"], capsys)
    assert_one_line(code, err, f"{tmp_path / 's'}: does not exist")


# ------------------------------------------------------------------ class 5: nnU-Net and MSD files


def _patients(src: Path) -> list[str]:
    from etl.sources import scan_source

    return [p.id for p in scan_source(src).patients]


def test_a_nested_or_ambiguous_splits_final_json_is_one_line_in_both_commands(pristine_src, tmp_path, capsys):
    first, *rest = _patients(pristine_src)
    bad = {
        "deep.json": "[" * DEEP + "]" * DEEP,
        "twice.json": json.dumps([{"train": rest, "val": [first]}])[:-2] + f', "val": {json.dumps(rest)}}}]',
    }
    for name, text in bad.items():
        split_file = tmp_path / name
        split_file.write_text(text)
        for command, out in (("build-shards", tmp_path / "shards"), ("export-nnunet", tmp_path / "Dataset001_X")):
            args = [command, "--src", pristine_src, "--out", out, "--split-file", split_file, "--workers", "0"]
            code, _, err = run_cli_inprocess("etl", args + (BUILD_ARGS[2:4] if command == "build-shards" else []),
                                             capsys)
            line = assert_one_line(code, err, str(split_file), "not valid JSON")
            assert ("nested more than" if name == "deep.json" else "appears twice") in line
            assert not out.exists()
    control = tmp_path / "splits_final.json"
    control.write_text(json.dumps([{"train": rest, "val": [first]}]))
    code, _, err = run_cli_inprocess("etl", ["build-shards", "--src", pristine_src, "--out", tmp_path / "shards",
                                             "--split-file", control, *BUILD_ARGS[:4]], capsys)
    assert code == 0, err
    splits = json.loads((tmp_path / "shards" / "manifest.json").read_text())["content"]["splits"]
    assert splits["val"]["patients"] == [first] and splits["train"]["patients"] == sorted(rest)


@pytest.fixture(scope="module")
def msd_task(tmp_path_factory) -> Path:
    from etl.synth import synthesize

    root = tmp_path_factory.mktemp("msd")
    synthesize(root, patients=3, layout="msd", shape=SHAPE, seed=0)
    return root / "Task01_BrainTumour"


def test_a_nested_msd_dataset_json_is_one_line_in_every_command(msd_task, trained, tmp_path, capsys):
    task = tmp_path / "Task01_BrainTumour"
    shutil.copytree(msd_task, task)
    description = task / "dataset.json"
    good = description.read_bytes()
    commands = {
        "build-shards": ("etl", ["build-shards", "--src", task, "--out", tmp_path / "shards", *BUILD_ARGS]),
        "export-nnunet": ("etl", ["export-nnunet", "--src", task, "--out", tmp_path / "Dataset001_X",
                                  "--workers", "0"]),
        "predict": ("train", ["predict", "--checkpoint", trained / "checkpoints" / "best.pt", "--input", task,
                              "--out", tmp_path / "predicted", "--device", "cpu"]),
    }
    crafted = {"deep": "[" * DEEP + "]" * DEEP,
               "twice": good.decode().replace('"modality"', '"modality": {"0": "T2w"}, "modality"', 1)}
    for kind, text in crafted.items():
        description.write_text(text)
        for name, (tool, args) in commands.items():
            code, _, err = run_cli_inprocess(tool, args, capsys)
            line = assert_one_line(code, err, "dataset.json", "not valid JSON")
            assert ("nested more than" if kind == "deep" else "appears twice") in line, (name, line)
    assert not any((tmp_path / name).exists() for name in ("shards", "Dataset001_X", "predicted"))
    description.write_bytes(good)
    tool, args = commands["build-shards"]
    code, _, err = run_cli_inprocess(tool, args, capsys)
    assert code == 0 and (tmp_path / "shards" / "manifest.json").is_file(), err


# ------------------------------------------------------------------ --out a link to nowhere


def _out_args(command: str, src: Path, shards: Path, out: Path) -> tuple[str, list]:
    return {
        "build-shards": ("etl", ["build-shards", "--src", src, "--out", out, *BUILD_ARGS]),
        "export-nnunet": ("etl", ["export-nnunet", "--src", src, "--out", out, *BUILD_ARGS[:2], *BUILD_ARGS[4:]]),
        "synth": ("etl", ["synth", "--out", out, "--patients", "1", "--shape", "32,32,16"]),
        "train run": ("train", ["run", "--shards", shards, "--out", out, *TRAIN_ARGS]),
    }[command]


@pytest.mark.parametrize("command", ["build-shards", "export-nnunet", "synth", "train run"])
def test_an_out_that_is_a_link_to_nowhere_is_one_line_and_left_as_it_was(pristine_src, tmp_path, capsys, command):
    links = tmp_path / "links"
    links.mkdir()
    name = "Dataset00{}_X"  # export-nnunet wants its out folder named so; the others take any name
    (links / name.format(1)).symlink_to(links / "missing")  # dangling
    (links / name.format(2)).symlink_to(name.format(2))  # a loop of one link
    through = links / name.format(2) / name.format(3)  # a path running through that loop
    for out in (links / name.format(1), links / name.format(2), through):
        tool, args = _out_args(command, pristine_src, tmp_path / "no-shards", out)
        code, _, err = run_cli_inprocess(tool, args, capsys)
        assert_one_line(code, err, str(out), "dangling link|loop of symbolic links")
    assert os.readlink(links / name.format(1)) == str(links / "missing") and not (links / "missing").exists()
    assert os.readlink(links / name.format(2)) == name.format(2)
    # control: a link to an existing empty folder is a folder like any other
    target = tmp_path / "target"
    target.mkdir()
    (links / name.format(4)).symlink_to(target)
    tool, args = _out_args(command, pristine_src, tmp_path / "no-shards", links / name.format(4))
    code, _, err = run_cli_inprocess(tool, args, capsys)
    if command == "train run":  # the folder was taken; what stops it is the missing data
        assert_one_line(code, err, f"{tmp_path / 'no-shards'}: does not exist")
    else:
        assert code == 0, err
        assert any(target.iterdir())
