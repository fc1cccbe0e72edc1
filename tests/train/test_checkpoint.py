"""Checkpoint files: weights_only round trip of every RNG, atomic writes, clear refusals."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from shards_spec.errors import ToolError
from train.models import build_model
from train.recipe.augment import Augmenter
from train.runfiles import checkpoint as ckpt

torch.set_num_threads(1)


TINY = {"base": 2, "depth": 1, "batch_norm": False}
TINY_STATE = build_model("unet", 1, **TINY).state_dict()  # built once, here: building draws from torch's RNG


def minimal(**extra):
    """The smallest checkpoint `load` accepts: a real (tiny) U-Net's weights, since their names
    and shapes are checked against the model the checkpoint describes."""
    payload = {"format": ckpt.FORMAT, "epoch": 1, "state": "running",
               "model": {"name": "unet", "kwargs": TINY, "in_channels": 1, "out_channels": 3},
               "model_state": TINY_STATE, "channels": ["flair"],
               "target": "classes", "manifest_digest": "0" * 64, "config": {"lr": 0.001}}
    payload.update(extra)
    return payload


def draws(augmenter):
    return (torch.rand(3).tolist(), float(np.random.rand()), random.random(),
            augmenter.generator.get_state().sum().item(), augmenter(torch.ones(1, 1, 4, 4), torch.zeros(1, 4, 4))[0].sum().item())


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    augmenter = Augmenter(7)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)
    state = ckpt.rng_state(augmenter)
    ckpt.save(minimal(rng=state), tmp_path / "a.pt")
    expected = draws(augmenter)

    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    other = Augmenter(99)
    loaded = ckpt.load(tmp_path / "a.pt")
    ckpt.set_rng_state(loaded["rng"], other)
    assert draws(other) == expected


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save(minimal(epoch=1), path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]

    def broken(obj, fh, *a, **kw):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(ckpt.CheckpointError, match="cannot be written .disk full."):
        ckpt.save(minimal(epoch=2), path)
    monkeypatch.undo()
    assert ckpt.load(path)["epoch"] == 1  # the previous checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_payload_that_would_not_load_with_weights_only_is_refused_before_writing(tmp_path):
    class Version(str):
        pass

    with pytest.raises(TypeError, match=r"\['versions'\]\['torch'\]"):
        ckpt.save(minimal(versions={"torch": Version("2.13")}), tmp_path / "x.pt")
    with pytest.raises(TypeError, match="float64"):
        ckpt.save(minimal(best=np.float64(0.5)), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("case", ["truncated", "empty", "garbage", "pickled_object", "no_format", "missing_keys"])
def test_bad_files_are_one_line_errors(tmp_path, case):
    good = tmp_path / "good.pt"
    ckpt.save(minimal(), good)
    path = tmp_path / "bad.pt"
    if case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 10)
    elif case == "pickled_object":
        torch.save({"format": ckpt.FORMAT, "evil": _Evil()}, path)
    elif case == "no_format":
        torch.save({"model_state": {}}, path)
    else:
        torch.save({"format": ckpt.FORMAT, "epoch": 1}, path)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load(path)
    message = str(info.value)
    assert isinstance(info.value, ToolError) and message.startswith(str(path) + ": ")
    assert "\n" not in message and len(message) < 400
    assert not _Evil.called  # nothing was unpickled


def test_missing_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.load(tmp_path / "nope.pt")


def test_run_state_values():
    assert [s.value for s in ckpt.RunState] == ["running", "finished"]


class _Evil:
    called = False

    def __reduce__(self):
        return (_Evil._boom, ())

    @staticmethod
    def _boom():
        _Evil.called = True
        return "boom"
