"""A training run in its checkpoint: what the Trainer saves (`payload`), what `--resume` checks
(`check_resumable`) and reads back (`restore`), and the RNG states as plain values.

Numpy's and Python's generators hold tuples of big integers and strings; `rng_state` turns them
into int64 tensors and plain numbers so that `torch.load(weights_only=True)` reads them back, and
`check_rng` holds every state to the sizes and ranges its generator accepts before
`set_rng_state` gives it to the generator.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checks import size_problem
from .format import FORMAT, CheckpointError, RunState, is_int, is_number, meta_model, model_spec, shown


@dataclass
class TrainState:
    """What `--resume` restores besides the weights and optimiser: where the run stands."""

    epoch: int = 0  # completed epochs
    best: float = -math.inf
    best_epoch: float = 0  # fractional for a validation in the middle of an epoch (a budget stop)
    history: list[dict] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    steps: int = 0  # optimiser steps so far: the learning-rate schedule's clock
    schedule_steps: int = 0  # the step schedule's length: epochs x steps per epoch (a budget's clock may end it first)
    epoch_step: int = 0  # steps already taken in epoch `epoch` + 1 (a mid-epoch checkpoint)
    epoch_loss: tuple[float, float] = (0.0, 0.0)  # (sum, slices) of that partial epoch's training loss
    augmenter_state: Any = None  # that partial epoch's augmentation generator state
    stale: int = 0  # validations since the best one
    val_seconds: float = 0.0  # the longest validation measured


# ---------------------------------------------------------------- what is saved, what is read back


def payload(*, config: Any, variant: str, manifest: Any, model: Any, optimizer: Any, scheduler: Any, scaler: Any,
            augmenter: Any, state: TrainState) -> dict[str, Any]:
    """The checkpoint of a run (`format` lists its keys) from the Trainer's parts: its
    `train.config.options.Config`, preset name, shards manifest, model, optimiser, scheduler
    (None for a per-step schedule), gradient scaler, this epoch's augmenter and `TrainState`."""
    import torch

    finished = state.epoch == config.epochs
    return {
        "format": FORMAT,
        "epoch": state.epoch,
        "state": (RunState.FINISHED if finished else RunState.RUNNING).value,
        "variant": variant,
        "model": model_spec(config),
        "model_state": model.state_dict(),
        "channels": list(config.channels),
        "target": config.target,
        "preprocessing": dict(manifest.content["preprocessing"]),
        "labels": dict(manifest.content["labels"]),
        "manifest_digest": manifest.digest,
        "config": config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "scaler": scaler.state_dict(),
        "rng": rng_state(augmenter),
        "best_mean_dice": float(state.best),
        "best_epoch": state.best_epoch,
        "steps": int(state.steps),
        "schedule_steps": int(state.schedule_steps),
        "epoch_step": int(state.epoch_step),
        "epoch_loss": [float(v) for v in state.epoch_loss],
        "stale": int(state.stale),
        "val_seconds": float(state.val_seconds),
        "history": [dict(r) for r in state.history],
        "epoch_seconds": [float(s) for s in state.epoch_seconds],
        "versions": {"torch": str(torch.__version__)},
    }


