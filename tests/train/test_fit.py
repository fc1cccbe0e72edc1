"""`train run` end to end on tiny shards (16x16, a few patients, base 4): learning, outputs,
exact resume, refusals, time budget with a fake clock, signal stop through a hook, bf16 autocast.
The shards are the `shards` fixture of tests/train/conftest.py."""

from __future__ import annotations

import csv
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from shards_spec.manifest import Manifest
from shards_spec.read import ShardStore
from tests.helpers.train_runs import SIZE, build, options, quiet
from train import fit
from train.config.options import ConfigError
from train.runfiles import checkpoint as ckpt

torch.set_num_threads(1)

HEADER = ("epoch,train_loss,val_loss,mean_dice,dice_NEC/NET,dice_ED,dice_ET,prec_NEC/NET,prec_ED,prec_ET,"
          "recall_NEC/NET,recall_ED,recall_ET,lr,seconds")


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    return build(root, "b", {"p1": 5, "p2": 6, "p3": 6, "p4": 4}, {"train": ["p1", "p2", "p3"], "val": ["p4"]})


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.reader(fh))


def test_tiny_run_learns_and_writes_outputs(shards, tmp_path):
    out = tmp_path / "run"
    result = fit.run(options(shards, out, epochs=3, batch_size=2), hooks=quiet())
    assert result.exit_code == 0 and result.epochs_done == 3
    losses = [r["train_loss"] for r in result.history]
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.95 * losses[0], losses
    assert result.history[2]["mean_dice"] > result.history[0]["mean_dice"] + 0.1

    table = rows(out)
    assert ",".join(table[0]) == HEADER
    assert [r[0] for r in table[1:]] == ["1", "2", "3"]
    assert float(table[3][1]) == pytest.approx(losses[-1])

    record = json.loads((out / "config.json").read_text())
    digest = ShardStore(shards).manifest.digest
    assert record["manifest_digest"] == digest
    assert record["preset"] == "v1"
    assert record["config"]["model"] == "unet" and record["config"]["channels"] == ["t1ce", "flair"]
    assert record["config"]["epochs"] == 3 and record["overrides"]["epochs"] == 3

    for name in (ckpt.LAST, ckpt.BEST):
        payload = torch.load(out / "checkpoints" / name, weights_only=True)  # never unpickled
        assert payload["format"] == ckpt.FORMAT
        assert payload["manifest_digest"] == digest
        assert payload["model"] == {"name": "unet", "kwargs": {"base": 4, "depth": 2, "batch_norm": True},
                                    "in_channels": 2, "out_channels": 3}
        assert payload["channels"] == ["t1ce", "flair"] and payload["target"] == "classes"
        assert payload["preprocessing"]["size"] == SIZE
        assert set(payload["rng"]) == {"torch", "cuda", "numpy", "python", "augmenter"}
        for key in ("optimizer", "scheduler", "scaler", "config", "history", "best_mean_dice"):
            assert key in payload
    last = torch.load(out / "checkpoints" / ckpt.LAST, weights_only=True)
    best = torch.load(out / "checkpoints" / ckpt.BEST, weights_only=True)
    assert last["epoch"] == 3 and last["state"] == "finished"
    dice = [float(r[3]) for r in table[1:]]
    assert best["epoch"] == 1 + int(np.nanargmax(dice)) == best["best_epoch"]

    # the weights predict needs rebuild the model from the checkpoint alone
    from train.models import build_model

    model = build_model(last["model"]["name"], last["model"]["in_channels"], **last["model"]["kwargs"])
    model.load_state_dict(last["model_state"])


def assert_same_weights(a_dir, b_dir):
    a = torch.load(a_dir / "checkpoints" / ckpt.LAST, weights_only=True)
    b = torch.load(b_dir / "checkpoints" / ckpt.LAST, weights_only=True)
    assert a["model_state"].keys() == b["model_state"].keys()
    for key in a["model_state"]:
        assert torch.equal(a["model_state"][key], b["model_state"][key]), key


