"""`train export` and `train predict` from ONNX, checked against the real libraries:

- the ONNX file under onnxruntime vs the torch model (within 1e-4) at two batch sizes and two
  spatial sizes neither of which it was exported with; opset and dynamic dimensions read with
  `onnx`; the config in its metadata equals the JSON beside it and the checkpoint's own fields;
- safetensors read back with `safetensors.torch.load_file` equals the checkpoint's state dict;
- the `torch.export` program loaded with `torch.export.load` runs and agrees with the model;
- `train predict --checkpoint model.onnx` gives the torch path's segmentation (label flips only
  at voxels whose probability lies within 1e-4 of a decision boundary);
- every registered model, with the options that change its graph, exports to a graph that
  `train.runfiles.onnx_check` passes (only its operators); onnxruntime always gets the checked batch;
- a missing extra, a bad opset, a failed format: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers.predict import (
    make_shards,
    make_source,
    manifest_of,
    patient_folders,
    run_cli,
    save_checkpoint,
    unet_checkpoint,
)
from train import models
from train.apply import inference, predict
from train.runfiles import checkpoint as ckpt, export

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
safetensors_torch = pytest.importorskip("safetensors.torch")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src"), "brats2020", patients=3)


@pytest.fixture(scope="module")
def manifest(src, tmp_path_factory):
    return manifest_of(make_shards(src, tmp_path_factory.mktemp("shards") / "s32", size=32))


def attention_checkpoint(path: Path, manifest, target: str) -> Path:
    """A random attention U-Net (base 4, depth 2) with BN statistics that are not the defaults."""
    torch.manual_seed(1)
    kwargs = {"base": 4, "depth": 2, "batch_norm": True}
    model = models.build_model("attention_unet", in_channels=2, **kwargs)
    with torch.no_grad():
        model.train()(torch.randn(4, 2, 32, 32) * 2 + 0.5)  # moves running mean/var off 0/1
    return save_checkpoint(path, model.eval(), "attention_unet", kwargs, ("t1ce", "flair"), target, manifest)


@pytest.fixture(scope="module")
def exported(manifest, tmp_path_factory):
    """Both models exported once, all formats: {name: (checkpoint, {format: path})}."""
    root = tmp_path_factory.mktemp("export")
    result = {}
    for name, make in (("unet", lambda p: unet_checkpoint(p, manifest, target="regions")),
                       ("attention_unet", lambda p: attention_checkpoint(p, manifest, "classes"))):
        checkpoint = make(root / f"{name}.pt")
        result[name] = (checkpoint, export.main(checkpoint=checkpoint, out=root / name))
    return result


def torch_model(checkpoint: Path):
    payload = torch.load(checkpoint, weights_only=True)
    spec = payload["model"]
    model = models.build_model(spec["name"], in_channels=spec["in_channels"], **spec["kwargs"])
    model.load_state_dict(payload["model_state"])
    return model.eval(), payload


# ---------------------------------------------------------------- the three formats


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "attention_unet"])
def test_onnx_matches_torch_at_other_batch_and_spatial_sizes(exported, name):
    checkpoint, paths = exported[name]
    model, _ = torch_model(checkpoint)
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(1, 2, 32, 32), (3, 2, 32, 32), (1, 2, 48, 20), (3, 2, 48, 20)]:  # exported at (2, 2, 32, 32)
        image = rng.normal(0, 1.5, size=shape).astype(np.float32)
        (logits,) = session.run(["logits"], {"image": image})
        with torch.no_grad():
            expected = model(torch.from_numpy(image)).numpy()
        assert logits.shape == (shape[0], 3, *shape[2:])
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
        assert np.abs(expected).max() > 0.01  # not a trivially zero network


def test_onnx_graph_opset_dynamic_dims_and_metadata(exported):
    checkpoint, paths = exported["unet"]
    proto = onnx.load(str(paths["onnx"]))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 2 and all(isinstance(d, str) and d for d in (dims[0], dims[2], dims[3])), dims
    stored = json.loads({p.key: p.value for p in proto.metadata_props}[export.METADATA_KEY])
    beside = json.loads(paths["json"].read_text())
    assert stored == beside
    payload = torch.load(checkpoint, weights_only=True)
    assert beside["channels"] == payload["channels"] == ["t1ce", "flair"]
    assert beside["target"] == payload["target"] == "regions"
    assert beside["preprocessing"] == payload["preprocessing"] and beside["preprocessing"]["size"] == 32
    assert beside["manifest_digest"] == payload["manifest_digest"]
    assert beside["model"] == {"name": "unet", "kwargs": {"base": 4, "depth": 2, "batch_norm": True},
                               "in_channels": 2, "out_channels": 3}
    assert beside["output"]["channel_names"] == ["WT", "TC", "ET"] and beside["input"]["spatial_multiple"] == 4
    import hashlib

    assert beside["source"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_registered_model_exports_to_a_graph_the_onnx_check_passes(tmp_path, manifest, name):
    """`train.runfiles.onnx_check.OPERATORS` and its size bounds hold for what `train export` writes, with
    the options that change the graph (stem 2, deep supervision, no batch norm); a new model or
    exporter that writes other operators fails here, not in a user's `predict`."""
    from train.runfiles import onnx_check

    kwargs = {"base": 4, "depth": 2, "batch_norm": False, "stem": 2, "deep_supervision": True}
    model = models.build_model(name, in_channels=2, **kwargs).eval()
    checkpoint = save_checkpoint(tmp_path / "m.pt", model, name, kwargs, ("t1ce", "flair"), "classes", manifest)
    paths = export.main(checkpoint=checkpoint, out=tmp_path / "exp", formats=["onnx"])
    checked = onnx_check.load_checked(paths["onnx"], 3)
    assert checked.config["model"]["kwargs"] == kwargs and checked.batch == 3
    proto = onnx.load(str(paths["onnx"]))
    assert {node.op_type for node in proto.graph.node} <= onnx_check.OPERATORS


