"""What `load` checks before anything is built from a checkpoint (the package docstring's steps 1,
3 and 4), and the limits it checks against.

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

from pathlib import Path
from typing import Any

from shards_spec.labels import CHANNELS, TARGETS
from shards_spec.preprocess import NORMS

from ...config.options import MAX_CONTEXT, stacked_channels
from .format import OUT_CHANNELS, CheckpointError, RunState, is_int, is_number, meta_model, shown

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
ZIP_MAGIC = b"PK\x03\x04"
MAX_IN_CHANNELS = 4 * (2 * MAX_CONTEXT + 1)
"""Model inputs: at most the four modalities, each with `--context` 3 neighbours on each side."""


def limit(name: str) -> int:
    """A limit of `LIMITS`, or the readers' `MAX_SIZE`, as the environment sets it."""
    from shards_spec import limits

    return int(limits.get(name) if name in limits.DEFAULTS else limits.get(name, LIMITS))


def variable(name: str) -> str:
    """The environment variable that sets the limit `name`."""
    from shards_spec.limits import ENV_PREFIX

    return ENV_PREFIX + name


def size_problem(values: dict[str, Any]) -> tuple[str, str] | None:
    """The first of `values` (a model's kwargs or a run's configuration) that would size memory or
    processes beyond `LIMITS`, as (key, problem); None when every one fits."""
    for key, name in SIZED.items():
        if key not in values:
            continue
        value, low = values[key], 0 if key == "workers" else 1
        if not is_int(value) or value < low:
            return key, f"must be an integer >= {low}, got {shown(value)}"
        if value > limit(name):
            return key, f"{value} is above the limit {limit(name)} (environment variable {variable(name)})"
    stem = values.get("stem", 1)
    if not is_int(stem) or stem not in (1, 2):
        return "stem", f"must be 1 or 2, got {shown(stem)}"
    if "base" in values and "depth" in values:
        width = values["base"] * 2 ** values["depth"]
        if width > limit("MAX_WIDTH"):
            return "base", (f"{values['base']} at depth {values['depth']} makes a widest level of {width} channels, "
                            f"above the limit {limit('MAX_WIDTH')} (environment variable {variable('MAX_WIDTH')})")
    return None


# ---------------------------------------------------------------- step 1: the file


def check_file(path: Path) -> None:
    """Step 1: a regular file holding a zip archive whose members are stored as they are,
    declaring no more bytes than the file holds and `MAX_CHECKPOINT_MB` allows. `torch.load`
    allocates what the members declare, so this bounds it before it runs."""
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
                              f"(environment variable {variable('MAX_CHECKPOINT_MB')})", path)


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


# ---------------------------------------------------------------- steps 2 and 3: the values


def check_fields(payload: dict[str, Any], path: str | Path) -> None:
    """Step 2: the run's plain fields every use reads (the description's: `check_description`)."""
    problems = []
    if not is_int(payload["epoch"]) or payload["epoch"] < 0:
        problems.append(f"epoch {shown(payload['epoch'])} is not a count of epochs")
    if not isinstance(payload["state"], str) or payload["state"] not in [s.value for s in RunState]:
        problems.append(f"state {shown(payload['state'])} is not one of {[s.value for s in RunState]}")
    if not isinstance(payload["manifest_digest"], str):
        problems.append(f"manifest_digest {shown(payload['manifest_digest'])} is not a string")
    if payload.get("variant") is not None and not isinstance(payload["variant"], str):
        problems.append(f"variant {shown(payload['variant'])} is not a string")
    best = payload.get("best_mean_dice")
    if best is not None and not is_number(best):
        problems.append(f"best_mean_dice {shown(best)} is not a number")
    if problems:
        raise CheckpointError(f"its {problems[0]}", path)


