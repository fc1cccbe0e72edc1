"""`train export`: a checkpoint out of the lab, as ONNX, a `torch.export` program and safetensors.

    train export --checkpoint runs/v1/checkpoints/best.pt --out exported/
    train export --checkpoint best.pt --out exported/ --format onnx --opset 18
    train predict --checkpoint exported/model.onnx --input BraTS20_Training_001/ --out 001_seg.nii.gz

Writes into OUT (each file only for the formats asked for; `--name` changes "model"):

- `model.onnx`: the network, input `image` float32 (batch, C, H, W), output `logits` float32
  (batch, 3, H, W) (apply a sigmoid per channel), batch and H, W dynamic (H and W multiples of
  2**depth, which the graph's input shape says, e.g. `16*h`); opset >= 17 (default 18), made by
  torch's dynamo exporter (needs onnxscript). The config below is in its `metadata_props` under
  `brats_shards`, so `train predict --checkpoint model.onnx` runs from that one file with
  onnxruntime, without building the torch model;
- `model.pt2`: a `torch.export` program with the same dynamic dimensions
  (`torch.export.load(path).module()(image)`);
- `model.safetensors`: the weights (the checkpoint's `model_state`) with the config in the
  file's metadata under `brats_shards`, for loading into `train.models.build_model(**model)`;
- `model.json`: the config, readable by people and programs: `format` ("brats-export/1"),
  `model` {name, kwargs, in_channels, out_channels}, `channels` (input order), `target`
  (classes or regions) with `output.channel_names` and the 0.5 threshold, `preprocessing` (the
  manifest's: size, norm, ...; apply `shards_spec.preprocess` with it), `labels`,
  `manifest_digest` (the shards the model was trained on), `epoch`, `variant`, `config` (the
  run's resolved options), `source` (checkpoint name and sha256), `versions`.

The checkpoint is read with `torch.load(weights_only=True)` (`train.runfiles.checkpoint.load`). Before
it is read, every output is checked as `train predict` checks its own: one that is the checkpoint
(the same file on disk, through links too) is refused always, one that exists already (a run's
`config.json` with `--name config`, a `model.json` beside an earlier export) unless `overwrite`,
and a name longer than the folder accepts at once. Each format is made in memory and written by
us through a temporary name (`shards_spec.fileio.atomic_path`); all are renamed into place only
when all were written, so a refused write (a full disk) is one line naming that output, and leaves
the previous files and no temporary behind. ONNX and safetensors need the optional extra
`[export]` (onnx, onnxruntime, onnxscript, safetensors); an ONNX model from someone else is
checked before it runs by `train.runfiles.onnx_check`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from shards_spec.checked_io import refuse_broken_link
from shards_spec.errors import ToolError
from shards_spec.fileio import atomic_path, name_max, refusal, sha256_file

from ..metrics import THRESHOLD
from ..runtime.extras import require
from . import checkpoint as ckpt

FORMAT = "brats-export/1"
FORMATS = ("onnx", "pt2", "safetensors")
METADATA_KEY = "brats_shards"
"""Key of the config in the ONNX `metadata_props` and the safetensors metadata."""
DEFAULT_OPSET = 18
MIN_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"
EXTRA = "export"


class ExportError(ToolError):
    """A checkpoint that cannot be exported, a bad option, or an exported model that cannot be read."""


def main(checkpoint: Path, out: Path, formats: Sequence[str] = FORMATS, name: str = "model",
         opset: int = DEFAULT_OPSET, console: Any = None, overwrite: bool = False) -> dict[str, Path]:
    """Export `checkpoint` into the folder `out` (see the module docstring); returns format -> file.
    An output that exists already is replaced only with `overwrite`; the checkpoint never."""
    from rich.console import Console

    console = console or Console(stderr=True, soft_wrap=True)
    formats = _check_options(formats, name, opset)
    out = Path(out)
    paths = {fmt: out / f"{name}.{fmt}" for fmt in formats}
    paths["json"] = out / f"{name}.json"
    check_outputs(paths, Path(checkpoint), overwrite)
    if {"onnx", "safetensors"} & set(formats):

        for module in ("onnx", "onnxscript", "safetensors"):
            require(module, EXTRA, "train export")
    payload = ckpt.load(checkpoint)
    config = export_config(payload, Path(checkpoint))
    model = build_torch_model(payload, Path(checkpoint))
    makers: dict[str, Callable[[], bytes]] = {
        "onnx": lambda: onnx_bytes(model, config, opset),
        "pt2": lambda: program_bytes(model, config),
        "safetensors": lambda: safetensors_bytes(payload["model_state"], config),
        "json": lambda: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }
    write_all({key: (path, makers[key]) for key, path in paths.items()}, overwrite)
    for key, path in paths.items():
        size = path.stat().st_size
        console.print(f"{key:12s} {path} ({size / 1e6:.1f} MB)" if size >= 1e5 else f"{key:12s} {path} ({size / 1e3:.1f} kB)")
    return paths


def _check_options(formats: Sequence[str], name: str, opset: int) -> list[str]:
    chosen = list(dict.fromkeys(formats)) or list(FORMATS)
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise ExportError(f"--format: unknown {unknown}; choose from {list(FORMATS)}")
    if opset < MIN_OPSET:
        raise ExportError(f"--opset: must be >= {MIN_OPSET}, got {opset}")
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise ExportError(f"--name: a plain file name without a folder, got {name!r}"[:200])
    return chosen


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file `path` reaches (links followed); None when nothing is there."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_outputs(paths: dict[str, Path], checkpoint: Path, overwrite: bool) -> None:
    """Before anything is read: refuse an output that is the checkpoint (always), one that exists
    already (unless `overwrite`), a folder in its place, or a name longer than the folder takes."""
    out = next(iter(paths.values())).parent
    refuse_broken_link(out, ExportError)
    if out.exists() and not out.is_dir():
        raise ExportError("--out must be a folder", out)
    longest = name_max(out if out.is_dir() else out.parent)
    source = _identity(checkpoint)
    existing = []
    for path in paths.values():
        if len(os.fsencode(path.name)) > longest:
            raise ExportError(f"--name: the file name is {len(os.fsencode(path.name))} bytes, longer than the "
                              f"{longest} the folder accepts", path)
        if source is not None and _identity(path) == source:
            raise ExportError(f"is the checkpoint {checkpoint}: export never writes over its input; give another "
                              "--out or --name", path)
        if path.is_dir():
            raise ExportError("is a folder; the export is written as a file of that name", path)
        if os.path.lexists(path) and not overwrite:
            existing.append(path)
    if len(existing) == 1:
        raise ExportError("exists already; pass --overwrite to replace it", existing[0])
    if existing:
        shown = ", ".join(p.name for p in existing)
        raise ExportError(f"holds {len(existing)} of the outputs already ({shown}); pass --overwrite to replace "
                          "those files (nothing else in the folder is touched)", out)


def write_all(outputs: dict[str, tuple[Path, Callable[[], bytes]]], overwrite: bool) -> None:
    """Make and write every output under a temporary name, then rename them all into place; on
    any failure remove every temporary (and `out` if this call created it and it stays empty).
    An output that appeared meanwhile is replaced only with `overwrite` (checked again here)."""
    out = next(iter(outputs.values()))[0].parent
    created = not os.path.lexists(out)
    try:
        _write_all(outputs, overwrite)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty
        raise


def _write_all(outputs: dict[str, tuple[Path, Callable[[], bytes]]], overwrite: bool) -> None:
    try:
        with contextlib.ExitStack() as stack:
            for path, make in outputs.values():
                data = make()
                try:
                    tmp = stack.enter_context(atomic_path(path))
                    with open(tmp, "wb") as handle:
                        handle.write(data)
                except OSError as exc:
                    raise ExportError(f"cannot be written ({refusal(exc)})", path) from None
            taken = [path for path, _ in outputs.values() if os.path.lexists(path)]
            if taken and not overwrite:
                raise ExportError("was written by someone else while exporting; pass --overwrite to replace it",
                                  taken[0])
    except OSError as exc:  # a rename into place
        raise ExportError(f"cannot be written ({refusal(exc)})", exc.filename or next(iter(outputs.values()))[0]) \
            from None


# ---------------------------------------------------------------- the config written beside the weights


def export_config(payload: dict, checkpoint: Path) -> dict:
    """What a consumer of the exported model needs to preprocess its input and read its output:
    the checkpoint's description (`checkpoint.describe`, the keys `predict` reads back from an
    ONNX model), its input and output, and where it came from."""
    import torch

    described = ckpt.describe(payload)
    return {
        "format": FORMAT,
        **described.record(),
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", described.in_channels, "H", "W"],
                  "spatial_multiple": described.spatial_multiple},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", 3, "H", "W"], "activation": "sigmoid",
                   "channel_names": list(described.channel_names), "threshold": THRESHOLD},
        "source": {"checkpoint": checkpoint.name, "sha256": sha256_file(checkpoint)[1]},
        "versions": {"torch": str(torch.__version__)},
    }


# ---------------------------------------------------------------- the three formats


def build_torch_model(payload: dict, where: object) -> Any:
    """The checkpoint's model with its weights, in eval mode on the CPU (`checkpoint.build_model_of`)."""
    return ckpt.build_model_of(payload, where)


