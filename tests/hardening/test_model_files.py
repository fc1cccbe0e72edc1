"""Model files (issue 20, classes 2, 3 and 8 for `train export`).

- an `.onnx` from someone else in `train predict`: each crafted model (built here from a real
  export: an added ConstantOfShape, a broadcast or a Concat chain or Conv padding that blows a
  tensor up with allowed operators, an initializer larger than the config's model holds or stored
  outside the file, a 31x31 pooling window or a chain of costly convolutions (compute, not
  memory), 2 output channels, a fixed 64x64 input, a foreign operator set, metadata
  `"config": "x"` or nested 100,000 deep) is one line naming the file and the problem, before
  onnxruntime is given anything; the unmodified model saved the same way passes the same check;
- the file itself: a FIFO, a link to /dev/zero, a 3 GiB `model.json` beside it: one line, never
  waited on or read whole; the real export still predicts (control);
- `train export` never replaces a file without `--overwrite` (a run's `config.json` with `--name
  config`, a user's `model.json`) and never its checkpoint, even with it; `--overwrite` replaces;
- `train export` on a full disk (RLIMIT_FSIZE, as the other full-disk tests): one line naming the
  output, the previous export byte for byte, no temporary; names of 230-255 bytes export, a name
  the folder cannot take is one line.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest

from shards_spec.fileio import TEMPORARY

from .helpers import assert_one_line, run_cli_inprocess, run_subprocess, snapshot

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}  # a limited process must not leave truncated .pyc files


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """The trained run's best.pt exported as ONNX (with model.json beside it)."""
    from train.runfiles import export

    out = tmp_path_factory.mktemp("exported")
    export.main(checkpoint=trained / "checkpoints" / "best.pt", out=out, formats=["onnx"], console=_quiet())
    return out / "model.onnx"


@pytest.fixture(scope="module")
def patient(pristine_src) -> Path:
    from etl.sources import scan_source

    return Path(scan_source(pristine_src).patients[0].meta["folder"])


@pytest.fixture
def no_onnxruntime_session(monkeypatch) -> list:
    """Records every onnxruntime session made: a refused model must never reach onnxruntime."""
    made = []
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        made.append(args[0] if args else kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    return made


def _predict(model: Path, patient: Path, out: Path, capsys) -> tuple[int, str]:
    code, _, err = run_cli_inprocess("train", ["predict", "--checkpoint", model, "--input", patient, "--out", out,
                                               "--device", "cpu"], capsys)
    return code, err


# ---------------------------------------------------------------- crafted graphs


def _config(proto) -> dict:
    return json.loads({p.key: p.value for p in proto.metadata_props}["brats_shards"])


def _set_config(proto, text: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == "brats_shards":
            prop.value = text


def _add_constant_of_shape(proto) -> None:
    proto.graph.initializer.append(numpy_helper.from_array(np.array([25000, 25000], dtype=np.int64), "big_shape"))
    proto.graph.node.append(helper.make_node("ConstantOfShape", ["big_shape"], ["big"]))


def _broadcast_blow_up(proto) -> None:
    """Allowed operators only: logits (B, 3, H, W) * k (4000, 1, 1, 1, 1) -> (4000, B, 3, H, W)."""
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((4000, 1, 1, 1, 1), np.float32), "k"))
    proto.graph.node.append(helper.make_node("Mul", ["logits", "k"], ["blown"]))


def _concat_chain(proto) -> None:
    """Allowed operators only: the input doubled 12 times along its channels."""
    name = "image"
    for i in range(12):
        proto.graph.node.append(helper.make_node("Concat", [name, name], [f"twice{i}"], axis=1))
        name = f"twice{i}"


def _conv_padding(proto) -> None:
    """Allowed operators only: the head convolution padded by 3000 on each side."""
    head = next(n for n in reversed(proto.graph.node) if n.op_type == "Conv")
    for attribute in list(head.attribute):
        if attribute.name == "pads":
            head.attribute.remove(attribute)
    head.attribute.append(helper.make_attribute("pads", [3000, 3000, 3000, 3000]))


def _pool_window(proto) -> None:
    """A pooling window of 31 x 31 (stride 1, same size out): no larger tensor, 240x the work."""
    pool = next(n for n in proto.graph.node if n.op_type == "MaxPool")
    del pool.attribute[:]
    pool.attribute.extend([helper.make_attribute("kernel_shape", [31, 31]), helper.make_attribute("strides", [1, 1]),
                           helper.make_attribute("pads", [15, 15, 15, 15])])