def test_resume_after_a_signal_equals_the_uninterrupted_run(shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # v2: attention U-Net, four channels, Dice+BCE and augmentation, so the augmenter is covered;
    # the cosine schedule spans both epochs in both runs
    fit.run(options(shards, straight, variant="v2", epochs=2), hooks=quiet())

    def stop_in_epoch_2(epoch, step, stop):
        if (epoch, step) == (1, 1):
            stop.request()

    first = fit.run(options(shards, split, variant="v2", epochs=2), hooks=fit.Hooks(after_step=stop_in_epoch_2,
                                                                                   console=quiet().console))
    assert first.exit_code == 143 and first.epochs_done == 1
    resumed = fit.run({"out": str(split)}, resume=True, hooks=quiet())
    assert resumed.exit_code == 0 and resumed.epochs_done == 2
    assert_same_weights(straight, split)
    rows_a, rows_b = rows(straight), rows(split)
    assert len(rows_a) == len(rows_b) == 3
    for ra, rb in zip(rows_a, rows_b):
        assert ra[:-1] == rb[:-1]  # every column but `seconds`


@pytest.mark.slow
def test_budget_stop_in_the_middle_of_an_epoch_resumes_exactly(shards, tmp_path):
    """A budget that ends inside epoch 2 leaves a mid-epoch checkpoint; resuming it finishes with
    the weights of a run never stopped (plateau schedule: a budget would re-plan a cosine one)."""
    now = [0.0]

    def tick(epoch, step, stop):
        now[0] += 10.0

    straight, split = tmp_path / "straight", tmp_path / "split"
    fit.run(options(shards, straight, variant="v2", epochs=2, schedule="plateau"), hooks=quiet())
    hooks = fit.Hooks(clock=lambda: now[0], after_step=tick, console=quiet().console)
    stopped = fit.run(options(shards, split, variant="v2", epochs=2, schedule="plateau", time_budget="80s"),
                      hooks=hooks)
    assert stopped.exit_code == 0 and "into epoch 2" in stopped.message
    last = torch.load(split / "checkpoints" / ckpt.LAST, weights_only=True)
    assert last["epoch"] == 1 and 0 < last["epoch_step"] < 5 and last["state"] == "running"
    assert [float(r[0]) for r in rows(split)[1:]] == [1.0, 1 + last["epoch_step"] / 5]  # a fractional row
    resumed = fit.run({"out": str(split), "time_budget": "10h"}, resume=True, hooks=hooks)
    assert resumed.exit_code == 0 and resumed.epochs_done == 2
    assert_same_weights(straight, split)
    final_a, final_b = rows(straight)[-1], rows(split)[-1]
    assert final_a[:-1] == final_b[:-1]  # epoch 2: same training loss (restored sums), same validation


def test_resume_refuses_other_shards_or_options_unless_forced(shards, other_shards, tmp_path):
    out = tmp_path / "run"
    fit.run(options(shards, out, epochs=1, schedule="plateau"), hooks=quiet())

    with pytest.raises(ConfigError, match="--shards") as info:
        fit.run({"out": str(out), "shards": str(other_shards), "epochs": 2}, resume=True, hooks=quiet())
    assert "--force" in str(info.value)
    with pytest.raises(ConfigError, match="--lr"):
        fit.run({"out": str(out), "lr": 0.5, "epochs": 2}, resume=True, hooks=quiet())
    with pytest.raises(ConfigError, match="--base"):  # the weights would not fit, even with --force
        fit.run({"out": str(out), "base": 8, "epochs": 2}, resume=True, force=True, hooks=quiet())

    forced = fit.run({"out": str(out), "shards": str(other_shards), "lr": 0.005, "epochs": 2}, resume=True,
                     force=True, hooks=quiet())
    assert forced.epochs_done == 2
    last = torch.load(out / "checkpoints" / ckpt.LAST, weights_only=True)
    assert last["manifest_digest"] == ShardStore(other_shards).manifest.digest
    assert last["history"][1]["lr"] == 0.005

    # a new run never overwrites an existing one silently
    with pytest.raises(ConfigError, match="--out"):
        fit.run(options(shards, out, epochs=1), hooks=quiet())


def test_time_budget_holds_within_one_step_and_the_final_validation(shards, tmp_path):
    now = [1000.0]

    def tick(epoch, step, stop):
        now[0] += 10.0  # every training step "takes" 10 s of the fake clock; validation takes none

    hooks = fit.Hooks(clock=lambda: now[0], after_step=tick, console=quiet().console)
    out = tmp_path / "run"
    # 18 training slices / batch 4 -> 5 steps (50 s) an epoch: a 130 s budget ends inside epoch 3
    result = fit.run(options(shards, out, epochs=5, time_budget="130s"), hooks=hooks)
    used = now[0] - 1000.0
    assert result.exit_code == 0 and "time budget" in result.message and "--resume" in result.message
    assert used <= 130.0  # the budget held
    assert used >= 130.0 - 10.0 - 25.0  # and was not left unused by more than a step and a validation's reserve
    last = torch.load(out / "checkpoints" / ckpt.LAST, weights_only=True)
    steps_in = last["epoch_step"]
    assert last["epoch"] == 2 and steps_in == used / 10.0 - 10 and last["state"] == "running"
    assert [float(r[0]) for r in rows(out)[1:]] == [1.0, 2.0, 2 + steps_in / 5]
    assert last["steps"] == 10 + steps_in

    resumed = fit.run({"out": str(out), "time_budget": "10h"}, resume=True, hooks=hooks)
    assert resumed.epochs_done == 5
    assert torch.load(out / "checkpoints" / ckpt.LAST, weights_only=True)["state"] == "finished"
    assert [float(r[0]) for r in rows(out)[1:]][-3:] == [3.0, 4.0, 5.0]


def test_learning_rate_warms_up_then_decays_by_cosine_per_step(shards, tmp_path):
    out = tmp_path / "run"
    fit.run(options(shards, out, epochs=3, warmup=2, lr=0.01), hooks=quiet())
    lrs = [float(r[13]) for r in rows(out)[1:]]  # the rate of each epoch's last step
    steps = 3 * 5
    expected = []
    for epoch in range(3):
        s = 5 * epoch + 4  # 0-based step index of the epoch's last step; warm-up = min(2, 15 // 10) = 1 step
        t = (s - 1) / (steps - 1)
        expected.append(0.01 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))))
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert torch.load(out / "checkpoints" / ckpt.LAST, weights_only=True)["steps"] == steps


