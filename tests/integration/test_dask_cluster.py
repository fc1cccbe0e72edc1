"""`etl build-shards` on an existing Dask cluster: a `dask scheduler` and two `dask worker`
processes started here on 127.0.0.1, each in its own folder. The client runs in yet another
folder with a relative --out, so a task that relied on the client's cwd would write elsewhere.
The shards are byte-identical to an in-process build and the manifests' content is equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etl.build import BuildOptions, build_shards
from etl.synth import synthesize
from shards_spec.read import ShardStore

from .servers import BIN, SUBPROCESS_ENV, dask_cluster, run_process

OPTIONS = ("--size", "32", "--modalities", "t1ce,flair", "--split", "train=0.5,val=0.5")


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def content_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())["content"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "brats"
    synthesize(src, patients=4, layout="brats2020", shape=(48, 48, 24), seed=1)
    return src


@pytest.mark.slow
def test_build_on_an_existing_cluster_is_byte_identical_to_a_local_build(source, tmp_path):
    local = {}
    for fmt in ("webdataset", "zarr"):
        out = tmp_path / f"local-{fmt}"
        build_shards(BuildOptions(src=source, out=out, format=fmt, size=32, channels=("t1ce", "flair"),
                                  split="train=0.5,val=0.5", workers=0))
        local[fmt] = out
    client_cwd = tmp_path / "client"
    client_cwd.mkdir()
    with dask_cluster(tmp_path / "cluster", workers=2) as address:
        # --scheduler for WebDataset, DASK_SCHEDULER_ADDRESS for Zarr
        runs = {
            "webdataset": (["--scheduler", address], SUBPROCESS_ENV),
            "zarr": ([], {**SUBPROCESS_ENV, "DASK_SCHEDULER_ADDRESS": address}),
        }
        for fmt, (extra, env) in runs.items():
            done = run_process(BIN / "etl", "build-shards", "--src", source, "--out", f"shards-{fmt}", "--format", fmt,
                               *OPTIONS, *extra, cwd=client_cwd, env=env, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            assert f"Dask scheduler {address}" in done.stderr
    for fmt, reference in local.items():
        remote = client_cwd / f"shards-{fmt}"
        assert files_of(remote) == files_of(reference)
        assert content_of(remote) == content_of(reference)
        assert ShardStore(remote).manifest.digest == ShardStore(reference).manifest.digest
        provenance = json.loads((remote / "manifest.json").read_text())["provenance"]
        assert (provenance["scheduler"], provenance["workers"]) == ("external", 2)
    # nothing was written relative to the workers' own folders
    assert not list((tmp_path / "cluster").glob("worker*/shards-*"))


def test_build_refuses_an_fsspec_url_as_out_in_one_line(source, tmp_path):
    done = run_process(BIN / "etl", "build-shards", "--src", source, "--out", "s3://lab/shards", *OPTIONS, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --out s3://lab/shards: build-shards reads and writes folders on a file system, not fsspec URLs; use a "
        "folder every Dask worker can reach (a shared mount), then publish the out folder (docs/sharing.md)"]
