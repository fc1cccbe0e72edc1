"""`torchrun --nproc-per-node 2 --no-python train run` on CPU (gloo) with uneven shards: patients of
2 to 14 slices, so ranks get different numbers of slices every epoch and only the equalised
batch count keeps them in step. The all-reduced validation metrics equal a single-process
`train evaluate` of the saved checkpoint; a SIGTERM on one rank stops both at the same step, and
`--resume` under torchrun continues to the same weights as the run that was never stopped."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shards_spec.read import ShardStore
from tests.helpers.train_runs import assert_same_run, metrics_without_seconds
from train.data import ShardDataset

from .servers import BIN, SUBPROCESS_ENV, learnable_shards, run_process

PATIENTS = {"p1": 2, "p2": 14, "p3": 3, "p4": 10, "p5": 5, "p6": 7, "p7": 2}
SPLITS = {"train": ["p1", "p2", "p3", "p4", "p5"], "val": ["p6", "p7"]}
TRAIN = ("--variant", "v1", "--batch-size", "2", "--base", "4", "--depth", "2", "--lr", "0.01", "--seed", "5",
         "--workers", "1", "--no-report",
         # the seed's schedule and output bias: these tests compare data paths and processes, and
         # resume with more --epochs (a cosine schedule spans --epochs), on tiny runs that must predict tumour
         "--schedule", "plateau", "--head-bias", "zero", "--target", "classes", "--oversample-tumour", "1")
NAMES = ("NEC/NET", "ED", "ET")


def torchrun(*args, env=None):
    return run_process(BIN / "torchrun", "--standalone", "--nproc-per-node", "2", "--no-python", BIN / "train", "run",
                       *args, env=env or SUBPROCESS_ENV, timeout=300)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return learnable_shards(tmp_path_factory.mktemp("uneven"), "webdataset", PATIENTS, SPLITS)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """Two epochs under torchrun, never interrupted."""
    out = tmp_path_factory.mktemp("ddp") / "reference"
    done = torchrun("--shards", shards, "--out", out, "--epochs", "2", *TRAIN)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ranks 2" in done.stderr
    return out


def test_the_shards_are_uneven_between_ranks(shards):
    """Precondition: in each epoch the ranks hold different numbers of slices, yet the same quota."""
    store = ShardStore(shards)
    for epoch in range(2):
        ranks = [ShardDataset(store, "train", rank=r, world_size=2, batch_size=2) for r in range(2)]
        for ds in ranks:
            ds.set_epoch(epoch)
        held = [sum(ds.shard_samples[i] for i in ds.rank_shards()[ds.rank]) for ds in ranks]
        assert held[0] != held[1]
        assert ranks[0].batches_per_epoch(2, 1) == ranks[1].batches_per_epoch(2, 1) > 0


@pytest.mark.slow
def test_uneven_ddp_run_completes_and_its_metrics_equal_a_single_process_evaluate(shards, reference, tmp_path):
    run_files = sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file())
    assert run_files == ["checkpoints/best.pt", "checkpoints/last.pt", "config.json", "metrics.csv"]  # rank 0 only
    last = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and len(metrics_without_seconds(reference)) == 2

    out = tmp_path / "eval.json"
    done = run_process(BIN / "train", "evaluate", "--checkpoint", reference / "checkpoints" / "last.pt",
                       "--shards", shards, "--workers", "0", "--json", out)
    assert done.returncode == 0, done.stderr[-2000:]
    single = json.loads(out.read_text())["slice_level"]
    assert single["slices"] == sum(PATIENTS[p] for p in SPLITS["val"])
    row = last["history"][-1]
    for prefix, metric in (("dice", "dice"), ("prec", "precision"), ("recall", "recall")):
        for name in NAMES:
            logged, evaluated = row[f"{prefix}_{name}"], single[metric][name]
            assert (math.isnan(logged) and evaluated is None) or logged == evaluated, (prefix, name)
    assert sum(c["tp"] for c in single["counts"].values()) > 0  # the model predicts tumour: not a trivial match
    # close, not equal: float sums in another order, and the batch Dice loss depends on how slices are batched
    assert row["val_loss"] == pytest.approx(single["loss"], rel=1e-3)


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_and_resume_under_torchrun_matches(shards, reference, tmp_path):
    out = tmp_path / "stopped"
    # rank 1 signals itself after step 1 of epoch 2 (0-based "1:1:1"); rank 0 must stop with it
    env = {**SUBPROCESS_ENV, "TRAIN_FAULT_SIGTERM_AT": "1:1:1"}
    done = torchrun("--shards", shards, "--out", out, "--epochs", "2", *TRAIN, env=env)
    assert done.returncode != 0
    # rank 0, which got no signal, stopped at the same step (a rank left waiting in an all-reduce
    # would fail with a gloo traceback instead); torchrun may then SIGTERM it while it exits
    assert "stopped by SIGTERM during epoch 2: the partial epoch is lost" in done.stderr
    assert "exitcode  : 143" in done.stderr and "train/fit.py" not in done.stderr  # torchrun's own traceback only
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert len(metrics_without_seconds(out)) == 1

    done = torchrun("--out", out, "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_run(out, reference)


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_the_single_node_run(shards, reference, tmp_path):
    """torchrun's multi-node flags (--nnodes 2 --node-rank 0/1 --master-addr), one rank per
    "node", both on 127.0.0.1: the same 2 ranks, so the same weights as the single-node run."""
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "two-nodes"
    agents = []
    try:
        for node in (0, 1):
            command = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                       "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-python", str(BIN / "train"),
                       "run", "--shards", str(shards), "--out", str(out), "--epochs", "2", *TRAIN]
            agents.append(subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True))
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=30)
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "ranks 2" in outputs[0]
    assert_same_run(out, reference)
