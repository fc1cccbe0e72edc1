"""`train run --trainer package.module:ClassName` (nnU-Net's `-tr`): a Trainer subclass named on the
command line trains the run, is saved with it, is given again on `--resume` (a class named by a
checkpoint is never imported), and a name that is no importable Trainer is one line before anything
is written. The toy trainer is tests/helpers/toy_trainer.py; the shards the `shards` fixture."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import toy_trainer
from tests.helpers.train_runs import options, quiet
from train import cli, fit
from train.config.options import ConfigError

torch.set_num_threads(1)

TOY = "tests.helpers.toy_trainer:DoubledLoss"


def argv(shards, out, **kw) -> list[str]:
    """`train run` flags of the tiny run of `options` (tests/helpers/train_runs.py)."""
    words = ["run"]
    for name, value in options(shards, out, epochs=1, **kw).items():
        flag = "--" + name.replace("_", "-")
        words += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    return words


def invoke(words, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main([str(w) for w in words])
    return info.value.code or 0, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def saved_trainer(out) -> object:
    return json.loads((out / "config.json").read_text())["config"]["trainer"]


def last_epoch(out) -> int:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"]


def test_the_named_trainer_trains_is_saved_and_is_given_again_on_resume(shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "toy"
    toy_trainer.CALLS.clear()
    code, err = invoke([*argv(shards, out), "--trainer", TOY], capsys)
    assert code == 0, err
    assert True in toy_trainer.CALLS and False in toy_trainer.CALLS  # its step, in training and in validation
    assert saved_trainer(out) == TOY and last_epoch(out) == 1

    imported = []
    monkeypatch.setattr(fit.importlib, "import_module", lambda name: imported.append(name))
    code, err = invoke(["run", "--out", out, "--resume", "--epochs", "2"], capsys)
    assert code == 2 and one_line(err) == (f"error: --trainer: {out} was trained with --trainer {TOY}; give it "
                                           "again to continue (a class named by a checkpoint is never imported)")
    assert imported == [] and last_epoch(out) == 1
    monkeypatch.undo()

    toy_trainer.CALLS.clear()
    code, err = invoke(["run", "--out", out, "--resume", "--epochs", "2", "--trainer", TOY], capsys)
    assert code == 0, err
    assert toy_trainer.CALLS and last_epoch(out) == 2 and saved_trainer(out) == TOY

    builtin = "train.training.trainer:Trainer"
    code, err = invoke(["run", "--out", out, "--resume", "--epochs", "3", "--trainer", builtin], capsys)
    assert code == 2 and f"--trainer '{TOY}' -> '{builtin}'" in one_line(err) and "--force" in err
    toy_trainer.CALLS.clear()
    code, err = invoke(["run", "--out", out, "--resume", "--epochs", "3", "--trainer", builtin, "--force"], capsys)
    assert code == 0, err
    assert toy_trainer.CALLS == [] and last_epoch(out) == 3 and saved_trainer(out) == builtin


@pytest.mark.parametrize("name, message", [
    ("tests.helpers.no_such_module:Trainer",
     "--trainer: there is no module tests.helpers.no_such_module to import (is it installed, or its folder on "
     "PYTHONPATH?)"),
    ("tests.helpers.toy_trainer:Missing", "--trainer: module tests.helpers.toy_trainer has no Missing"),
    ("tests.helpers.toy_trainer:NotATrainer",
     "--trainer: tests.helpers.toy_trainer:NotATrainer is not a subclass of train.training.trainer.Trainer"),
    ("tests.helpers.toy_trainer:CALLS",
     "--trainer: tests.helpers.toy_trainer:CALLS is not a subclass of train.training.trainer.Trainer"),
    ("tests/helpers/toy_trainer.py",
     "--trainer: must be package.module:ClassName (a Trainer subclass to import), got 'tests/helpers/toy_trainer.py'"),
])
def test_a_name_that_is_no_importable_trainer_is_one_line_before_anything_is_written(shards, tmp_path, capsys,
                                                                                     name, message):
    out = tmp_path / "run"
    code, err = invoke([*argv(shards, out), "--trainer", name], capsys)
    assert code == 2 and one_line(err) == f"error: {message}"
    assert not out.exists()


def test_a_trainer_named_both_ways_is_refused(shards, tmp_path):
    with pytest.raises(ConfigError, match="^--trainer: give the Trainer subclass either as --trainer or as "
                                          "trainer_class, not both$"):
        fit.run(options(shards, tmp_path / "r", trainer=TOY), hooks=quiet(), trainer_class=toy_trainer.DoubledLoss)
    assert not (tmp_path / "r").exists()