def test_sigterm_stops_at_once_and_keeps_the_last_epoch(shards, tmp_path):
    def deliver(epoch, step, stop):
        if epoch == 1 and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler path, at a known step

    out = tmp_path / "run"
    previous = signal.getsignal(signal.SIGTERM)
    hooks = fit.Hooks(after_step=deliver, console=quiet().console)
    result = fit.run(options(shards, out, epochs=4), hooks=hooks)
    assert result.exit_code == 143
    assert "partial epoch is lost" in result.message and "epoch 2" in result.message
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    last = torch.load(out / "checkpoints" / ckpt.LAST, weights_only=True)
    assert last["epoch"] == 1
    assert len(rows(out)) == 2

    resumed = fit.run({"out": str(out), "epochs": 2}, resume=True, hooks=quiet())
    assert resumed.exit_code == 0 and resumed.epochs_done == 2


def test_bf16_autocast_on_cpu_and_regions_on_folds(tmp_path):
    shards = build(tmp_path, "folds", {"p1": 4, "p2": 4, "p3": 4},
                   {"fold0": ["p1"], "fold1": ["p2"], "fold2": ["p3"]})
    seen = []
    from rich.console import Console

    console = Console(record=True, width=200)
    out = tmp_path / "run"
    original = torch.autocast

    def spy(*args, **kw):
        seen.append((args, kw.get("dtype"), kw.get("enabled")))
        return original(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "autocast", spy)
        result = fit.run(options(shards, out, epochs=1, amp_dtype="bfloat16", val_split="fold0", target="regions"),
                         hooks=fit.Hooks(console=console))
    assert result.exit_code == 0
    assert seen and all(dtype == torch.bfloat16 and enabled for _, dtype, enabled in seen)
    assert np.isfinite(result.history[0]["train_loss"])
    text = console.export_text()
    assert "autocast bfloat16" in text and "train on fold1+fold2" in text
    assert json.loads((out / "config.json").read_text())["autocast"] == "bfloat16"
    header, first = rows(out)[0], dict(zip(rows(out)[0], rows(out)[1]))
    assert header[4:7] == ["dice_NEC/NET", "dice_ED", "dice_ET"]  # the seed's columns in every run
    assert header[13:19] == ["dice_WT", "dice_TC", "prec_WT", "prec_TC", "recall_WT", "recall_TC"]
    # mean_dice is the target's: WT, TC, ET (NaN channels left out)
    regions = [float(first[k]) for k in ("dice_WT", "dice_TC", "dice_ET") if first[k] != "nan"]
    if regions:
        assert float(first["mean_dice"]) == pytest.approx(sum(regions) / len(regions))
    assert torch.load(out / "checkpoints" / ckpt.LAST, weights_only=True)["target"] == "regions"


def test_resume_with_nothing_left_and_manifest_checks(shards, tmp_path):
    out = tmp_path / "run"
    fit.run(options(shards, out, epochs=1), hooks=quiet())
    again = fit.run({"out": str(out)}, resume=True, hooks=quiet())
    assert again.exit_code == 0 and "already trained 1" in again.message
    with pytest.raises(ConfigError, match="--epochs"):
        fit.run({"out": str(out), "epochs": 0}, resume=True, hooks=quiet())
    with pytest.raises(ConfigError, match="--val-split"):
        fit.run(options(shards, tmp_path / "x", val_split="fold3"), hooks=quiet())
    with pytest.raises(ConfigError, match="--resume"):
        fit.run({"out": str(tmp_path / "nothing")}, resume=True, hooks=quiet())
    assert isinstance(ShardStore(shards).manifest, Manifest)


