"""Session-wide inputs of the hardening suite: one tiny synthetic BraTS 2020 source, the shards
the ETL builds from it (both formats), a hand-made shard folder with known values, and a small
trained checkpoint. Each test copies what it damages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHAPE = (48, 48, 24)
SIZE = 16
PATIENTS = 3
BUILD_ARGS = ["--workers", "0", "--size", SIZE, "--split", "train=0.5,val=0.5"]


@pytest.fixture(scope="session")
def pristine_src(tmp_path_factory) -> Path:
    from etl.synth import synthesize

    root = tmp_path_factory.mktemp("pristine-src")
    synthesize(root, patients=PATIENTS, layout="brats2020", shape=SHAPE, seed=0)
    return root


@pytest.fixture
def fresh_src(pristine_src, tmp_path) -> Path:
    """A private copy of the pristine source, for a test to damage."""
    target = tmp_path / "src"
    shutil.copytree(pristine_src, target)
    return target


@pytest.fixture(scope="session")
def built_shards(pristine_src, tmp_path_factory):
    """fmt -> a complete ETL shard folder built from the pristine source with BUILD_ARGS."""
    from etl.build import BuildOptions, build_shards

    made = {}
    for fmt in ("webdataset", "zarr"):
        out = tmp_path_factory.mktemp(f"built-{fmt}") / "shards"
        build_shards(BuildOptions(src=pristine_src, out=out, size=SIZE, split="train=0.5,val=0.5", workers=0,
                                  format=fmt))
        made[fmt] = out
    return made


@pytest.fixture(scope="session")
def fixture_shards(tmp_path_factory):
    """fmt -> a hand-made shard folder (tests/shard_fixtures.py): p1, p2 in train, p3 in val."""
    from tests.shard_fixtures import make_shards

    made = {}
    for fmt in ("webdataset", "zarr"):
        made[fmt] = make_shards(tmp_path_factory.mktemp(f"fixture-{fmt}"), fmt,
                                patients={"p1": 3, "p2": 4, "p3": 3},
                                splits={"train": ["p1", "p2"], "val": ["p3"]}, size=SIZE)
    return made


@pytest.fixture
def shards_copy(fixture_shards, tmp_path):
    """`shards_copy(fmt)`: a private copy of the hand-made shard folder."""

    def make(fmt: str) -> Path:
        target = tmp_path / f"shards-{fmt}"
        shutil.copytree(fixture_shards[fmt], target)
        return target

    return make


TRAIN_ARGS = ["--variant", "v1", "--epochs", "1", "--batch-size", "4", "--base", "4", "--depth", "2",
              "--workers", "0", "--device", "cpu", "--shuffle-buffer", "8", "--no-report"]


@pytest.fixture(scope="session")
def trained(built_shards, tmp_path_factory) -> Path:
    """A v1 run (1 epoch) on the ETL shards; returns the run folder."""
    from train import fit

    out = tmp_path_factory.mktemp("run") / "v1"
    fit.run({"shards": str(built_shards["webdataset"]), "variant": "v1", "out": str(out), "epochs": 1,
             "batch_size": 4, "base": 4, "depth": 2, "workers": 0, "device": "cpu", "shuffle_buffer": 8,
             "report": False})
    return out