def test_safetensors_round_trip_equals_state_dict(exported):
    checkpoint, paths = exported["attention_unet"]
    _, payload = torch_model(checkpoint)
    loaded = safetensors_torch.load_file(str(paths["safetensors"]))
    assert sorted(loaded) == sorted(payload["model_state"])
    for key, value in payload["model_state"].items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    from safetensors import safe_open

    with safe_open(str(paths["safetensors"]), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[export.METADATA_KEY])
    assert metadata == json.loads(paths["json"].read_text())
    # the weights and the config rebuild the model
    rebuilt = models.build_model(metadata["model"]["name"], in_channels=metadata["model"]["in_channels"],
                                 **metadata["model"]["kwargs"])
    rebuilt.load_state_dict(loaded)


@pytest.mark.slow
def test_exported_program_runs(exported):
    checkpoint, paths = exported["attention_unet"]
    model, _ = torch_model(checkpoint)
    program = torch.export.load(str(paths["pt2"]))
    image = torch.randn(3, 2, 24, 40)
    with torch.no_grad():
        np.testing.assert_allclose(program.module()(image).numpy(), model(image).numpy(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- predict from ONNX


def boundary_distance(probs: np.ndarray, target: str) -> np.ndarray:
    """Per voxel, how far its probabilities are from changing its label: from the 0.5 threshold
    for every channel, and for `classes` also from a tie between the two largest channels."""
    distance = np.abs(probs - 0.5).min(axis=-1)
    if target == "classes":
        top2 = np.sort(probs, axis=-1)[..., -2:]
        distance = np.minimum(distance, top2[..., 1] - top2[..., 0])
    return distance


@pytest.mark.parametrize("name,target", [("unet", "regions"), ("attention_unet", "classes")])
def test_predict_from_onnx_equals_torch_path(tmp_path, exported, src, name, target):
    checkpoint, paths = exported[name]
    folder = patient_folders(src)[0]
    from_torch = predict.main(checkpoint=checkpoint, inputs=[folder], out=tmp_path / "t.nii.gz", device="cpu",
                              probabilities=True, batch_size=5)[0]
    from_onnx = predict.main(checkpoint=paths["onnx"], inputs=[folder], out=tmp_path / "o.nii.gz", device="cpu",
                             probabilities=True, batch_size=7)[0]
    seg_t, seg_o = (np.asarray(nib.load(str(w.segmentation)).dataobj) for w in (from_torch, from_onnx))
    probs_t, probs_o = (np.asarray(nib.load(str(w.probabilities)).dataobj) for w in (from_torch, from_onnx))
    np.testing.assert_allclose(probs_o, probs_t, atol=1e-4, rtol=0)
    assert np.count_nonzero(seg_t) > 0
    flips = seg_t != seg_o
    assert (boundary_distance(probs_t[flips], target) <= 1e-4).all()
    np.testing.assert_allclose(nib.load(str(from_onnx.segmentation)).affine, nib.load(str(from_torch.segmentation)).affine)


def test_onnx_predict_needs_no_torch_model(tmp_path, exported, src, monkeypatch):
    """The ONNX path never builds the torch model with weights (only its shapes on the meta
    device, for the size check): with that path disabled it still predicts."""
    _, paths = exported["unet"]

    def refuse(*args, **kwargs):
        raise AssertionError("the ONNX path built the torch model")

    monkeypatch.setattr(ckpt, "build_model_of", refuse)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", refuse)
    loaded = inference.load_model(paths["onnx"], "cpu", onnx=True)
    assert isinstance(loaded.model, inference.OnnxModel)
    assert (loaded.channels, loaded.target, loaded.size) == (["t1ce", "flair"], "regions", 32)
    predict.main(checkpoint=paths["onnx"], inputs=[patient_folders(src)[1]], out=tmp_path / "s.nii.gz", device="cpu")
    assert (tmp_path / "s.nii.gz").is_file()


def test_onnx_runs_every_call_at_the_checked_batch(exported):
    """onnxruntime always gets the batch size the graph's sizes were checked for (a shorter batch
    padded with zeros), and the padding changes no probability."""
    _, paths = exported["unet"]
    loaded = inference.load_model(paths["onnx"], "cpu", onnx=True, batch_size=4)
    session, seen = loaded.model.session, []

    class Spy:
        def run(self, names, feed):
            seen.append(next(iter(feed.values())).shape)
            return session.run(names, feed)

    loaded.model.session = Spy()
    images = np.random.default_rng(0).normal(size=(10, 2, 32, 32)).astype(np.float32)
    probs = inference.predict_slices(loaded, images, batch_size=3)
    assert seen and set(seen) == {(4, 2, 32, 32)}
    one_by_one = np.concatenate([loaded.model.probabilities(images[i:i + 1]) for i in range(10)])
    np.testing.assert_allclose(probs, one_by_one, atol=1e-6)


def test_onnx_without_metadata_reads_the_json_beside_it(tmp_path, exported):
    _, paths = exported["unet"]
    proto = onnx.load(str(paths["onnx"]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(export.ExportError, match="no bare.json lies beside it"):
        inference.load_model(bare, "cpu", onnx=True)
    (tmp_path / "bare.json").write_bytes(paths["json"].read_bytes())
    assert inference.load_model(bare, "cpu", onnx=True).target == "regions"


# ---------------------------------------------------------------- errors: one line, nothing written


@pytest.mark.slow
def test_missing_extra_is_one_line_naming_it(tmp_path, exported, src, monkeypatch, capsys):
    checkpoint, paths = exported["unet"]
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    code, _, err = run_cli(["export", "--checkpoint", checkpoint, "--out", tmp_path / "x"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "[export]" in lines[0] and "onnxscript" in lines[0] and "pip install" in lines[0]
    assert not (tmp_path / "x").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = run_cli(["predict", "--checkpoint", paths["onnx"], "--input", patient_folders(src)[0],
                            "--out", tmp_path / "s.nii.gz"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "[export]" in err, err
    # pt2 alone needs no extra
    code, _, err = run_cli(["export", "--checkpoint", checkpoint, "--out", tmp_path / "p", "--format", "pt2"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["model.json", "model.pt2"]


@pytest.mark.slow
def test_bad_options_and_failures_leave_nothing(tmp_path, exported, monkeypatch, capsys):
    checkpoint, _ = exported["unet"]
    code, _, err = run_cli(["export", "--checkpoint", checkpoint, "--out", tmp_path / "o", "--opset", "16"], capsys)
    assert code == 2 and "--opset" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["export", "--checkpoint", checkpoint, "--out", tmp_path / "o", "--format", "tflite"],
                           capsys)
    assert code == 2 and "tflite" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(["export", "--checkpoint", bad, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "bad.pt" in err

    def fail(*args, **kwargs):
        raise export.ExportError("torch.export refused it")

    monkeypatch.setattr(export, "program_bytes", fail)  # onnx is written before pt2 fails
    code, _, err = run_cli(["export", "--checkpoint", checkpoint, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "refused" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_evaluate_refuses_an_onnx_model(exported):
    _, paths = exported["unet"]
    with pytest.raises(inference.InferenceError, match="train predict"):
        inference.load_model(paths["onnx"], "cpu")


@pytest.mark.slow
def test_checkpoint_loaded_weights_only(tmp_path, exported, monkeypatch):
    """export reads the checkpoint with torch.load(weights_only=True) and nothing else."""
    checkpoint, _ = exported["unet"]
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    export.main(checkpoint=checkpoint, out=tmp_path / "w", formats=["pt2"])
    assert seen == [True]
