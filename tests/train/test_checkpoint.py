"""Checkpoint files: weights_only round trip of every RNG, atomic writes, clear refusals; one set of
rules and one description for a checkpoint and its exported config; a checkpoint written before the
format moved into its package (issue 21) still loads and resumes to the same payload."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shards_spec.errors import ToolError
from train.config.options import resolve
from train.models import build_model
from train.recipe.augment import Augmenter
from train.runfiles import checkpoint as ckpt, export

torch.set_num_threads(1)


TINY = {"base": 2, "depth": 1, "batch_norm": False}
TINY_STATE = build_model("unet", 1, **TINY).state_dict()  # built once, here: building draws from torch's RNG


def minimal(**extra):
    """The smallest checkpoint `load` accepts: a real (tiny) U-Net's weights, since their names
    and shapes are checked against the model the checkpoint describes."""
    payload = {"format": ckpt.FORMAT, "epoch": 1, "state": "running",
               "model": {"name": "unet", "kwargs": TINY, "in_channels": 1, "out_channels": 3},
               "model_state": TINY_STATE, "channels": ["flair"], "target": "classes",
               "preprocessing": {"size": 16, "norm": "slice"}, "manifest_digest": "0" * 64, "config": {"lr": 0.001}}
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


# ---------------------------------------------------------------- one description, one set of rules


@pytest.mark.parametrize("change, words", [
    ({"channels": ["flair", "flair"]}, "distinct modality names"),
    ({"channels": ["dwi"]}, "distinct modality names"),
    ({"target": "labels"}, "its target 'labels' is not one of ['classes', 'regions']"),
    ({"config": {"context": 9}}, "its context 9 is not 0..3 neighbours"),
    ({"config": {"context": 1}}, "its model takes 1 input channels but lists 1 channel names (flair) with 1 neighbour"),
    ({"channels": ["t1", "flair"]}, "its model takes 1 input channels but lists 2 channel names"),
    ({"preprocessing": None}, "its preprocessing None is not a dict with a size and a norm"),
    ({"preprocessing": {"norm": "slice"}}, "its preprocessing size None is not a positive integer"),
    ({"preprocessing": {"size": 16, "norm": "zscore"}}, "its preprocessing norm 'zscore' is not one of"),
    ({"preprocessing": {"size": 15, "norm": "slice"}}, "not a multiple of 2"),
])
def test_what_a_model_is_built_from_is_checked_once_for_load_and_for_an_exported_config(tmp_path, change, words):
    """`check_description` is the one set of rules: `load` refuses the file, and the same config
    as `train export` writes it (read back by `predict` for an ONNX model) is refused alike."""
    path = ckpt.save(minimal(**change), tmp_path / "bad.pt")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load(path)
    assert str(info.value).startswith(f"{path}: ") and words in str(info.value)
    good = ckpt.save(minimal(), tmp_path / "good.pt")
    config = {**export.export_config(ckpt.load(good), good), **change}
    with pytest.raises(ckpt.CheckpointError, match=re.escape(words)):
        ckpt.check_description(config, "model.json")


def test_a_checkpoint_and_its_exported_config_describe_the_same_model(tmp_path):
    path = ckpt.save(minimal(best_mean_dice=-math.inf, variant="v1"), tmp_path / "a.pt")
    payload = ckpt.load(path)
    described = ckpt.describe(payload)
    assert (described.channels, described.target, described.size, described.norm, described.context,
            described.in_channels, described.best_mean_dice, described.spatial_multiple) == \
        (["flair"], "classes", 16, "slice", 0, 1, None, 2)
    config = export.export_config(payload, path)
    assert ckpt.describe(config) == described
    assert {k: config[k] for k in described.record()} == described.record()


OLD = Path(__file__).parent / "data" / "last-v1-issue21.pt"
"""last.pt of a 2-epoch v1 run (base 2, depth 1, stem 2, 16x16 shards, CPU) written by the code
before the checkpoint format moved into its package (issue 21): it must keep loading and resuming."""


def _same(a, b, where=""):
    """Paths where two plain checkpoint values differ (tensors by value, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        return ([] if set(a) == set(b) else [f"{where} keys"]) + \
            [d for k in a if k in b for d in _same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        return [f"{where} length"] if len(a) != len(b) else \
            [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{where}[{i}]")]
    return [] if a == b or all(isinstance(v, float) and math.isnan(v) for v in (a, b)) else [where]


def test_a_checkpoint_written_before_the_move_loads_and_resumes_to_the_same_payload():
    old = ckpt.load(OLD)
    ckpt.check_resumable(old, OLD)
    described = ckpt.describe(old)
    assert (described.channels, described.target, described.size, described.context, described.epoch,
            described.variant, described.model["kwargs"]) == \
        (["t1ce", "flair"], "regions", 16, 0, 2, "v1", {"base": 2, "depth": 1, "batch_norm": True, "stem": 2})
    assert ckpt.build_model_of(old, OLD).state_dict().keys() == old["model_state"].keys()

    config = resolve({"out": old["config"]["out"]}, old["config"])
    model = build_model(config.model, in_channels=config.in_channels, out_channels=3, **config.model_kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = ckpt.rng_state()
    try:
        state = ckpt.restore(old, OLD, model=model, optimizer=optimizer, scheduler=None, scaler=scaler)
        state.schedule_steps = old["schedule_steps"]  # the Trainer's: epochs x steps per epoch
        manifest = SimpleNamespace(content={"preprocessing": old["preprocessing"], "labels": old["labels"]},
                                   digest=old["manifest_digest"])
        again = ckpt.payload(config=config, variant=old["variant"], manifest=manifest, model=model,
                             optimizer=optimizer, scheduler=None, scaler=scaler, augmenter=None, state=state)
    finally:
        ckpt.set_rng_state(before)
    assert list(again) == list(old)
    assert set(old["config"]) <= set(again["config"])  # options added since keep their defaults
    differ = [d for d in _same(old, again) if not d.startswith(("/versions", "/rng/cuda", "/config keys"))]
    assert differ == []


class _Evil:
    called = False

    def __reduce__(self):
        return (_Evil._boom, ())

    @staticmethod
    def _boom():
        _Evil.called = True
        return "boom"
