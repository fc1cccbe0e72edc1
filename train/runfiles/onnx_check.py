"""An `.onnx` model from someone else, checked like a shard before onnxruntime runs it.

`train predict --checkpoint model.onnx` runs a file another person made, and onnxruntime
allocates whatever its graph asks for when it loads and runs it (a 78 KB model with one added
`ConstantOfShape([25000, 25000])` took 2.9 GB). So the file is compared with the config it
carries and with the limits first, in this order, and refused in one line naming it:

1. the file (`read_model`): a regular file (never a FIFO or a device), at most
   `BRATS_SHARDS_MAX_CHECKPOINT_MB`, read once; these very bytes are checked and handed to
   onnxruntime, the path is never opened again;
2. the config (`model_config`, `check_config`): the JSON `train export` stores in the metadata
   under `brats_shards` (at most `MAX_CONFIG_BYTES`), else the `<stem>.json` beside the file, read
   bounded (`shards_spec.checked_io.read_json`); every field `predict` uses has its type, and the
   description passes a checkpoint's rules (`train.runfiles.checkpoint.check_description`: channels,
   target, context, preprocessing, the model within the limits), so `checkpoint.describe` reads it;
3. the frame (`check_frame`): the default ONNX domain only, opset 17 up to what the installed onnx
   knows, no functions, sparse or external tensors, no training info; one input `image` float32
   (batch, C, H, W) with C the config's input channels and batch, H, W symbolic, as `train export`
   writes them; one output `logits` float32 (batch, 3, H, W); only the operators `train export`
   writes for the registered models (`OPERATORS`), with windows (kernel, stride, dilation) of at
   most `MAX_WINDOW`;
4. the sizes (`check_sizes`), against the config's model built on torch's meta device (shapes,
   no memory) and run there on the very input `predict` feeds, (batch, C, size, size): every
   initializer holds the bytes its shape says, none larger than the model's largest weight and all
   together no more than its weights; then, with every shape inferred by onnx for that input, no
   tensor larger than `GROWTH` times the largest the model makes, all together, the node count and
   the convolutions' floating-point operations (the compute) within `GROWTH` times the model's own,
   and the output exactly (batch, 3, size, size).

A model `train export` wrote passes (tested for every registered model); a graph that would
allocate more than the network its config describes cannot.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards_spec.checked_io import parse_json, read_json, read_small, shown
from shards_spec.labels import TARGETS
from shards_spec.limits import ENV_PREFIX
from shards_spec.preprocess import NORMS

from ..runtime.extras import require
from . import checkpoint as ckpt
from .export import EXTRA, FORMAT, INPUT_NAME, METADATA_KEY, MIN_OPSET, OUTPUT_NAME, ExportError

MAX_CONFIG_BYTES = 1 << 20
"""The config in the metadata or beside the file (ours is about 2 KB)."""
OPERATORS = frozenset({"Conv", "ConvTranspose", "BatchNormalization", "Relu", "Sigmoid", "MaxPool", "Add", "Mul",
                       "Concat", "Identity"})
"""Operators `train export` writes for the registered models (measured with torch 2.13: Conv, Relu,
MaxPool, ConvTranspose, Concat, and Add, Mul, Sigmoid for the attention gates; BatchNormalization
and Identity where an exporter does not fold them). None of them makes a shape from data."""
MAX_WINDOW = 8
"""Largest kernel, stride or dilation an operator's attributes may give (ours: 3, 2 and 1)."""
WINDOW_ATTRIBUTES = ("kernel_shape", "strides", "dilations")
GROWTH = 2
"""How much larger than the config's model an ONNX graph may be: tensor by tensor, in total, in nodes and in FLOPs."""
SMALL = 1 << 12
"""Elements always allowed to a tensor and to the totals (biases, tiny constants)."""
FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass
class CheckedModel:
    """An ONNX model that passed every check: the bytes to hand to onnxruntime and its config."""

    data: bytes
    config: dict
    batch: int  # the batch size its sizes were checked at; run it with exactly this many images


def load_checked(path: str | Path, batch: int) -> CheckedModel:
    """Read and check the ONNX file `path` for running at `batch` images per call (module docstring)."""
    path = Path(path)
    data, proto = read_model(path)
    config, where = model_config(path, proto)
    check_config(config, where)
    ckpt.check_description(config, where)
    check_frame(proto, config, path)
    check_sizes(proto, config, batch, path)
    return CheckedModel(data=data, config=config, batch=batch)


