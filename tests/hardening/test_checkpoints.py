"""Untrusted checkpoints through `train predict`, `train evaluate` and `train run --resume`: only
`torch.load(weights_only=True)` ever reads one, so a file that is not a checkpoint of this tool
(truncated, random bytes, a pickle or a torch file carrying a payload) or one that does not fit
the data or the run (other channels, another variant) ends in one line, and a payload never runs.
"""

from __future__ import annotations

import ast
import io
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from .helpers import MARKER_ENV, Payload, assert_one_line, pickle_payload, run_cli_inprocess, snapshot

ROOT = Path(__file__).resolve().parents[2]


def _calls(tree):
    """(dotted name, call node) of every call in a module: `torch.load`, `pickle.loads`, `eval` ..."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            yield ".".join(reversed(parts)), node


@pytest.mark.slow
def test_no_unsafe_deserialisation_in_the_code():
    """The one torch.load passes weights_only=True; nothing unpickles, evals, or loads .npy with pickle."""
    unsafe, torch_loads = [], []
    for folder in ("etl", "shards_spec", "train", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            for name, node in _calls(ast.parse(path.read_text())):
                keywords = {k.arg: k.value for k in node.keywords}
                if name.endswith("torch.load") or name == "load" and "weights_only" in keywords:
                    flag = keywords.get("weights_only")
                    torch_loads.append((where, isinstance(flag, ast.Constant) and flag.value is True))
                elif name.split(".")[-1] in ("loads", "load") and name.split(".")[0] in ("pickle", "dill",
                                                                                         "cloudpickle", "marshal",
                                                                                         "joblib", "_pickle"):
                    unsafe.append((where, node.lineno, name))
                elif name in ("builtins.eval", "builtins.exec") or (isinstance(node.func, ast.Name)
                                                                       and name in ("eval", "exec")):
                    unsafe.append((where, node.lineno, name))
                elif name.split(".")[-1] == "load" and "allow_pickle" in keywords:
                    flag = keywords["allow_pickle"]
                    if not (isinstance(flag, ast.Constant) and flag.value is False):
                        unsafe.append((where, node.lineno, name))
                elif name.endswith("read_array") and "allow_pickle" in keywords:
                    flag = keywords["allow_pickle"]
                    if not (isinstance(flag, ast.Constant) and flag.value is False):
                        unsafe.append((where, node.lineno, name))
    assert torch_loads == [("train/runfiles/checkpoint/files.py", True)], torch_loads
    assert unsafe == [], unsafe


# Each bad file: (bytes to write, words the line must hold)

def truncated(good: bytes, marker: Path) -> bytes:
    return good[: len(good) // 2]


def random_bytes(good: bytes, marker: Path) -> bytes:
    import numpy as np

    return np.random.default_rng(0).bytes(4096)


def empty(good: bytes, marker: Path) -> bytes:
    return b""


def plain_pickle_with_payload(good: bytes, marker: Path) -> bytes:
    return pickle_payload(marker)


def torch_file_with_payload(good: bytes, marker: Path) -> bytes:
    """A real torch zip file whose pickle calls open(marker, 'w') when unpickled without weights_only."""
    buffer = io.BytesIO()
    torch.save({"format": "brats-train-checkpoint/1", "model_state": Payload(str(marker))}, buffer)
    return buffer.getvalue()


def foreign_zip(good: bytes, marker: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_payload(marker))
    return buffer.getvalue()


BAD_FILES = [truncated, random_bytes, empty, plain_pickle_with_payload, torch_file_with_payload, foreign_zip]
COMMANDS = ["predict", "evaluate", "run --resume"]


def _command(command: str, ckpt: Path, run_dir: Path, src: Path, shards: Path, tmp_path: Path) -> list:
    if command == "predict":
        patient = next(p for p in src.rglob("BraTS20_Training_001") if p.is_dir())
        return ["predict", "--checkpoint", ckpt, "--input", patient, "--out", tmp_path / "pred" / "seg.nii.gz",
                "--device", "cpu"]
    if command == "evaluate":
        return ["evaluate", "--checkpoint", ckpt, "--shards", shards, "--workers", "0", "--device", "cpu",
                "--json", tmp_path / "pred" / "eval.json"]
    return ["run", "--out", run_dir, "--resume", "--epochs", "2"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("bad", BAD_FILES, ids=lambda f: f.__name__)
def test_bad_checkpoint_file_is_one_line_and_never_runs_code(trained, pristine_src, built_shards, tmp_path, capsys,
                                                              monkeypatch, bad, command):
    marker = tmp_path / "pwned"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ckpt = run_dir / "checkpoints" / "last.pt"
    ckpt.write_bytes(bad(ckpt.read_bytes(), marker))
    (tmp_path / "pred").mkdir()
    before = snapshot(tmp_path / "pred"), snapshot(run_dir)
    code, _, err = run_cli_inprocess("train", _command(command, ckpt, run_dir, pristine_src, built_shards["webdataset"],
                                                       tmp_path), capsys)
    assert_one_line(code, err, "last.pt", "checkpoint")
    assert not marker.exists(), "a pickle payload ran"
    assert (snapshot(tmp_path / "pred"), snapshot(run_dir)) == before


@pytest.fixture(scope="module")
def two_channel_shards(tmp_path_factory):
    """Shards holding t1 and t1ce only (no flair, which the v1 checkpoint needs)."""
    from tests.shard_fixtures import make_shards

    return make_shards(tmp_path_factory.mktemp("two-channel"), "webdataset", patients={"p1": 3, "p2": 3},
                       splits={"train": ["p1"], "val": ["p2"]}, size=16, channels=2)


def test_evaluate_on_shards_lacking_the_checkpoints_channels(trained, two_channel_shards, capsys):
    code, _, err = run_cli_inprocess("train", ["evaluate", "--checkpoint", trained / "checkpoints" / "best.pt",
                                               "--shards", two_channel_shards, "--workers", "0", "--device", "cpu"],
                                     capsys)
    assert_one_line(code, err, "flair", str(two_channel_shards))


def test_predict_without_a_channel_of_the_checkpoint(trained, fresh_src, tmp_path, capsys):
    patient = next(p for p in fresh_src.rglob("BraTS20_Training_001") if p.is_dir())
    t1 = next(patient.glob("*_t1.nii*"))
    code, _, err = run_cli_inprocess("train", ["predict", "--checkpoint", trained / "checkpoints" / "best.pt",
                                               "--input", f"t1={t1}", "--out", tmp_path / "seg.nii.gz",
                                               "--device", "cpu"], capsys)
    assert_one_line(code, err, "t1ce")
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.mark.parametrize("change, words", [
    (["--variant", "v2"], "model cannot change"),
    (["--channels", "t1,t1ce,t2,flair"], "model cannot change"),
    (["--base", "8"], "model cannot change"),
])
def test_resume_with_another_variant_or_model_is_one_line(trained, tmp_path, capsys, change, words):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = snapshot(run_dir)
    code, _, err = run_cli_inprocess("train", ["run", "--out", run_dir, "--resume", "--epochs", "2", *change], capsys)
    assert_one_line(code, err, words)
    assert snapshot(run_dir) == before


def test_resume_on_shards_lacking_the_runs_channels(trained, two_channel_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = snapshot(run_dir)
    code, _, err = run_cli_inprocess("train", ["run", "--out", run_dir, "--resume", "--epochs", "2", "--shards",
                                               two_channel_shards], capsys)
    assert_one_line(code, err, "flair")
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_resume_of_a_run_checkpoint_from_another_run_kind(trained, built_shards, tmp_path, capsys):
    """A v2 run's last.pt put into a v1 run folder: the checkpoint decides, nothing is half-loaded."""
    from train import fit

    other = tmp_path / "v2"
    fit.run({"shards": str(built_shards["webdataset"]), "variant": "v2", "out": str(other), "epochs": 1,
             "batch_size": 4, "base": 4, "depth": 2, "workers": 0, "device": "cpu", "shuffle_buffer": 8,
             "report": False})
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    shutil.copy(other / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt")
    code, _, err = run_cli_inprocess("train", ["run", "--out", run_dir, "--resume", "--epochs", "2",
                                               "--variant", "v1"], capsys)
    assert_one_line(code, err, "model cannot change")
