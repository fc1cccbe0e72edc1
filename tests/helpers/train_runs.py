"""Tiny `train run`s in the test process: learnable shards (16x16), the run options of the seed's
classes target, a quiet console, and comparing two finished runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests import shard_fixtures
from tests.shard_fixtures import learnable_slices
from train import fit

SIZE = 16


def build(root: Path, name: str, patients: dict[str, int], splits: dict[str, list[str]]) -> Path:
    """Shards at `root/name` whose tumour a tiny U-Net can learn (tumour on every slice)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shard_fixtures, "patient_slices", learnable_slices)
        return shard_fixtures.make_shards(root / name, patients=patients, splits=splits, size=SIZE, tumour_every=1)


def options(shards, out, **kw) -> dict:
    """`fit.run` overrides of a 2-epoch base-4 v1 run; keyword arguments replace any of them."""
    # the seed's classes target and one pass per slice: these tests count steps and read NEC/NET, ED, ET
    base = dict(shards=str(shards), variant="v1", out=str(out), epochs=2, batch_size=4, workers=0, base=4,
                depth=2, lr=0.01, seed=3, report=False, target="classes", oversample_tumour=1, stem=1)
    base.update(kw)
    return base


def quiet() -> fit.Hooks:
    from rich.console import Console

    return fit.Hooks(console=Console(quiet=True))


def metrics_without_seconds(run_dir: Path) -> list[dict]:
    """metrics.csv's rows without the one column that differs between identical runs."""
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The same metrics rows and the same last weights, bit for bit."""
    assert metrics_without_seconds(run_dir) == metrics_without_seconds(reference)
    got = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model_state"]
    want = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model_state"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
