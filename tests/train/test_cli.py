"""The `train` command line: help with examples and no heavy imports, one-line errors, exit
codes, and the evaluate/predict/report commands handing their options to their modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from train import cli

ROOT = Path(__file__).resolve().parents[2]


def invoke(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_run_help_shows_examples_and_every_option(capsys):
    code, out, _ = invoke(["run", "--help"], capsys)
    assert code == 0
    assert "train run --shards shards/ --variant v1 --out runs/v1" in out
    assert "torchrun --standalone --nproc-per-node 2 --no-python \\\n        train run --shards" in out
    for option in ("--shards", "--variant", "--out", "--epochs", "--batch-size", "--lr", "--workers", "--seed",
                   "--device", "--val-split", "--target", "--oversample-tumour", "--base", "--depth",
                   "--shuffle-buffer", "--time-budget", "--resume", "--force", "--cache-dir", "--amp", "--no-amp"):
        assert option in out, option


def test_help_imports_no_torch():
    code = "import sys, train.cli; train.cli.main(['run', '--help'])"
    probe = f"import runpy, sys\ntry:\n    exec({code!r})\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "TORCH False" in done.stdout, done.stdout + done.stderr


def test_truncated_checkpoint_is_one_line_through_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated zip")
    code, _, err = invoke(["run", "--out", str(run_dir), "--resume"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "last.pt" in lines[0], err
    assert "Traceback" not in err


def test_config_error_names_the_option(tmp_path, capsys):
    code, _, err = invoke(["run", "--shards", str(tmp_path), "--variant", "v9", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.strip() == "error: --variant: must be one of ['v1', 'v2'], got 'v9'"
    code, _, err = invoke(["run", "--variant", "v1", "--shards", str(tmp_path), "--out", str(tmp_path / "r"),
                           "--time-budget", "soon"], capsys)
    assert code == 2 and err.startswith("error: --time-budget:") and len(err.strip().splitlines()) == 1


def test_missing_shards_is_one_line(tmp_path, capsys):
    code, _, err = invoke(["run", "--shards", str(tmp_path / "none"), "--variant", "v1", "--out", str(tmp_path / "r")],
                          capsys)
    assert code == 2 and f"{tmp_path / 'none'}: does not exist" in err and len(err.strip().splitlines()) == 1


def test_run_passes_options_and_exit_code(monkeypatch, capsys):
    from train import fit

    calls = []

    def fake_run(overrides, *, resume, force, storage_options=None, **_):
        calls.append((overrides, resume, force, storage_options))
        return fit.Result(Path("runs/x"), 1, 143, "stopped by SIGTERM")

    monkeypatch.setattr(fit, "run", fake_run)
    code, _, _ = invoke(["run", "--shards", "s", "--variant", "v2", "--epochs", "3", "--no-amp", "--channels",
                         "t1,flair", "--time-budget", "90m", "--resume", "--force",
                         "--storage-option", "endpoint_url=http://127.0.0.1:9000", "--storage-option", "anon=true"], capsys)
    assert code == 143
    overrides, resume, force, storage_options = calls[0]
    assert storage_options == {"endpoint_url": "http://127.0.0.1:9000", "anon": True} and "storage_option" not in overrides
    assert (resume, force) == (True, True)
    assert overrides["epochs"] == 3 and overrides["amp"] is False and overrides["channels"] == "t1,flair"
    assert overrides["time_budget"] == "90m" and "lr" not in overrides and "report" not in overrides  # not given


@pytest.mark.parametrize("argv,name,expected", [
    (["evaluate", "--checkpoint", "c.pt", "--shards", "s", "--json", "e.json", "--csv", "p.csv"], "evaluate",
     {"checkpoint": [Path("c.pt")], "shards": "s", "split": "val", "src": None, "json_path": Path("e.json"),
      "csv_path": Path("p.csv")}),
    (["predict", "--checkpoint", "c.pt", "--input", "t1ce=a.nii.gz", "--input", "flair=b.nii.gz", "--out", "seg.nii.gz"],
     "predict", {"checkpoint": [Path("c.pt")], "inputs": ["t1ce=a.nii.gz", "flair=b.nii.gz"], "out": Path("seg.nii.gz"),
                 "device": "auto", "probabilities": False}),
])
def test_commands_call_their_modules(monkeypatch, capsys, argv, name, expected):
    from train.apply import evaluate, predict

    seen = {}
    monkeypatch.setattr({"evaluate": evaluate, "predict": predict}[name], "main", lambda **kw: seen.update(kw))
    code, _, _ = invoke(argv, capsys)
    assert code == 0
    for key, value in expected.items():
        assert seen[key] == value, key


def test_report_command_calls_report_main(monkeypatch, capsys, tmp_path):
    from train.reporting import report

    seen = []
    monkeypatch.setattr(report, "main", lambda run_dir, storage_options=None: seen.append(run_dir))
    code, _, _ = invoke(["report", str(tmp_path)], capsys)
    assert code == 0 and seen == [tmp_path]
