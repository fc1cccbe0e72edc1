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

Checkpoints come from other people, so `load` trusts nothing in one before it is checked, in
this order, and refuses in one line:

1. the file: a regular file, a zip archive (what `torch.save` writes; anything else is named:
   a pickle, a gzip file, text ...), its members stored uncompressed (torch never compresses,
   and a compressed member is how a small file would expand to gigabytes) and their declared
   sizes within the file's own size and `BRATS_SHARDS_MAX_CHECKPOINT_MB`;
2. `torch.load(weights_only=True)`, then the format and the keys;
3. every value something is built from (`check_description`): channels, target, the
   preprocessing size (`BRATS_SHARDS_MAX_SIZE`, the readers' limit), the model's name, input
   and output channels, base width, depth and stem, each within `LIMITS`;
4. the weights (`check_weights`): the model is built on torch's `meta` device (no memory) and
   every tensor of `model_state` must have the key and shape of its parameter, so building the
   real model costs what the file holds, no more.

`--resume` adds `check_resumable`: the optimiser state (one entry per parameter, of its shape),
the scheduler and scaler states, every RNG state (sizes and ranges the generators accept), the
run counters and history, and the saved configuration's sizes (`size_problem`).

`LIMITS` (each changed by the environment variable `BRATS_SHARDS_<NAME>`):

| name | default | bounds |
|---|---|---|
| `MAX_CHECKPOINT_MB` | 4096 | bytes a checkpoint declares (the defaults' last.pt is ~90 MB) |
| `MAX_BASE` | 256 | `--base`, the first level's channels (default 32) |
| `MAX_DEPTH` | 8 | `--depth`, the down-sampling levels (default 4) |
| `MAX_WIDTH` | 4096 | the widest level, base x 2^depth (default 512) |
| `MAX_BATCH` | 4096 | `--batch-size` (default 16 on CPU, 32 on CUDA) |
| `MAX_SHUFFLE_BUFFER` | 100000 | `--shuffle-buffer`, slices held in host memory (default 2000) |
| `MAX_WORKERS` | 64 | `--workers`, loader processes (default 1 on CPU, 2 on CUDA) |
"""

from __future__ import annotations

import enum
import random
from pathlib import Path
from typing import Any

import numpy as np

from shards_spec.errors import ToolError

from ..config.options import MAX_CONTEXT
from ..models import MODELS, build_model

FORMAT = "brats-train-checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"
REQUIRED = ("format", "epoch", "state", "model", "model_state", "channels", "target", "manifest_digest", "config")
LIMITS: dict[str, float] = {
    "MAX_CHECKPOINT_MB": 4096,
    "MAX_BASE": 256,
    "MAX_DEPTH": 8,
    "MAX_WIDTH": 4096,
    "MAX_BATCH": 4096,
    "MAX_SHUFFLE_BUFFER": 100_000,
    "MAX_WORKERS": 64,
}
"""Upper bounds of the values that size memory or processes (module docstring); the readers'
`BRATS_SHARDS_MAX_SIZE` bounds the preprocessing size."""
SIZED = {"base": "MAX_BASE", "depth": "MAX_DEPTH", "batch_size": "MAX_BATCH",
         "shuffle_buffer": "MAX_SHUFFLE_BUFFER", "workers": "MAX_WORKERS"}
"""Model or run option -> its limit."""
OUT_CHANNELS = 3


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
    """Write `payload` atomically (`shards_spec.fileio.atomic_path`: temporary file in the same
    folder, fsync, rename) after checking that every value is a tensor or a plain type (`check_plain`)."""
    import torch

    from shards_spec.fileio import atomic_path

    check_plain(payload)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                torch.save(payload, fh)
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
    return path


def load(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` after checking the file, then check everything
    a model is built from (module docstring, steps 1-4); anything else is one `CheckpointError`."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    check_file(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError,
            KeyError, TypeError, AttributeError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.split(". ")[0].rstrip(".")  # torch appends paragraphs of advice
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise CheckpointError(f"not a readable checkpoint (a zip archive, but truncated, corrupt or not from "
                              f"this tool: {reason})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"not a {FORMAT} checkpoint (format {found!r})", path)
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing}", path)
    check_fields(payload, path)
    check_description(payload, path)
    check_weights(payload, path)
    return payload


# ---------------------------------------------------------------- what a checkpoint may declare

ZIP_MAGIC = b"PK\x03\x04"
MAX_IN_CHANNELS = 4 * (2 * MAX_CONTEXT + 1)
"""Model inputs: at most the four modalities, each with `--context` 3 neighbours on each side."""


def limit(name: str) -> int:
    """A limit of `LIMITS`, or the readers' `MAX_SIZE`, as the environment sets it."""
    from shards_spec import limits

    return int(limits.get(name) if name in limits.DEFAULTS else limits.get(name, LIMITS))


def _variable(name: str) -> str:
    from shards_spec.limits import ENV_PREFIX

    return ENV_PREFIX + name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str(value: Any, expected: str) -> bool:
    return isinstance(value, str) and value == expected


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_file(path: Path) -> None:
    """Step 1 (module docstring): a regular file holding a zip archive whose members are stored
    as they are, declaring no more bytes than the file holds and `MAX_CHECKPOINT_MB` allows.
    `torch.load` allocates what the members declare, so this bounds it before it runs."""
    import stat
    import zipfile

    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError("no such checkpoint file", path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot be read ({exc.strerror or exc})", path) from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError("is a folder; give a checkpoint file (e.g. runs/NAME/checkpoints/best.pt)", path)
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError("is not a regular file (a pipe, socket or device); a checkpoint is a file", path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
        if not head.startswith(ZIP_MAGIC):
            raise CheckpointError(f"is not a checkpoint but {what_is(head)}; a checkpoint is the zip archive "
                                  "`train run` writes (runs/NAME/checkpoints/*.pt)", path)
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise CheckpointError(f"is not a readable checkpoint: a truncated or damaged zip archive ({exc})",
                              path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot be read ({exc.strerror or exc})", path) from None
    packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(f"is not a checkpoint torch wrote: its member {packed[0]!r} is compressed (torch "
                              "stores members as they are; a compressed one could expand to gigabytes)", path)
    declared = sum(m.file_size for m in members)
    if declared > info.st_size:
        raise CheckpointError(f"is damaged or forged: its members declare {declared:,} bytes in a file of "
                              f"{info.st_size:,}", path)
    if declared > limit("MAX_CHECKPOINT_MB") << 20:
        raise CheckpointError(f"holds {declared / 2**20:,.0f} MB, above the limit of {limit('MAX_CHECKPOINT_MB')} MB "
                              f"(environment variable {_variable('MAX_CHECKPOINT_MB')})", path)


def what_is(head: bytes) -> str:
    """What a file that is not a zip archive looks like, from its first bytes, for the message."""
    if not head:
        return "an empty file (0 bytes)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (an old-style torch file or another pickle; never loaded, unpickling can run code)"
    signatures = {b"\x1f\x8b": "a gzip-compressed file", b"\x28\xb5\x2f\xfd": "a zstd-compressed file",
                  b"\x93NUMPY": "a NumPy .npy array", b"\x89HDF": "an HDF5 file", b"\x89PNG": "a PNG image",
                  b"%PDF": "a PDF document", b"\x7fELF": "a program (ELF)"}
    for magic, name in signatures.items():
        if head.startswith(magic):
            return name
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        return "a NIfTI image"
    if head[257:262] == b"ustar":
        return "a tar archive"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return "a JSON file" if text.lstrip()[:1] in ("{", "[") else "a text file"
    return f"an unknown binary file (it starts with {head[:8].hex()})"


def check_fields(payload: dict[str, Any], path: str | Path) -> None:
    """The plain fields every use reads: types and values."""
    problems = []
    if not _is_int(payload["epoch"]) or payload["epoch"] < 0:
        problems.append(f"epoch {_shown(payload['epoch'])} is not a count of epochs")
    if not isinstance(payload["state"], str) or payload["state"] not in [s.value for s in RunState]:
        problems.append(f"state {_shown(payload['state'])} is not one of {[s.value for s in RunState]}")
    for key in ("target", "manifest_digest"):
        if not isinstance(payload[key], str):
            problems.append(f"{key} {_shown(payload[key])} is not a string")
    if not isinstance(payload["config"], dict):
        problems.append("config is not a dict")
    if payload.get("variant") is not None and not isinstance(payload["variant"], str):
        problems.append(f"variant {_shown(payload['variant'])} is not a string")
    best = payload.get("best_mean_dice")
    if best is not None and not _is_number(best):
        problems.append(f"best_mean_dice {_shown(best)} is not a number")
    if problems:
        raise CheckpointError(f"its {problems[0]}", path)


def size_problem(values: dict[str, Any]) -> tuple[str, str] | None:
    """The first of `values` (a model's kwargs or a run's configuration) that would size memory or
    processes beyond `LIMITS`, as (key, problem); None when every one fits."""
    for key, name in SIZED.items():
        if key not in values:
            continue
        value, low = values[key], 0 if key == "workers" else 1
        if not _is_int(value) or value < low:
            return key, f"must be an integer >= {low}, got {_shown(value)}"
        if value > limit(name):
            return key, f"{value} is above the limit {limit(name)} (environment variable {_variable(name)})"
    stem = values.get("stem", 1)
    if not _is_int(stem) or stem not in (1, 2):
        return "stem", f"must be 1 or 2, got {_shown(stem)}"
    if "base" in values and "depth" in values:
        width = values["base"] * 2 ** values["depth"]
        if width > limit("MAX_WIDTH"):
            return "base", (f"{values['base']} at depth {values['depth']} makes a widest level of {width} channels, "
                            f"above the limit {limit('MAX_WIDTH')} (environment variable {_variable('MAX_WIDTH')})")
    return None


def check_description(payload: dict[str, Any], path: str | Path) -> None:
    """Step 3 (module docstring): what a model and its inputs are built from, within `LIMITS`,
    before anything is built. Also for the config of an exported ONNX model (same keys)."""
    channels = payload.get("channels")
    if not isinstance(channels, list) or not 1 <= len(channels) <= 4 or not all(isinstance(c, str) for c in channels):
        raise CheckpointError(f"its channels {_shown(channels)} are not a list of 1 to 4 modality names", path)
    size = _preprocessing_size(payload, path)
    spec = payload.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise CheckpointError("holds no model description ('model': {name, kwargs, in_channels, out_channels})", path)
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and (v is None or type(v) in (str, int, float, bool))
                                               for k, v in kwargs.items()):
        raise CheckpointError(f"its model kwargs {_shown(kwargs)} are not named plain values", path)
    in_channels = spec.get("in_channels", len(channels))
    if not _is_int(in_channels) or not 1 <= in_channels <= MAX_IN_CHANNELS:
        raise CheckpointError(f"its model takes {_shown(in_channels)} input channels; this tool's models take 1 to "
                              f"{MAX_IN_CHANNELS}", path)
    out_channels = spec.get("out_channels", OUT_CHANNELS)
    if not _is_int(out_channels) or out_channels != OUT_CHANNELS:
        raise CheckpointError(f"its model gives {_shown(spec.get('out_channels'))} output channels; this tool's give "
                              f"{OUT_CHANNELS}", path)
    problem = size_problem(kwargs)
    if problem is not None:
        raise CheckpointError(f"its model {problem[0]} {problem[1]}", path)
    if size is not None and "depth" in kwargs:
        factor = 2 ** (kwargs["depth"] + (kwargs.get("stem", 1) == 2))
        if size % factor:
            raise CheckpointError(f"its preprocessing size {size} is not a multiple of {factor}, which its model's "
                                  f"depth {kwargs['depth']} needs", path)


def _preprocessing_size(payload: dict[str, Any], path: str | Path) -> int | None:
    pre = payload.get("preprocessing")
    if pre is None:
        return None
    if not isinstance(pre, dict):
        raise CheckpointError(f"its preprocessing {_shown(pre)} is not a dict", path)
    size = pre.get("size")
    if size is None:
        return None
    if not _is_int(size) or size < 1:
        raise CheckpointError(f"its preprocessing size {_shown(size)} is not a positive integer", path)
    if size > limit("MAX_SIZE"):
        raise CheckpointError(f"its preprocessing size {size} is above the limit {limit('MAX_SIZE')} "
                              f"(environment variable {_variable('MAX_SIZE')})", path)
    return size


def meta_model(spec: dict[str, Any], path: str | Path) -> Any:
    """The model `spec` describes, built on torch's `meta` device: shapes without memory."""
    import torch


    if spec["name"] not in MODELS:
        raise CheckpointError(f"its model {spec['name']!r} is not one of the registered {sorted(MODELS)}", path)
    try:
        with torch.device("meta"):
            return build_model(spec["name"], in_channels=int(spec.get("in_channels", 1)),
                               out_channels=OUT_CHANNELS, **dict(spec.get("kwargs") or {}))
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"its model description {spec['name']!r} {_shown(spec.get('kwargs'))} cannot be "
                              f"built ({reason})", path) from None


def check_weights(payload: dict[str, Any], path: str | Path) -> None:
    """Step 4 (module docstring): `model_state` holds exactly the tensors, by name and shape, of
    the model the checkpoint describes, so loading them into it cannot fail or grow."""
    import torch

    state, spec = payload["model_state"], dict(payload["model"])
    spec.setdefault("in_channels", len(payload["channels"]))
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError("its model_state is not a dict of named tensors", path)
    expected = {k: tuple(v.shape) for k, v in meta_model(spec, path).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"its weights do not fit its model {spec['name']!r} ({len(missing)} missing, e.g. "
                              f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})", path)
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"its weight {key} has shape {tuple(state[key].shape)} where its model "
                                  f"{spec['name']!r} has {shape}", path)


# ---------------------------------------------------------------- what --resume restores


def build_model_of(payload: dict, where: object) -> Any:
    """The checkpoint's model with its weights, in eval mode on the CPU (`predict`, `evaluate`, `export`):
    call it after `load`, whose checks make building it cost what the file holds."""
    spec = payload["model"]
    try:
        model = build_model(str(spec["name"]), in_channels=int(spec.get("in_channels", len(payload["channels"]))),
                            out_channels=int(spec.get("out_channels", 3)), **dict(spec.get("kwargs") or {}))
        model.load_state_dict(payload["model_state"])
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint weights do not fit its model {spec.get('name')!r} ({reason[:160]})",
                             where) from None
    return model.eval()