def example_and_dims(config: dict) -> tuple[tuple, dict]:
    """An example input on the shard grid and the dynamic dimensions: batch >= 1, H and W any
    multiple of 2**depth (a derived dimension, so the exported graph states the constraint)."""
    import torch

    multiple = int(config["input"]["spatial_multiple"])
    size = int(config["preprocessing"].get("size") or 2 * multiple)
    size = max(2 * multiple, size - size % multiple)  # 2 blocks at least: torch.export specialises sizes 0 and 1
    example = torch.zeros(2, len(config["channels"]), size, size)
    batch = torch.export.Dim("batch", min=1)
    height, width = torch.export.Dim("h", min=1), torch.export.Dim("w", min=1)
    return (example,), {"x": {0: batch, 2: multiple * height, 3: multiple * width}}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters log about absent torchvision ops and deprecations: not the user's concern."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "torch._export")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def onnx_bytes(model: Any, config: dict, opset: int = DEFAULT_OPSET) -> bytes:
    """ONNX with dynamic batch and spatial size and the config in its metadata, as bytes: one
    protobuf (never external data files beside it), written by us (`write_all`)."""
    import torch

    args, dims = example_and_dims(config)
    try:
        with _quiet_exporter(), contextlib.redirect_stdout(None):
            program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=dims, verbose=False)
    except Exception as exc:  # the exporter raises its own error types for an unsupported operator
        raise ExportError(f"ONNX export of model {config['model']['name']!r} failed: "
                          f"{str(exc).strip().splitlines()[0][:200]}") from None
    program.model.metadata_props[METADATA_KEY] = json.dumps(config, sort_keys=True)
    program.model.doc_string = (f"brats-shards {config['model']['name']}: {INPUT_NAME} (batch, "
                                f"{len(config['channels'])}, H, W) -> {OUTPUT_NAME} (batch, 3, H, W); see "
                                f"metadata '{METADATA_KEY}'")
    try:
        return program.model_proto.SerializeToString()
    except ValueError as exc:  # protobuf refuses a message over 2 GiB
        raise ExportError(f"ONNX export of model {config['model']['name']!r} failed: {str(exc)[:160]} (an ONNX "
                          "file holds at most 2 GiB; export --format pt2 or safetensors)") from None


def program_bytes(model: Any, config: dict) -> bytes:
    """A `torch.export` program (.pt2) with the same dynamic dimensions, as bytes (torch's own
    writer aborts the process on a full disk: it never writes a file here)."""
    import torch

    args, dims = example_and_dims(config)
    buffer = io.BytesIO()
    with _quiet_exporter():
        program = torch.export.export(model, args, dynamic_shapes=dims)
        torch.export.save(program, buffer)
    return buffer.getvalue()


def safetensors_bytes(state: dict, config: dict) -> bytes:
    """The weights as safetensors, the config in the file's metadata (string values only)."""
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    return save(tensors, metadata={METADATA_KEY: json.dumps(config, sort_keys=True)})


__all__ = ["ExportError", "FORMAT", "FORMATS", "METADATA_KEY", "check_outputs", "export_config", "main", "onnx_bytes",
           "program_bytes", "safetensors_bytes", "write_all"]