def check_description(payload: dict[str, Any], path: str | Path) -> None:
    """Step 3: what a model and its inputs are built from, before anything is built: the one set
    of rules for a checkpoint (`load`) and for the config of an exported ONNX model (same keys,
    `train.runfiles.onnx_check`), which `describe` then reads.

    Channels: 1 to 4 distinct modality names; target: classes or regions; the run's context: 0 to
    `MAX_CONTEXT` neighbours; the model: a registered name's description with plain kwargs within
    `LIMITS`, taking the channels with their neighbours (at most `MAX_IN_CHANNELS`) and giving 3;
    preprocessing: a size (a positive multiple of what the model's depth halves, at most
    `BRATS_SHARDS_MAX_SIZE`) and a norm."""
    channels = payload.get("channels")
    if not isinstance(channels, list) or not 1 <= len(channels) <= len(CHANNELS) \
            or not all(isinstance(c, str) and c in CHANNELS for c in channels) or len(set(channels)) != len(channels):
        raise CheckpointError(f"its channels {shown(channels)} are not a list of 1 to {len(CHANNELS)} distinct "
                              f"modality names from {list(CHANNELS)}", path)
    target = payload.get("target")
    if not isinstance(target, str) or target not in TARGETS:
        raise CheckpointError(f"its target {shown(target)} is not one of {list(TARGETS)}", path)
    run = payload.get("config")
    if not isinstance(run, dict):
        raise CheckpointError("its config is not a dict", path)
    context = run.get("context", 0)
    if not is_int(context) or not 0 <= context <= MAX_CONTEXT:
        raise CheckpointError(f"its context {shown(context)} is not 0..{MAX_CONTEXT} neighbours", path)
    spec = payload.get("model")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise CheckpointError("holds no model description ('model': {name, kwargs, in_channels, out_channels})", path)
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and (v is None or type(v) in (str, int, float, bool))
                                               for k, v in kwargs.items()):
        raise CheckpointError(f"its model kwargs {shown(kwargs)} are not named plain values", path)
    in_channels = spec.get("in_channels", len(channels))
    if not is_int(in_channels) or not 1 <= in_channels <= MAX_IN_CHANNELS:
        raise CheckpointError(f"its model takes {shown(in_channels)} input channels; this tool's models take 1 to "
                              f"{MAX_IN_CHANNELS}", path)
    if in_channels != stacked_channels(len(channels), context):
        raise CheckpointError(f"its model takes {in_channels} input channels but lists {len(channels)} channel names "
                              f"({','.join(channels)}) with {context} neighbour(s) each side", path)
    out_channels = spec.get("out_channels", OUT_CHANNELS)
    if not is_int(out_channels) or out_channels != OUT_CHANNELS:
        raise CheckpointError(f"its model gives {shown(spec.get('out_channels'))} output channels; this tool's give "
                              f"{OUT_CHANNELS}", path)
    problem = size_problem(kwargs)
    if problem is not None:
        raise CheckpointError(f"its model {problem[0]} {problem[1]}", path)
    _check_preprocessing(payload.get("preprocessing"), kwargs, path)


def _check_preprocessing(pre: Any, kwargs: dict[str, Any], path: str | Path) -> None:
    if not isinstance(pre, dict):
        raise CheckpointError(f"its preprocessing {shown(pre)} is not a dict with a size and a norm", path)
    size, norm = pre.get("size"), pre.get("norm")
    if not is_int(size) or size < 1:
        raise CheckpointError(f"its preprocessing size {shown(size)} is not a positive integer", path)
    if size > limit("MAX_SIZE"):
        raise CheckpointError(f"its preprocessing size {size} is above the limit {limit('MAX_SIZE')} "
                              f"(environment variable {variable('MAX_SIZE')})", path)
    if not isinstance(norm, str) or norm not in NORMS:
        raise CheckpointError(f"its preprocessing norm {shown(norm)} is not one of {list(NORMS)}", path)
    if "depth" in kwargs:
        factor = 2 ** (kwargs["depth"] + (kwargs.get("stem", 1) == 2))
        if size % factor:
            raise CheckpointError(f"its preprocessing size {size} is not a multiple of {factor}, which its model's "
                                  f"depth {kwargs['depth']} needs", path)


# ---------------------------------------------------------------- step 4: the weights


def check_weights(payload: dict[str, Any], path: str | Path) -> None:
    """Step 4: `model_state` holds exactly the tensors, by name and shape, of the model the
    checkpoint describes, so loading them into it cannot fail or grow."""
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
