"""`train.api`: the commands' results as Python values, their errors as exceptions (never
SystemExit), nothing printed unless asked, and the same results as the command line: a run, the
evaluation JSON, the Predictor's label maps (checkpoint loaded once) against `train predict`'s files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from etl import api as etl_api
from shards_spec.errors import ToolError
from train import api, cli
from train.runfiles import checkpoint as ckpt

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
# Three epochs at lr 0.01: enough for the label maps to hold 1, 2 and 4, so comparing them means something.
TINY = dict(epochs=3, lr=0.01, device="cpu", base=4, depth=2, batch_size=8, workers=0, report=False)


def invoke(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four synthetic patients (48x48x24), shards at 32x32, and a three-epoch v2 run (base 4)."""
    root = tmp_path_factory.mktemp("api")
    etl_api.synth(root / "src", patients=4, shape=(48, 48, 24))
    built = etl_api.build_shards(root / "src", root / "shards", size=32, split="train=0.5,val=0.5", workers=0)
    result = api.train(root / "shards", root / "run", variant="v2", **TINY)
    patients = sorted((root / "src" / "MICCAI_BraTS2020_TrainingData").glob("BraTS20_Training_*"))
    return {"root": root, "src": root / "src", "shards": root / "shards", "result": result, "patients": patients,
            "val": built.content["splits"]["val"]["patients"]}


def test_train_returns_the_run_and_its_summary(data):
    result = data["result"]
    assert result.ok and result.exit_code == 0 and result.epochs == 3
    assert result.run_dir == data["root"] / "run" and result.best_checkpoint.is_file()
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    saved = ckpt.load(result.best_checkpoint)
    assert result.best_score == max(row["mean_dice"] for row in result.history) == saved["best_mean_dice"]
    assert result.best_epoch == saved["epoch"] and result.best_score > 0
    assert result.reason.startswith("finished 3 epoch(s)")


def test_nothing_is_printed_unless_asked(data, tmp_path, capfd):
    capfd.readouterr()
    api.evaluate(data["result"].run_dir, data["shards"], device="cpu", workers=0)
    quiet = capfd.readouterr()
    assert quiet.out == "" and quiet.err == ""
    resumed = api.resume(data["result"].run_dir, console=True)  # control: asked for, the run speaks
    assert "already trained 3 epoch(s) of 3" in capfd.readouterr().err and resumed.ok and resumed.epochs == 3
    api.evaluate(data["result"].run_dir, data["shards"], device="cpu", workers=0, console=True)
    assert "mean Dice" in capfd.readouterr().out


def test_the_cli_trains_the_same_run(data, tmp_path, capsys):
    flags = [[f"--{k.replace('_', '-')}", v] if not isinstance(v, bool) else [f"--{k}" if v else f"--no-{k}"]
             for k, v in TINY.items()]
    code, _, err = invoke(["run", "--shards", data["shards"], "--variant", "v2", "--out", tmp_path / "cli",
                           *[word for flag in flags for word in flag]], capsys)
    assert code in (0, None), err
    cli_rows = ckpt.load(tmp_path / "cli" / "checkpoints" / "last.pt")["history"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in data["result"].history]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in cli_rows] == strip


def test_errors_are_the_commands_lines_as_exceptions(data, tmp_path, capsys):
    missing = tmp_path / "none"
    with pytest.raises(ToolError) as raised:
        api.train(missing, tmp_path / "r", **TINY)
    code, _, err = invoke(["run", "--shards", missing, "--variant", "v2", "--out", tmp_path / "r2"], capsys)
    assert code == 2 and err.strip() == f"error: {raised.value}".replace(str(tmp_path / "r"), str(tmp_path / "r2"))

    with pytest.raises(ToolError) as raised:
        api.evaluate(tmp_path / "no.pt", data["shards"], device="cpu")
    code, _, err = invoke(["evaluate", "--checkpoint", tmp_path / "no.pt", "--shards", data["shards"]], capsys)
    assert code == 2 and err.strip() == f"error: {raised.value}"

    with pytest.raises(ToolError, match=r"^--batch-size: must be in 1\.\.9223372036854775807, got 0$"):  # train run's check
        api.Predictor(data["result"].run_dir, batch_size=0)
    with pytest.raises(ToolError, match="is a folder without checkpoints/best.pt"):
        api.load_model(tmp_path)
    with pytest.raises(ToolError, match=r"--epochs: "):
        api.train(data["shards"], tmp_path / "r3", epochs=-1)
    assert not (tmp_path / "r3").exists()