def check_resumable(payload: dict[str, Any], path: str | Path) -> None:
    """What `--resume` restores besides the weights (module docstring), checked before the
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
        if not _is_number(payload.get(key)):
            raise bad(f"{key} {_shown(payload.get(key))} is not a number")
    history, seconds = payload.get("history"), payload.get("epoch_seconds")
    if not isinstance(history, list) or not all(isinstance(row, dict) and all(
            isinstance(k, str) and _is_number(v) for k, v in row.items()) for row in history):
        raise bad("history is not a list of rows of numbers")
    if not isinstance(seconds, list) or not all(_is_number(v) for v in seconds):
        raise bad("epoch_seconds is not a list of numbers")
    for key in ("steps", "schedule_steps", "epoch_step", "stale"):
        if key in payload and (not _is_int(payload[key]) or payload[key] < 0):
            raise bad(f"{key} {_shown(payload[key])} is not a count")
    if "val_seconds" in payload and not _is_number(payload["val_seconds"]):
        raise bad(f"val_seconds {_shown(payload['val_seconds'])} is not a number")
    loss = payload.get("epoch_loss")
    if loss is not None and (not isinstance(loss, (list, tuple)) or len(loss) != 2
                             or not all(_is_number(v) for v in loss)):
        raise bad(f"epoch_loss {_shown(loss)} is not a (sum, slices) pair")


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
    if not (isinstance(numpy_state, dict) and _is_str(numpy_state.get("kind"), "MT19937")
            and _tensor(numpy_state.get("keys"), torch.int64, (624,)) and _in_range(numpy_state["keys"], 0, 2**32 - 1)
            and _is_int(numpy_state.get("pos")) and 0 <= numpy_state["pos"] <= 624
            and _is_int(numpy_state.get("has_gauss")) and numpy_state["has_gauss"] in (0, 1)
            and _is_number(numpy_state.get("cached_gaussian"))):
        raise bad("'numpy'", "is not an MT19937 state (kind, 624 keys below 2**32, pos 0..624, has_gauss, "
                             "cached_gaussian)")
    internal = python_state.get("internal") if isinstance(python_state, dict) else None
    if not (isinstance(python_state, dict) and _is_int(python_state.get("version")) and python_state["version"] == 3
            and _tensor(internal, torch.int64, (625,)) and _in_range(internal[:624], 0, 2**32 - 1)
            and 0 <= int(internal[624]) <= 624
            and (python_state.get("gauss_next") is None or _is_number(python_state.get("gauss_next")))):
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
                or not all(_is_int(i) for i in group["params"]):
            raise bad("has a parameter group without its parameter list")
        for key, value in group.items():
            if key != "params" and not _setting(value):
                raise bad(f"setting {key!r} is {_shown(value)}, not a number")
        if not _is_number(group.get("lr")) or not 0 < group["lr"] < float("inf"):
            raise bad(f"learning rate {_shown(group.get('lr'))} is not a positive number")
        ids += group["params"]
    if sorted(ids) != list(range(len(shapes))):
        raise bad(f"covers {len(ids)} parameter(s) where the model has {len(shapes)}")
    for key, entry in state["state"].items():
        if not _is_int(key) or not 0 <= key < len(shapes) or not isinstance(entry, dict):
            raise bad(f"has an entry {_shown(key)} that is no parameter of the model")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 and tuple(value.shape) != shapes[key]:
                    raise bad(f"'{name}' of parameter {key} has shape {tuple(value.shape)}, the parameter {shapes[key]}")
            elif not _is_number(value):
                raise bad(f"'{name}' of parameter {key} is {_shown(value)}")


def _setting(value: Any) -> bool:
    import torch

    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if _is_number(value):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list of numbers" if all(_is_number(v) for v in value) else "list"
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
        raise CheckpointError(f"its {what} state is {_shown(saved)}, not a dict; it cannot be resumed", path)
    for key, value in reference.items():
        if value is None:  # no kind to compare with (a default left unset)
            continue
        if key not in saved:
            if complete:
                raise CheckpointError(f"its {what} state lacks {key!r}; it cannot be resumed", path)
            continue
        if _kind(saved[key]) != _kind(value):
            raise CheckpointError(f"its {what} state {key!r} is {_shown(saved[key])}, not a {_kind(value)}; "
                                  "it cannot be resumed", path)
    scale = saved.get("scale") if complete else None
    if scale is not None and not 0 < scale < float("inf"):
        raise CheckpointError(f"its {what} scale {scale!r} is not a positive number; it cannot be resumed", path)
