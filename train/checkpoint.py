"""Checkpoints: what `predict` needs plus what an exact `--resume` needs, loadable with
`torch.load(weights_only=True)` only.

Shards and checkpoints travel between people, so a checkpoint is never unpickled: every value is
a tensor or a plain type (dict, list, tuple, str, int, float, bool, None). That is why the RNG
states are converted here (numpy's and Python's generators hold tuples of big integers and
strings; they become int64 tensors and plain numbers) and why the configuration is stored as
its JSON dict.

Keys (`FORMAT` "brats-train-checkpoint/1"):

    format, epoch (completed epochs), state (see `RunState`), variant, model {name, kwargs,
    in_channels, out_channels}, model_state, channels, target, preprocessing (manifest
    content's), labels, manifest_digest, config (dict), optimizer, scheduler, scaler,
    rng {torch, cuda, numpy, python, augmenter}, best_mean_dice, best_epoch, history (one dict
    per completed epoch: the metrics.csv rows), epoch_seconds, versions {torch}

Files are written to a temporary name in the same folder and moved into place with
`os.replace`, so a crash leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import enum
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from shards_spec.errors import ToolError

FORMAT = "brats-train-checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"
REQUIRED = ("format", "epoch", "state", "model", "model_state", "channels", "target", "manifest_digest", "config")


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


# ---------------------------------------------------------------- save / load


def check_plain(value: Any, where: str = "checkpoint") -> None:
    """Refuse anything `torch.load(weights_only=True)` would not load back (a str subclass such
    as `torch.__version__`, a dataclass, a numpy scalar ...), naming where it sits."""
    import collections

    import torch

    if value is None or type(value) in (str, int, float, bool) or isinstance(value, torch.Tensor):
        return
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not a str or int")
            check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(value).__module__}.{type(value).__qualname__} would not load with weights_only=True")


def save(payload: dict[str, Any], path: str | Path) -> Path:
    """Write `payload` atomically (temporary file in the same folder, fsync, os.replace) after
    checking that every value is a tensor or a plain type (`check_plain`)."""
    import torch

    check_plain(payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer turns a refused write into a RuntimeError
        refused = exc
        while refused is not None and not isinstance(refused, OSError):
            refused = refused.__context__
        if refused is None:
            raise
        import errno

        code = errno.errorcode.get(refused.errno or 0, "")
        raise CheckpointError(f"cannot be written ({refused.strerror or refused}{f' [{code}]' if code else ''}); "
                              "the previous checkpoint of that name is unchanged", path) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; anything else is one clear `CheckpointError`."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such checkpoint file", path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError,
            KeyError, TypeError, AttributeError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.split(". ")[0].rstrip(".")  # torch appends paragraphs of advice
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise CheckpointError(f"not a readable checkpoint (truncated, corrupt or not from this tool: {reason})",
                              path) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"not a {FORMAT} checkpoint (format {found!r})", path)
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing}", path)
    return payload