def restore(restored: dict[str, Any], where: str | Path, *, model: Any, optimizer: Any, scheduler: Any,
            scaler: Any) -> TrainState:
    """Put a checkpoint that `check_resumable` passed back into the Trainer's parts: weights,
    optimiser, scheduler, scaler and every RNG state (the augmenter's stays in the returned
    `TrainState` until its epoch starts). What still does not fit, e.g. an optimiser a subclass
    builds differently, is one line naming `where`."""
    try:
        model.load_state_dict(restored["model_state"])
        optimizer.load_state_dict(restored["optimizer"])
        if scheduler is not None and restored.get("scheduler"):
            scheduler.load_state_dict(restored["scheduler"])
        if restored.get("scaler"):
            scaler.load_state_dict(restored["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"cannot be resumed by this trainer ({reason})", where) from None
    set_rng_state(restored["rng"])
    loss = restored.get("epoch_loss") or (0.0, 0.0)
    return TrainState(
        epoch=restored["epoch"], best=restored["best_mean_dice"], best_epoch=restored["best_epoch"],
        history=list(restored["history"]), epoch_seconds=list(restored["epoch_seconds"]),
        steps=int(restored.get("steps", 0)), epoch_step=int(restored.get("epoch_step", 0)),
        epoch_loss=(float(loss[0]), float(loss[1])), augmenter_state=(restored.get("rng") or {}).get("augmenter"),
        stale=int(restored.get("stale", 0)), val_seconds=float(restored.get("val_seconds", 0.0)))


# ---------------------------------------------------------------- RNG states as plain values


def rng_state(augmenter: Any | None = None) -> dict[str, Any]:
    """Every generator the training loop draws from, as tensors and plain numbers."""
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "augmenter": None if augmenter is None else augmenter.state(),
    }
    return state


def set_rng_state(state: dict[str, Any], augmenter: Any | None = None) -> None:
    """Restore what `rng_state` captured (CUDA only where there are as many devices)."""
    import torch

    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if augmenter is not None:
        if state.get("augmenter") is None:
            raise CheckpointError("checkpoint holds no augmentation generator state, but this run augments")
        augmenter.set_state(state["augmenter"])


# ---------------------------------------------------------------- what --resume checks


def check_resumable(payload: dict[str, Any], path: str | Path) -> None:
    """What `--resume` restores besides the weights (the package docstring), checked before the
    Trainer builds anything: a tampered or damaged last.pt is one line, not a traceback."""
    _check_counters(payload, path)
    problem = size_problem(payload["config"])
    if problem is not None:
        raise CheckpointError(f"its configuration's {problem[0]} {problem[1]}", path)
    check_rng(payload.get("rng"), path)
    spec = dict(payload["model"])
    spec.setdefault("in_channels", len(payload["channels"]))
    shapes = [tuple(p.shape) for p in meta_model(spec, path).parameters()]
    _check_optimizer(payload.get("optimizer"), shapes, path)
    _check_kinds(payload.get("scheduler"), _reference_states()[0], "scheduler", path, complete=False)
    _check_kinds(payload.get("scaler"), _reference_states()[1], "gradient scaler", path, complete=True)


def _check_counters(payload: dict[str, Any], path: str | Path) -> None:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"its {what}; it cannot be resumed (start a new run)", path)

    for key in ("best_mean_dice", "best_epoch"):
        if not is_number(payload.get(key)):
            raise bad(f"{key} {shown(payload.get(key))} is not a number")
    history, seconds = payload.get("history"), payload.get("epoch_seconds")
    if not isinstance(history, list) or not all(isinstance(row, dict) and all(
            isinstance(k, str) and is_number(v) for k, v in row.items()) for row in history):
        raise bad("history is not a list of rows of numbers")
    if not isinstance(seconds, list) or not all(is_number(v) for v in seconds):
        raise bad("epoch_seconds is not a list of numbers")
    for key in ("steps", "schedule_steps", "epoch_step", "stale"):
        if key in payload and (not is_int(payload[key]) or payload[key] < 0):
            raise bad(f"{key} {shown(payload[key])} is not a count")
    if "val_seconds" in payload and not is_number(payload["val_seconds"]):
        raise bad(f"val_seconds {shown(payload['val_seconds'])} is not a number")
    loss = payload.get("epoch_loss")
    if loss is not None and (not isinstance(loss, (list, tuple)) or len(loss) != 2
                             or not all(is_number(v) for v in loss)):
        raise bad(f"epoch_loss {shown(loss)} is not a (sum, slices) pair")


def _tensor(value: Any, dtype: Any, shape: tuple[int, ...] | None = None) -> bool:
    import torch

    return (isinstance(value, torch.Tensor) and value.dtype == dtype and value.device.type == "cpu"
            and (shape is None or tuple(value.shape) == tuple(shape)))


def check_rng(state: Any, path: str | Path) -> None:
    """Every generator state `set_rng_state` restores has the type, size and range its generator
    accepts (torch's and the augmenter's byte states, numpy's MT19937, Python's Mersenne Twister)."""
    import torch

    def bad(entry: str, what: str) -> CheckpointError:
        return CheckpointError(f"its RNG state {entry} {what}; it cannot be resumed exactly (start a new run)", path)

    if not isinstance(state, dict):
        raise bad("('rng')", "is missing")
    torch_size = tuple(torch.get_rng_state().shape)
    if not _tensor(state.get("torch"), torch.uint8, torch_size):
        raise bad("'torch'", f"is not a uint8 tensor of {torch_size[0]} bytes")
    cuda = state.get("cuda") or []
    if not isinstance(cuda, list) or not all(_tensor(c, torch.uint8) and c.ndim == 1 for c in cuda):
        raise bad("'cuda'", "is not a list of uint8 tensors")
    numpy_state, python_state = state.get("numpy"), state.get("python")
    if not (isinstance(numpy_state, dict) and isinstance(numpy_state.get("kind"), str)
            and numpy_state["kind"] == "MT19937"
            and _tensor(numpy_state.get("keys"), torch.int64, (624,)) and _in_range(numpy_state["keys"], 0, 2**32 - 1)
            and is_int(numpy_state.get("pos")) and 0 <= numpy_state["pos"] <= 624
            and is_int(numpy_state.get("has_gauss")) and numpy_state["has_gauss"] in (0, 1)
            and is_number(numpy_state.get("cached_gaussian"))):
        raise bad("'numpy'", "is not an MT19937 state (kind, 624 keys below 2**32, pos 0..624, has_gauss, "
                             "cached_gaussian)")
    internal = python_state.get("internal") if isinstance(python_state, dict) else None
    if not (isinstance(python_state, dict) and is_int(python_state.get("version")) and python_state["version"] == 3
            and _tensor(internal, torch.int64, (625,)) and _in_range(internal[:624], 0, 2**32 - 1)
            and 0 <= int(internal[624]) <= 624
            and (python_state.get("gauss_next") is None or is_number(python_state.get("gauss_next")))):
        raise bad("'python'", "is not a version-3 Mersenne Twister state (625 words below 2**32, the last 0..624)")
    augmenter = state.get("augmenter")
    if augmenter is not None and not _tensor(augmenter, torch.uint8, torch_size):
        raise bad("'augmenter'", f"is not a uint8 tensor of {torch_size[0]} bytes")