def read_model(path: Path) -> tuple[bytes, Any]:
    """Step 1: the bytes of a regular file within `MAX_CHECKPOINT_MB`, parsed as an ONNX model."""

    onnx = require("onnx", EXTRA, "an ONNX model")
    limit = ckpt.limit("MAX_CHECKPOINT_MB")
    data = read_small(path, limit << 20, ExportError, f" (environment variable {ENV_PREFIX}MAX_CHECKPOINT_MB)")
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError, RecursionError, ... for bytes that are not ONNX
        raise ExportError(f"is not a readable ONNX model ({type(exc).__name__})", path) from None
    if not proto.HasField("graph"):
        raise ExportError("is not an ONNX model (it holds no graph)", path)
    return data, proto


def model_config(path: Path, proto: Any) -> tuple[dict, Path]:
    """Step 2: the config `train export` stored in the model's metadata, else in `<stem>.json`
    beside it; with the file it came from (for messages)."""
    stored = [p.value for p in proto.metadata_props if p.key == METADATA_KEY]
    if len(stored) > 1:
        raise ExportError(f"holds the metadata '{METADATA_KEY}' {len(stored)} times", path)
    if stored:
        if len(stored[0].encode()) > MAX_CONFIG_BYTES:
            raise ExportError(f"its metadata '{METADATA_KEY}' is larger than {MAX_CONFIG_BYTES >> 20} MiB "
                              "(train export writes about 2 KB)", path)
        return _config(parse_json(stored[0], f"{path} (metadata '{METADATA_KEY}')", ExportError), path), path
    beside = path.with_suffix(".json")
    if not os.path.lexists(beside):
        raise ExportError(f"holds no '{METADATA_KEY}' metadata and no {beside.name} lies beside it: export it with "
                          "`train export`", path)
    value = read_json(beside, MAX_CONFIG_BYTES, ExportError, "; a model.json of train export is about 2 KB")
    return _config(value, beside), beside


def _config(value: Any, where: object) -> dict:
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        found = value.get("format") if isinstance(value, dict) else type(value).__name__
        raise ExportError(f"not a {FORMAT} config (format {shown(found)})", where)
    return value


def check_config(config: dict, where: object) -> None:
    """Step 2: every field `predict` reads has its type (the model's sizes: `check_description`)."""
    pre, run = config.get("preprocessing"), config.get("config")
    checks = [
        ("model", isinstance(config.get("model"), dict), "an object {name, kwargs, in_channels, out_channels}"),
        ("channels", isinstance(config.get("channels"), list), "a list of modality names"),
        ("target", config.get("target") in TARGETS, f"one of {list(TARGETS)}"),
        ("preprocessing", isinstance(pre, dict), "an object"),
        ("preprocessing.norm", isinstance(pre, dict) and pre.get("norm") in NORMS, f"one of {list(NORMS)}"),
        ("preprocessing.size", isinstance(pre, dict) and _is_int(pre.get("size")), "an integer"),
        ("manifest_digest", isinstance(config.get("manifest_digest"), str), "a string"),
        ("epoch", _is_int(config.get("epoch")) and config["epoch"] >= 0, "a count of epochs"),
        ("variant", config.get("variant") is None or isinstance(config["variant"], str), "a string or null"),
        ("best_mean_dice", config.get("best_mean_dice") is None or (_is_int(config["best_mean_dice"]) or isinstance(config["best_mean_dice"], float)),
         "a number or null"),
        ("config", isinstance(run, dict), "an object (the run's options)"),
    ]
    for key, good, expected in checks:
        if not good:
            value = config
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            raise ExportError(f"its config's {key} {shown(value)} is not {expected}", where)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- the graph


def _dims(value_info: Any) -> list | None:
    """The dimensions of a tensor value (int or symbol name, None when neither), None without a shape."""
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type" or not value_info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def _check_port(port: Any, name: str, channels: int, role: str, path: Path) -> None:
    """An input or output as `train export` writes it: float32 (batch, channels, H, W), batch, H, W symbolic."""
    if port.name != name:
        raise ExportError(f"its {role} is named {shown(port.name)}; train export names it {name!r}", path)
    if port.type.WhichOneof("value") != "tensor_type" or port.type.tensor_type.elem_type != FLOAT:
        raise ExportError(f"its {role} {name!r} is not a float32 tensor", path)
    dims = _dims(port)
    if dims is None or len(dims) != 4:
        raise ExportError(f"its {role} {name!r} has shape {dims}; train export writes (batch, C, H, W)", path)
    if dims[1] != channels:
        raise ExportError(f"its {role} {name!r} has {shown(dims[1])} channels; its config's model has {channels}", path)
    fixed = [axis for i, axis in ((0, "batch"), (2, "H"), (3, "W")) if not isinstance(dims[i], str)]
    if fixed:
        raise ExportError(f"its {role} {name!r} has a fixed {', '.join(fixed)} (shape {dims}); train export writes "
                          "batch, H and W dynamic", path)