def _convolution_chain(proto) -> None:
    """Allowed operators, windows and sizes: ten same-size 8x8 convolutions after the first
    layer's activation (its width), each far costlier than any of the model's."""
    first = next(n for n in proto.graph.node if n.op_type == "Relu")
    width = next(numpy_helper.to_array(t).shape[0] for t in proto.graph.initializer
                 if t.name == next(n for n in proto.graph.node if n.op_type == "Conv").input[1])
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((width, width, 8, 8), np.float32), "w8"))
    name = first.output[0]
    for i in range(10):
        proto.graph.node.append(helper.make_node("Conv", [name, "w8"], [f"slow{i}"], pads=[3, 3, 4, 4]))
        name = f"slow{i}"


def _big_initializer(proto) -> None:
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros(50_000, np.float32), "extra"))


def _external_data(proto) -> None:
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="/etc/passwd")


def _two_output_channels(proto) -> None:
    """The head convolution cut to 2 channels, the output declared so: a consistent graph."""
    head = next(n for n in reversed(proto.graph.node) if n.op_type == "Conv")
    for tensor in proto.graph.initializer:
        if tensor.name in head.input[1:]:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor)[:2].copy(), tensor.name))
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 2


def _fixed_input(proto) -> None:
    for port in (proto.graph.input[0], proto.graph.output[0]):
        for axis in (2, 3):
            port.type.tensor_type.shape.dim[axis].dim_value = 64


def _foreign_operator_set(proto) -> None:
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    proto.graph.node.append(helper.make_node("Gelu", ["logits"], ["gelu"], domain="com.microsoft"))


def _config_x(proto) -> None:
    _set_config(proto, json.dumps({**_config(proto), "config": "x"}))


