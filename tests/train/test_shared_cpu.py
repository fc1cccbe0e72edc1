"""`train` sets OpenMP to sleep rather than spin at barriers (a CPU other work shares), before
torch loads, and leaves a user's own setting alone."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import os, sys\n"
         "from train import cli\n"
         "try:\n"
         "    cli.main(['--help'])\n"
         "except SystemExit:\n"
         "    pass\n"
         "print(os.environ.get('OMP_WAIT_POLICY'))\n")


def probe(env_extra: dict, code: str = PROBE) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_the_train_command_makes_openmp_threads_sleep_at_barriers():
    assert probe({}) == "PASSIVE"


def test_a_users_own_openmp_setting_wins():
    assert probe({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_nothing_is_set_once_torch_is_loaded():
    """OpenMP has read its environment by then: setting it would only mislead."""
    code = "import torch\n" + PROBE
    assert probe({}, code) == "None"