def check_frame(proto: Any, config: dict, path: Path) -> None:
    """Step 3 (module docstring): opset, inputs, outputs and operators as `train export` writes them."""
    import onnx

    graph = proto.graph
    domains = {o.domain: o.version for o in proto.opset_import}
    version = domains.pop("", None) or domains.pop("ai.onnx", None)
    if domains:
        raise ExportError(f"uses the operator set(s) {sorted(domains)}; train export writes the default ONNX one only",
                          path)
    newest = onnx.defs.onnx_opset_version()
    if version is None or not MIN_OPSET <= version <= newest:
        raise ExportError(f"has ONNX opset {version}; predict runs {MIN_OPSET} to {newest}", path)
    extras = [what for what, present in (("local functions", len(proto.functions)),
                                         ("training info", len(proto.training_info)),
                                         ("sparse initializers", len(graph.sparse_initializer))) if present]
    if extras:
        raise ExportError(f"holds {extras[0]}, which train export never writes", path)
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(f"has {len(graph.input)} input(s) and {len(graph.output)} output(s); train export writes "
                          f"one of each ({INPUT_NAME!r}, {OUTPUT_NAME!r})", path)
    _check_port(graph.input[0], INPUT_NAME, config["model"].get("in_channels", len(config["channels"])), "input", path)
    _check_port(graph.output[0], OUTPUT_NAME, ckpt.OUT_CHANNELS, "output", path)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPERATORS:
            op = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
            raise ExportError(f"its graph uses the operator {shown(op)}; a model of train export uses only "
                              f"{', '.join(sorted(OPERATORS))}", path)
        for attribute in node.attribute:
            if attribute.name in WINDOW_ATTRIBUTES and any(not 0 <= v <= MAX_WINDOW for v in attribute.ints):
                raise ExportError(f"its {node.op_type} node {shown(node.name)} has {attribute.name} "
                                  f"{shown(list(attribute.ints))}; train export writes windows of at most {MAX_WINDOW}",
                                  path)


@dataclass
class Reference:
    """What the config's model holds and makes for one input: elements of its largest weight and
    of all weights, of its largest intermediate tensor and of all of them, its operations and
    its convolutions' floating-point operations (torch's FLOP counter)."""

    weight_max: int
    weight_sum: int
    tensor_max: int
    tensor_sum: int
    operations: int
    flops: int


def reference(config: dict, batch: int, path: Path) -> Reference:
    """The config's model on torch's meta device (shapes without memory), run on (batch, C, size, size)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode

    class Sizes(TorchDispatchMode):
        """Elements of every tensor an operation makes."""

        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
            out = func(*args, **(kwargs or {}))
            self.sizes += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    spec = dict(config["model"])
    spec.setdefault("in_channels", len(config["channels"]))
    model = ckpt.meta_model(spec, path).eval()
    weights = [t.numel() for t in model.state_dict().values()]
    size = int(config["preprocessing"]["size"])
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter, Sizes() as sizes:
            model(torch.empty(batch, spec["in_channels"], size, size, device="meta"))
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        raise ExportError(f"its config's model cannot take a {size}x{size} input ({str(exc).splitlines()[0][:120]})",
                          path) from None
    return Reference(max(weights, default=0), sum(weights), max(sizes.sizes, default=0), sum(sizes.sizes),
                     len(sizes.sizes), int(counter.get_total_flops()))


def _elements(dims: Any) -> int:
    return math.prod(int(d) for d in dims)


def _check_initializers(graph: Any, ref: Reference, path: Path) -> None:
    """Each initializer float32 with exactly the data its shape says, within the model's weights."""
    total = 0
    for tensor in graph.initializer:
        name = shown(tensor.name)
        if tensor.data_type != FLOAT:
            raise ExportError(f"its initializer {name} is not float32; train export writes float32 weights", path)
        if tensor.data_location != 0 or tensor.external_data or tensor.HasField("segment"):
            raise ExportError(f"its initializer {name} points to data outside the file (external data or a segment); "
                              "train export stores every weight in the file", path)
        if any(d < 0 for d in tensor.dims):
            raise ExportError(f"its initializer {name} has a negative dimension {list(tensor.dims)}", path)
        count = _elements(tensor.dims)
        held = len(tensor.raw_data) // 4 if tensor.raw_data else len(tensor.float_data)
        if (tensor.raw_data and len(tensor.raw_data) != 4 * count) or held != count:
            raise ExportError(f"its initializer {name} of shape {list(tensor.dims)} holds {held} values, not {count}",
                              path)
        if count > max(ref.weight_max, SMALL):
            raise ExportError(f"its initializer {name} holds {count:,} values; the largest weight of its config's "
                              f"model holds {ref.weight_max:,}", path)
        total += count
    if total > ref.weight_sum + SMALL:
        raise ExportError(f"its initializers hold {total:,} values; its config's model has {ref.weight_sum:,} "
                          "weights", path)