@pytest.mark.slow
def test_ddp_two_ranks_on_gloo_match_a_single_process_evaluation(shards, tmp_path):
    """torchrun, 2 CPU ranks: only rank 0 writes; the all-reduced validation counts equal a
    single-process evaluation of the same weights."""
    import subprocess
    import sys
    from pathlib import Path

    from train.config.options import resolve
    from train.models import build_model
    from train.recipe.losses import build_loss
    from train.runtime import distributed
    from train.training import engine

    script = Path(sys.executable).parent / "train"
    if not script.exists():
        pytest.skip("the `train` console script is not installed in this environment")
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
               str(script), "run", "--shards", str(shards), "--variant", "v1", "--out", str(out), "--epochs", "1",
               "--batch-size", "2", "--lr", "0.01", "--workers", "0", "--base", "4", "--depth", "2", "--no-report",
               "--head-bias", "zero", "--schedule", "plateau", "--target", "classes", "--oversample-tumour", "1",
               "--stem", "1"]  # as the seed trained: a tiny run that predicts tumour
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ranks 2" in done.stdout + done.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no rank-1 files

    payload = ckpt.load(out / "checkpoints" / ckpt.LAST)
    model = build_model(payload["model"]["name"], payload["model"]["in_channels"], **payload["model"]["kwargs"])
    model.load_state_dict(payload["model_state"])
    config = resolve({}, payload["config"])
    val = fit.open_dataset(config, ShardStore(shards), ["val"], training=False, dist=distributed.Dist())
    loader = torch.utils.data.DataLoader(val, batch_size=3)
    single = engine.validate(model, loader, build_loss(config.loss), torch.device("cpu"), None, distributed.Dist(),
                             config.target)
    scores = single.scores()
    row = payload["history"][0]
    for kind, key in (("dice", "dice"), ("prec", "precision"), ("recall", "recall")):
        got = [row[f"{kind}_{name}"] for name in ("NEC/NET", "ED", "ET")]
        np.testing.assert_array_equal(np.asarray(got), scores[key])  # from integer counts: exact
    assert single.counts[0].sum() > 0  # the model predicts some tumour: a non-trivial comparison
    assert row["val_loss"] == pytest.approx(single.loss, rel=1e-4)  # float sums in another order


@pytest.mark.parametrize("argv, code, words", [
    (["--help"], 0, "Train, evaluate and apply"),  # stdout still buffered at exit comes out
    (["run", "--shards", "s", "--out", "o", "--variant", "v1", "--threads", "banana"], 2, "error: --threads"),
])
def test_a_torchrun_rank_leaves_with_its_exit_code_its_output_and_its_exit_handlers(tmp_path, argv, code, words):
    """A rank ends through `distributed.end_rank` (os._exit, skipping the C++ teardown that aborted one
    finished DDP run in ~100): what a normal exit gives still comes out, exit code included."""
    import subprocess
    import sys

    program = "import atexit; atexit.register(print, 'exit handler ran'); from train.cli import main; main()"
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    env.pop("PYTHONUNBUFFERED", None)  # output to a pipe stays buffered until exit, as under torchrun
    done = subprocess.run([sys.executable, "-c", program, *argv], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert done.returncode == code, done.stderr
    assert words in done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("exit handler ran")
    assert "Traceback" not in done.stderr


def test_a_report_that_cannot_be_written_never_fails_a_finished_training(shards, tmp_path, capsys):
    """The end-of-run report on a full disk: the training stands (exit 0, checkpoints), one warning."""
    import errno

    from train.reporting import report

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "report" / "report.html"))

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "main", full_disk)
        result = fit.run(options(shards, out, epochs=1, report=True), hooks=quiet())
    assert result.exit_code == 0 and result.epochs_done == 1
    assert (out / "checkpoints" / ckpt.BEST).is_file()
    err = capsys.readouterr().err
    assert "warning: the report was not written" in err and "No space left" in err and "Traceback" not in err


def test_a_diverging_run_keeps_its_last_good_checkpoint_and_fails(shards, tmp_path):
    """A finite --lr can still blow the loss up: the NaN epoch is not validated, not marked best and
    not saved over the good checkpoint, and the run exits 1 with one line naming the cause."""

    class Blowup(fit.Trainer):
        def compute_loss(self, logits, mask):
            loss = super().compute_loss(logits, mask)
            return loss * float("nan") if self.state.epoch == 1 and self.net.training else loss

    out = tmp_path / "run"
    result = fit.run(options(shards, out, epochs=3), hooks=quiet(), trainer_class=Blowup)
    assert result.exit_code == 1 and "diverged in epoch 2" in result.message and "--lr" in result.message
    assert result.epochs_done == 1 and len(rows(out)) == 2  # the header and epoch 1
    for name in (ckpt.LAST, ckpt.BEST):
        saved = torch.load(out / "checkpoints" / name, weights_only=True)
        assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model_state"].values()
                                           if v.is_floating_point())
    control = fit.run(options(shards, tmp_path / "ok", epochs=2), hooks=quiet())
    assert control.exit_code == 0 and control.epochs_done == 2