def _in_range(values: Any, low: int, high: int) -> bool:
    return bool(values.numel() == 0 or (int(values.min()) >= low and int(values.max()) <= high))


def _check_optimizer(state: Any, shapes: list[tuple[int, ...]], path: str | Path) -> None:
    """One parameter group entry per model parameter; per-parameter tensors of its shape (or
    scalars, such as Adam's step); group settings plain numbers."""
    import torch

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"its optimiser state {what}; it cannot be resumed exactly (start a new run)", path)

    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list) or not state["param_groups"]:
        raise bad("('optimizer': state and param_groups) is missing")
    ids: list[int] = []
    for group in state["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                or not all(is_int(i) for i in group["params"]):
            raise bad("has a parameter group without its parameter list")
        for key, value in group.items():
            if key != "params" and not _setting(value):
                raise bad(f"setting {key!r} is {shown(value)}, not a number")
        if not is_number(group.get("lr")) or not 0 < group["lr"] < float("inf"):
            raise bad(f"learning rate {shown(group.get('lr'))} is not a positive number")
        ids += group["params"]
    if sorted(ids) != list(range(len(shapes))):
        raise bad(f"covers {len(ids)} parameter(s) where the model has {len(shapes)}")
    for key, entry in state["state"].items():
        if not is_int(key) or not 0 <= key < len(shapes) or not isinstance(entry, dict):
            raise bad(f"has an entry {shown(key)} that is no parameter of the model")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 and tuple(value.shape) != shapes[key]:
                    raise bad(f"'{name}' of parameter {key} has shape {tuple(value.shape)}, the parameter {shapes[key]}")
            elif not is_number(value):
                raise bad(f"'{name}' of parameter {key} is {shown(value)}")


def _setting(value: Any) -> bool:
    import torch

    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (list, tuple)) and all(is_number(v) for v in value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if is_number(value):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list of numbers" if all(is_number(v) for v in value) else "list"
    return "none" if value is None else type(value).__name__


def _reference_states() -> tuple[dict, dict]:
    """Fresh state dicts of what `Trainer` builds (ReduceLROnPlateau, an enabled GradScaler): the
    keys and kinds of values a saved one must have."""
    import torch

    param = torch.zeros(1, requires_grad=True)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([param], lr=1.0))
    return scheduler.state_dict(), torch.amp.GradScaler("cpu", enabled=True).state_dict()


def _check_kinds(saved: Any, reference: dict, what: str, path: str | Path, complete: bool) -> None:
    """A saved state dict (or nothing: {} or absent) whose keys hold the kinds of values a fresh one
    holds; `complete`: every key of the fresh one present (its `load_state_dict` reads them all)."""
    if saved is None or saved == {}:
        return
    if not isinstance(saved, dict):
        raise CheckpointError(f"its {what} state is {shown(saved)}, not a dict; it cannot be resumed", path)
    for key, value in reference.items():
        if value is None:  # no kind to compare with (a default left unset)
            continue
        if key not in saved:
            if complete:
                raise CheckpointError(f"its {what} state lacks {key!r}; it cannot be resumed", path)
            continue
        if _kind(saved[key]) != _kind(value):
            raise CheckpointError(f"its {what} state {key!r} is {shown(saved[key])}, not a {_kind(value)}; "
                                  "it cannot be resumed", path)
    scale = saved.get("scale") if complete else None
    if scale is not None and not 0 < scale < float("inf"):
        raise CheckpointError(f"its {what} scale {scale!r} is not a positive number; it cannot be resumed", path)