def _skeleton(proto: Any, shape: list[int]) -> Any:
    """The graph without weight data: the input fixed to `shape`, each initializer an input of its
    type and shape (shape inference needs no values: no allowed operator reads a shape from data)."""
    import onnx

    graph = proto.graph
    inputs = [onnx.helper.make_tensor_value_info(INPUT_NAME, FLOAT, shape)]
    inputs += [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    bare = onnx.helper.make_graph(list(graph.node), "checked", inputs, list(graph.output))
    return onnx.helper.make_model(bare, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)


def check_sizes(proto: Any, config: dict, batch: int, path: Path) -> None:
    """Step 4 (module docstring): initializers, then every tensor's inferred shape, against the
    config's model run on (batch, C, size, size)."""
    import onnx

    ref = reference(config, batch, path)
    graph = proto.graph
    _check_initializers(graph, ref, path)
    if len(graph.node) > GROWTH * ref.operations + SMALL // 256:
        raise ExportError(f"its graph has {len(graph.node):,} nodes; its config's model makes {ref.operations:,} "
                          "operations", path)
    size = int(config["preprocessing"]["size"])
    channels = int(config["model"].get("in_channels", len(config["channels"])))
    shape = [batch, channels, size, size]
    try:
        skeleton = _skeleton(proto, shape)
        onnx.checker.check_model(skeleton)
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx's ValidationError, InferenceError, ... for a graph that is not well formed
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"its graph is not a valid ONNX graph ({reason})", path) from None
    values = {v.name: _dims(v) for v in (*inferred.graph.value_info, *inferred.graph.output)}
    _check_tensors(graph, values, ref, shape, path)
    values.update({t.name: list(t.dims) for t in graph.initializer}, **{INPUT_NAME: shape})
    flops = _convolution_flops(graph, values)
    if flops > GROWTH * ref.flops + SMALL:
        raise ExportError(f"its convolutions take {flops:,} floating-point operations for a {shape} input; its "
                          f"config's model takes {ref.flops:,}", path)


def _check_tensors(graph: Any, values: dict, ref: Reference, shape: list[int], path: Path) -> None:
    """Every tensor a node makes has an inferred shape within the bounds; the output is (batch, 3, size, size)."""
    total = ref.weight_sum + _elements(shape)
    for name in [o for node in graph.node for o in node.output if o]:
        dims = values.get(name)
        if dims is None or not all(isinstance(d, int) and d >= 0 for d in dims):
            raise ExportError(f"its graph's tensor {shown(name)} has a shape onnx cannot infer ({dims}) for a "
                              f"{shape} input", path)
        count = _elements(dims)
        if count > GROWTH * max(ref.tensor_max, ref.weight_max) + SMALL:
            raise ExportError(f"its graph's tensor {shown(name)} has shape {dims} ({count:,} values) for a {shape} "
                              f"input; its config's model makes none larger than {ref.tensor_max:,}", path)
        total += count
    if total > GROWTH * (ref.tensor_sum + ref.weight_sum + _elements(shape)) + SMALL:
        raise ExportError(f"its graph makes {total:,} values for a {shape} input; its config's model makes "
                          f"{ref.tensor_sum:,}", path)
    expected = [shape[0], ckpt.OUT_CHANNELS, *shape[2:]]
    if values.get(OUTPUT_NAME) != expected:
        raise ExportError(f"its output {OUTPUT_NAME!r} has shape {values.get(OUTPUT_NAME)} for a {shape} input, not "
                          f"{expected}", path)


def _convolution_flops(graph: Any, shapes: dict) -> int:
    """Floating-point operations of the graph's convolutions, counted as torch's FLOP counter does:
    2 x batch x weight elements x the output's (transposed: the input's) spatial elements."""
    total = 0
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            grid = shapes[node.input[0] if node.op_type == "ConvTranspose" else node.output[0]]
            total += 2 * grid[0] * _elements(grid[2:]) * _elements(shapes[node.input[1]])
    return total


__all__ = ["GROWTH", "MAX_CONFIG_BYTES", "MAX_WINDOW", "OPERATORS", "CheckedModel", "check_config", "check_frame", "check_sizes",
           "load_checked", "model_config", "read_model"]
