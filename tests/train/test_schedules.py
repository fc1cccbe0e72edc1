"""Every `--schedule` sets the documented rates in a tiny `train run` (cosine: test_fit.py).

The rate of every optimiser step is read with torch's global optimiser pre-hook, and the expected
rates are computed here from the documented rules, not with `train.recipe.schedules`: `poly` is nnU-Net's
lr x (1 - t)^0.9 after a linear warm-up, `plateau` is ReduceLROnPlateau on the validation mean
Dice (mode max, relative threshold 1e-4, no cooldown), with no warm-up.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.helpers.train_runs import options, quiet
from train import fit

torch.set_num_threads(1)

STEPS_PER_EPOCH = 5  # the `shards` fixture's 18 training slices in batches of 4


def run_recording_rates(overrides: dict) -> tuple[fit.Result, list[float]]:
    """`fit.run(overrides)` and the learning rate each optimiser step ran with."""
    rates: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: rates.append(
        optimizer.param_groups[0]["lr"]))
    try:
        result = fit.run(overrides, hooks=quiet())
    finally:
        handle.remove()
    assert result.exit_code == 0, result.message
    return result, rates


def test_poly_warms_up_then_decays_by_the_power_0_9_per_step(shards, tmp_path):
    result, rates = run_recording_rates(options(shards, tmp_path / "run", epochs=3, warmup=2, lr=0.01,
                                                schedule="poly"))
    total = 3 * STEPS_PER_EPOCH
    warmup = 1  # --warmup 2, at most a tenth of the 15 steps
    expected = [0.01 * (s + 1) / (warmup + 1) if s < warmup else 0.01 * (1 - (s - warmup) / (total - warmup)) ** 0.9
                for s in range(total)]
    assert rates == pytest.approx(expected, rel=1e-9)
    assert rates[0] == pytest.approx(0.005) and rates[1] == pytest.approx(0.01)  # the warm-up, then the peak
    # metrics.csv's lr is the rate of each epoch's last step
    assert [row["lr"] for row in result.history] == pytest.approx(expected[STEPS_PER_EPOCH - 1::STEPS_PER_EPOCH])


def test_plateau_cuts_the_rate_after_patience_epochs_without_a_better_validation_dice(shards, tmp_path):
    # a rate too small to change the predictions: the validation Dice stays where it is, so the
    # plateau is reached; the expected rates follow from the scores the run recorded
    lr, factor, patience = 1e-6, 0.5, 1
    result, rates = run_recording_rates(options(shards, tmp_path / "run", epochs=5, lr=lr, schedule="plateau",
                                                plateau_factor=factor, plateau_patience=patience))
    expected, rate, best, bad = [], lr, -math.inf, 0
    for row in result.history:
        expected.append(rate)
        score = -1.0 if math.isnan(row["mean_dice"]) else row["mean_dice"]
        if score > best * (1 + 1e-4):  # torch's documented rule in mode max, threshold_mode rel
            best, bad = score, 0
        else:
            bad += 1
        if bad > patience:
            rate, bad = rate * factor, 0
    assert [row["lr"] for row in result.history] == pytest.approx(expected, rel=1e-12)
    assert rates == pytest.approx([r for r in expected for _ in range(STEPS_PER_EPOCH)], rel=1e-12)  # no warm-up
    assert rates[-1] < lr  # the plateau was reached: the rate was cut
