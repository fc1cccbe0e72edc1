"""Full disks and faults outside the training itself (issue 20, class 8; issue 22, friction 2).

- `train report` on a full disk (RLIMIT_FSIZE: "File too large", as a full disk refuses a write;
  as root a chmod cannot make a write fail): one line naming the file, the previous report whole;
- the report at the end of `train run` (`report.try_write`): a full disk or a failing plotting
  library is one warning line, never an exception, so a finished training stays a success;
- `train report` of a run trained from a URL whose server is gone: one warning line naming the
  URL and the reason, the curves still written;
- `etl synth` on a full disk: one line naming the file, no temporary left, every file whole, and
  the same command then finishes the dataset byte for byte.

Every limited subprocess runs with PYTHONDONTWRITEBYTECODE=1: Python's own .pyc writer would
otherwise leave truncated bytecode in the shared tree under the size limit.
"""

from __future__ import annotations

import json
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shards_spec.fileio import TEMPORARY

from .helpers import assert_one_line, run_cli_inprocess, run_subprocess, snapshot

NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}


def _limit(size: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return apply


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMPORARY.match(p.name)]


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run with a report already written (the control)."""
    from train.reporting import report

    target = tmp_path / "run"
    shutil.copytree(trained, target)
    report.main(target, device="cpu", console=_quiet())
    assert (target / "report" / "slices.png").is_file()
    return target


@pytest.mark.slow
def test_train_report_on_a_full_disk_is_one_line_and_keeps_the_previous_report(run):
    before = snapshot(run / "report")
    limited = run_subprocess("train", ["report", run], env=NO_PYC, preexec_fn=_limit(4096))
    line = assert_one_line(limited.returncode, limited.stderr, "File too large", str(run / "report"))
    assert "EFBIG" in line and ".partial" not in line
    assert snapshot(run / "report") == before  # every file the old one: all renamed or none
    assert _temporaries(run) == []


TRY_WRITE = """
import sys
from train.reporting import report
line = report.try_write(sys.argv[1], device="cpu")
print("returned:", line)
"""


@pytest.mark.slow
def test_end_of_training_report_on_a_full_disk_is_a_warning_not_a_failure(run):
    before = snapshot(run)
    done = subprocess.run([sys.executable, "-c", TRY_WRITE, str(run)], capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, **NO_PYC, "OMP_NUM_THREADS": "1"},
                          preexec_fn=_limit(4096))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    warnings = [x for x in done.stderr.splitlines() if x.startswith("warning: the report was not written")]
    assert len(warnings) == 1 and "File too large" in warnings[0] and str(run / "report") in warnings[0]
    assert done.stdout.strip() == f"returned: {warnings[0]}"
    assert snapshot(run) == before and _temporaries(run) == []


@pytest.mark.slow
def test_end_of_training_report_survives_a_plotting_failure(run, monkeypatch):
    from train.reporting import report

    assert report.try_write(run, device="cpu", console=_quiet()) is None  # control: written
    before = snapshot(run / "report")

    def broken(rows):
        raise RuntimeError("the plotting library failed")

    monkeypatch.setattr(report, "plot_lr", broken)
    line = report.try_write(run, device="cpu", console=_quiet())
    assert line.startswith("warning: the report was not written: RuntimeError: the plotting library failed")
    assert snapshot(run / "report") == before


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_report_of_a_run_whose_shard_server_is_gone_says_why(run, capsys, monkeypatch):
    monkeypatch.setenv("BRATS_SHARDS_RETRIES", "0")
    code, _, err = run_cli_inprocess("train", ["report", run], capsys)
    assert code == 0 and "warning" not in err, err  # control: local shards, slices drawn

    url = f"http://127.0.0.1:{_closed_port()}/shards/"
    config = json.loads((run / "config.json").read_text())
    config["config"]["shards"] = url
    (run / "config.json").write_text(json.dumps(config))
    (run / "report" / "slices.png").unlink()
    code, _, err = run_cli_inprocess("train", ["report", run], capsys)
    assert code == 0, err
    warnings = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1, err
    assert url in warnings[0] and "connection refused" in warnings[0] and "not found" not in warnings[0]
    assert not (run / "report" / "slices.png").exists()
    assert "connection refused" in (run / "report" / "report.md").read_text()


@pytest.mark.parametrize("layout", ["brats2020", "kaggle-h5"])  # nibabel bytes; h5py's own writer
def test_etl_synth_on_a_full_disk_is_one_line_and_the_same_command_finishes(tmp_path, capsys, layout):
    from etl.synth import synthesize

    out = tmp_path / "synth"
    args = ["synth", "--out", out, "--patients", "1", "--shape", "48,48,24", "--layout", layout]
    limited = run_subprocess("etl", args, env=NO_PYC, preexec_fn=_limit(50_000))
    line = assert_one_line(limited.returncode, limited.stderr, "File too large", str(out))
    assert ".partial" not in line and _temporaries(out) == []
    code, _, err = run_cli_inprocess("etl", args, capsys)  # the same command, space freed
    assert code == 0, err
    reference = tmp_path / "reference"
    synthesize(reference, patients=1, shape=(48, 48, 24), layout=layout, seed=0)
    made = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".etl-synth.json"}
    assert made == {p.relative_to(reference): p.read_bytes() for p in reference.rglob("*") if p.is_file()}