def _nested(proto) -> None:
    text = json.dumps(_config(proto))
    _set_config(proto, text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")


CRAFTED = {
    "constant_of_shape": (_add_constant_of_shape, "ConstantOfShape"),
    "broadcast": (_broadcast_blow_up, "tensor 'blown' has shape [4000"),
    "concat_chain": (_concat_chain, "tensor 'twice"),
    "conv_padding": (_conv_padding, "tensor 'logits' has shape [32, 3, 6016, 6016]"),
    "pool_window": (_pool_window, "kernel_shape [31, 31]"),
    "convolution_chain": (_convolution_chain, "floating-point operations"),
    "big_initializer": (_big_initializer, "initializer 'extra' holds 50,000 values"),
    "external_data": (_external_data, "external data"),
    "two_channels": (_two_output_channels, "output 'logits' has 2 channels"),
    "fixed_input": (_fixed_input, "fixed H, W"),
    "foreign_ops": (_foreign_operator_set, "com.microsoft"),
    "config_x": (_config_x, "config's config 'x' is not an object"),
    "nested_metadata": (_nested, "nested more than"),
}


@pytest.mark.slow
@pytest.mark.parametrize("craft", sorted(CRAFTED))
def test_crafted_onnx_is_refused_in_one_line_before_onnxruntime(exported, patient, tmp_path, capsys,
                                                                no_onnxruntime_session, craft):
    from train.runfiles import onnx_check

    good = tmp_path / "good.onnx"
    onnx.save(onnx.load(str(exported)), str(good))
    onnx_check.load_checked(good, 32)  # control: the same load-save round trip, unmodified, passes

    proto = onnx.load(str(exported))
    mutate, fragment = CRAFTED[craft]
    mutate(proto)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(proto.SerializeToString())
    code, err = _predict(bad, patient, tmp_path / "seg.nii.gz", capsys)
    assert_one_line(code, err, str(bad), fragment)
    assert no_onnxruntime_session == []
    assert not (tmp_path / "seg.nii.gz").exists()


def test_model_file_that_is_no_file_or_a_huge_side_file_is_one_line(exported, patient, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    code, err = _predict(exported, patient, out, capsys)  # control: the real export predicts
    assert code == 0 and out.is_file(), err
    seg = np.asarray(__import__("nibabel").load(str(out)).dataobj)
    assert set(np.unique(seg)) <= {0, 1, 2, 4}

    fifo = tmp_path / "fifo" / "model.onnx"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    code, err = _predict(fifo, patient, tmp_path / "a.nii.gz", capsys)
    assert_one_line(code, err, str(fifo), "FIFO")

    zero = tmp_path / "zero" / "model.onnx"
    zero.parent.mkdir()
    zero.symlink_to("/dev/zero")
    code, err = _predict(zero, patient, tmp_path / "b.nii.gz", capsys)
    assert_one_line(code, err, str(zero), "device")

    bare = tmp_path / "bare" / "model.onnx"  # no metadata: the config is read from model.json beside it
    bare.parent.mkdir()
    proto = onnx.load(str(exported))
    config = _config(proto)
    del proto.metadata_props[:]
    bare.write_bytes(proto.SerializeToString())
    side = bare.with_suffix(".json")
    side.write_text(json.dumps(config))
    code, err = _predict(bare, patient, tmp_path / "c.nii.gz", capsys)  # control: read from the side file
    assert code == 0, err
    with open(side, "r+b") as handle:
        handle.truncate(3 << 30)  # 3 GiB, sparse
    code, err = _predict(bare, patient, tmp_path / "d.nii.gz", capsys)
    assert_one_line(code, err, str(side), "larger than 1 MiB")
    assert not [p for p in tmp_path.iterdir() if p.name in ("a.nii.gz", "b.nii.gz", "d.nii.gz")]


# ---------------------------------------------------------------- train export's outputs


@pytest.mark.slow
def test_export_never_replaces_a_file_without_overwrite_nor_its_checkpoint(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    best = run / "checkpoints" / "best.pt"
    before = snapshot(run)
    code, _, err = run_cli_inprocess("train", ["export", "--checkpoint", best, "--out", run, "--name", "config",
                                               "--format", "pt2"], capsys)
    assert_one_line(code, err, str(run / "config.json"), "exists already", "--overwrite")
    assert snapshot(run) == before

    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "model.json").write_text("my notes\n")
    code, _, err = run_cli_inprocess("train", ["export", "--checkpoint", best, "--out", folder, "--format", "pt2"],
                                     capsys)
    assert_one_line(code, err, str(folder / "model.json"), "exists already")
    assert sorted(os.listdir(folder)) == ["model.json"] and (folder / "model.json").read_text() == "my notes\n"
    code, _, err = run_cli_inprocess("train", ["export", "--checkpoint", best, "--out", folder, "--format", "pt2",
                                               "--overwrite"], capsys)
    assert code == 0, err  # control: --overwrite replaces
    assert json.loads((folder / "model.json").read_text())["format"] == "brats-export/1"
    assert (folder / "model.pt2").stat().st_size > 0

    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "model.json").symlink_to(best)  # an output that reaches the checkpoint
    kept = best.read_bytes()
    code, _, err = run_cli_inprocess("train", ["export", "--checkpoint", best, "--out", linked, "--format", "pt2",
                                               "--overwrite"], capsys)
    assert_one_line(code, err, str(linked / "model.json"), "is the checkpoint")
    assert best.read_bytes() == kept and sorted(os.listdir(linked)) == ["model.json"]


@pytest.mark.slow
def test_export_on_a_full_disk_is_one_line_and_keeps_the_previous_export(trained, tmp_path, capsys):
    best = trained / "checkpoints" / "best.pt"
    out = tmp_path / "exp"
    args = ["export", "--checkpoint", best, "--out", out, "--format", "onnx", "--format", "safetensors"]
    code, _, err = run_cli_inprocess("train", args, capsys)
    assert code == 0, err  # control: the previous export
    before = snapshot(out)
    limit = (out / "model.json").stat().st_size + 1024  # the config fits, the model does not

    def small() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    limited = run_subprocess("train", [*args, "--overwrite"], env=NO_PYC, preexec_fn=small)
    assert limited.returncode == 2, limited.stderr  # not SIGABRT
    line = assert_one_line(limited.returncode, limited.stderr, "File too large", str(out / "model.onnx"))
    assert ".partial" not in line
    assert snapshot(out) == before
    assert [p for p in out.iterdir() if TEMPORARY.match(p.name)] == []


@pytest.mark.slow
def test_export_names_up_to_the_folder_limit(trained, tmp_path, capsys):
    best = trained / "checkpoints" / "best.pt"
    out = tmp_path / "exp"
    name = "m" * 240  # model.json is 245 bytes, its temporary name would be longer than 255
    code, _, err = run_cli_inprocess("train", ["export", "--checkpoint", best, "--out", out, "--name", name,
                                               "--format", "pt2"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted([f"{name}.json", f"{name}.pt2"])
    longer = "m" * 245  # .safetensors: 257 bytes
    code, _, err = run_cli_inprocess("train", ["export", "--checkpoint", best, "--out", out, "--name", longer,
                                               "--format", "safetensors"], capsys)
    assert_one_line(code, err, "--name", "257 bytes")
    assert sorted(os.listdir(out)) == sorted([f"{name}.json", f"{name}.pt2"])