def test_predictor_loads_once_and_matches_train_predict(data, tmp_path, monkeypatch, capsys):
    loads = []
    real_load = ckpt.load
    monkeypatch.setattr(ckpt, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    predictor = api.Predictor(data["result"].run_dir, device="cpu")
    segs = predictor.predict(data["patients"][:3])
    assert len(loads) == 1 and len(segs) == 3

    code, _, err = invoke(["predict", "--checkpoint", data["result"].best_checkpoint, "--input",
                           data["src"] / "MICCAI_BraTS2020_TrainingData", "--out", tmp_path / "segs",
                           "--device", "cpu"], capsys)
    assert code in (0, None), err
    for folder, seg in zip(data["patients"], segs):
        written = nib.load(tmp_path / "segs" / f"{folder.name}.nii.gz")
        assert seg.dtype == np.uint8 and seg.shape == written.shape == (48, 48, 24)
        assert np.array_equal(seg, np.asarray(written.dataobj))
    labels = set(np.unique(np.concatenate([seg.ravel() for seg in segs])).tolist())
    assert labels <= {0, 1, 2, 4} and len(labels) > 2  # BraTS 2020 labels, and maps that are not trivial


def test_predictor_takes_arrays_and_modality_files(data):
    predictor = api.Predictor(data["result"].best_checkpoint, device="cpu")
    folder = data["patients"][0]
    files = {m: folder / f"{folder.name}_{m}.nii" for m in ("t1", "t1ce", "t2", "flair")}
    volume = np.stack([np.asarray(nib.load(f).dataobj, dtype=np.float32) for f in files.values()])
    expected = predictor.predict(folder)
    assert np.array_equal(predictor.predict(volume), expected)
    assert np.array_equal(predictor.predict(files), expected)
    shard_labels = predictor.predict(volume, labels="brats2023")  # ET written as 3 instead of 4
    assert np.array_equal(shard_labels, np.where(expected == 4, 3, expected))
    with pytest.raises(ToolError, match=r"must be \(C, H, W, D\) with C = 4 channels"):
        predictor.predict(volume[:3])
    broken = volume.copy()
    broken[0, 0, 0, 0] = np.nan
    with pytest.raises(ToolError, match="1 non-finite value"):
        predictor.predict(broken)
    with pytest.raises(ToolError, match="holds no NIfTI image: give one patient's folder"):
        predictor.predict(folder.parent)  # a folder of patients


def _as_json(value):
    """What `--json` makes of a Python value: NaN -> null, tuples -> lists, numpy scalars -> numbers."""
    if isinstance(value, dict):
        return {str(k): _as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) or math.isinf(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def test_evaluate_returns_what_the_cli_writes(data, tmp_path, capsys):
    best = data["result"].best_checkpoint
    scores = api.evaluate(best, data["shards"], src=data["src"], device="cpu", workers=0)
    assert scores["native_grid"]["patients"] == len(data["val"]) and scores["checkpoint"]["path"] == str(best)
    code, _, err = invoke(["evaluate", "--checkpoint", data["result"].run_dir, "--shards", data["shards"],
                           "--src", data["src"], "--device", "cpu", "--workers", 0, "--json", tmp_path / "e.json"], capsys)
    assert code in (0, None), err
    assert json.loads((tmp_path / "e.json").read_text()) == _as_json(scores)


def test_load_model_is_the_best_checkpoint_in_eval_mode_on_cpu(data):
    model = api.load_model(data["result"].run_dir)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    saved = ckpt.load(data["result"].best_checkpoint)["model_state"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_import_train_is_light_and_reaches_the_api():
    probe = ("import sys, train; light = not {'torch', 'numpy', 'train.api'} & set(sys.modules); "
             "print(light, train.api.Predictor.__name__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split() == ["True", "Predictor"], done.stderr
