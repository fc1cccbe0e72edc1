"""examples/notebook_api.py runs end to end (tiny shapes, one epoch on the CPU) and prints only its
own lines: the Python API calls in it write nothing to stdout or stderr themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "notebook_api.py"


def test_the_notebook_example_runs(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith("built {'train': ") and lines[1].startswith("finished 1 epoch(s); best mean Dice")
    assert lines[3].startswith("mean Dice over WT/TC/ET: ")
    assert lines[4].startswith("BraTS20_Training_001 (48, 48, 24) uint8 {")
    assert lines[5] == "array input gives the same labels: True"
    assert lines[6].startswith("AttentionUNet ")
    run = next(tmp_path.glob("brats-api-*/runs/v2"))  # everything went to the temporary folder
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "metrics.csv").is_file()
