"""A time budget's learning-rate schedule follows the pace the run actually gets.

The real `Trainer` runs on tiny shards under a fake clock: every training step "takes" the seconds
a speed profile gives for the moment it starts (slow first minute, a slowdown half-way, a pause, a
resumed run). What a user needs from a budgeted run: the budget holds, the decay is never far ahead
of the clock (so the run does not spend its budget at the floor rate, as a plan made once from
slow first steps did), and the run still ends annealed.
"""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from tests import shard_fixtures
from tests.shard_fixtures import learnable_slices
from train import fit
from train.recipe.schedules import MIN_LR_FRACTION, budget_progress
from train.training.trainer import Trainer

torch.set_num_threads(1)

LR = 0.01
BUDGET = 600.0
STEADY = 3.0  # fake seconds per step at full speed: ~190 steps fit, 5 steps an epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("paced")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shard_fixtures, "patient_slices", learnable_slices)
        return shard_fixtures.make_shards(root / "s", patients={"p1": 6, "p2": 6, "p3": 6, "p4": 2},
                                          splits={"train": ["p1", "p2", "p3"], "val": ["p4"]}, size=16,
                                          tumour_every=1)


class Recorder:
    """Runs a budgeted `train run` whose steps take `profile(elapsed)` fake seconds; keeps
    (elapsed seconds, learning rate) of every step."""

    def __init__(self, profile) -> None:
        self.profile, self.now, self.start, self.rates = profile, 0.0, 0.0, []

    def clock(self) -> float:
        return self.now

    def tick(self, epoch: int, step: int, stop) -> None:
        self.now += self.profile(self.now - self.start)

    def run(self, shards, out, budget: float = BUDGET, resume: bool = False) -> fit.Result:
        recorder = self

        class Recording(Trainer):
            def learning_rate(self, step: int) -> float:
                rate = super().learning_rate(step)
                recorder.rates.append((recorder.now - recorder.start, rate))
                return rate

        self.start, self.rates = self.now, []
        hooks = fit.Hooks(clock=self.clock, after_step=self.tick, console=Console(quiet=True))
        options = {"out": str(out), "time_budget": f"{budget:g}s"}
        if not resume:
            options.update(shards=str(shards), variant="v1", epochs=1000, batch_size=4, workers=0, base=4, depth=2,
                           lr=LR, warmup=0, seed=3, report=False, target="classes", oversample_tumour=1, stem=1)
        return fit.run(options, resume=resume, hooks=hooks, trainer_class=Recording)

    def used(self) -> float:
        return self.now - self.start


def floor_reached_at(rates: list[tuple[float, float]], budget: float) -> float:
    """The fraction of the budget elapsed when the rate first came within 2x of the schedule's
    floor (a perfectly paced cosine gets there at 93.6 % of its budget), 1.0 if it never did."""
    for elapsed, rate in rates:
        if rate <= 2 * MIN_LR_FRACTION * LR:
            return elapsed / budget
    return 1.0


def ahead_of_the_clock(rates: list[tuple[float, float]], budget: float) -> float:
    """How far the decay ran ahead of the budget's elapsed fraction, at worst (0: never ahead)."""
    worst = 0.0
    for elapsed, rate in rates:
        cosine = (rate / LR - MIN_LR_FRACTION) / (1 - MIN_LR_FRACTION)  # 0.5 (1 + cos(pi t))
        t = torch.arccos(torch.tensor(2 * cosine - 1).clamp(-1, 1)).item() / torch.pi
        worst = max(worst, t - elapsed / budget)
    return worst


PROFILES = {
    "steady": lambda t: STEADY,
    "slow first minute": lambda t: 10 * STEADY if t < 60 else STEADY,  # a tenth of the speed for 60 s
    "slow start, long": lambda t: 10 * STEADY if t < 150 else STEADY,
    "fast then slow": lambda t: STEADY if t < BUDGET / 2 else 3 * STEADY,
    "a pause in the middle": lambda t: 60.0 if 290 <= t < 293 else STEADY,
}


@pytest.mark.parametrize("name", list(PROFILES))
def test_the_decay_follows_the_pace_and_ends_with_the_budget(shards, tmp_path, name):
    recorder = Recorder(PROFILES[name])
    result = recorder.run(shards, tmp_path / "run")
    assert result.exit_code == 0 and "time budget" in result.message
    assert recorder.used() <= BUDGET
    rates = recorder.rates
    assert floor_reached_at(rates, BUDGET) >= 0.9, name  # >= 90 % of the budget at a useful rate
    assert ahead_of_the_clock(rates, BUDGET) <= 0.1, name
    assert rates[-1][1] <= 0.1 * LR, name  # and it still ends annealed
    assert all(b <= a * (1 + 1e-9) for (_, a), (_, b) in zip(rates, rates[1:])), "the rate never rises again"


def test_a_resumed_budget_run_plans_its_new_budget(shards, tmp_path):
    """A run stopped by its budget, resumed with another: the schedule spans the steps of both (so
    the resumed part starts lower than the first run did) and ends with the new budget."""
    out = tmp_path / "run"
    first = Recorder(PROFILES["steady"])
    first.run(shards, out, budget=300.0)
    assert first.rates[-1][1] <= 0.1 * LR
    second = Recorder(PROFILES["slow first minute"])
    resumed = second.run(shards, out, budget=300.0, resume=True)
    assert resumed.exit_code == 0 and second.used() <= 300.0
    rates = second.rates
    assert rates[0][1] < 0.9 * LR  # about half-way through the combined schedule, not back at the peak
    assert rates[-1][1] <= 0.1 * LR
    combined = [(300.0 + elapsed, rate) for elapsed, rate in rates]  # the schedule spans both budgets
    assert floor_reached_at(combined, 600.0) >= 0.9


def test_budget_progress_spans_earlier_processes_of_a_resumed_run():
    assert budget_progress(150.0, 600.0) == pytest.approx(0.25)
    assert budget_progress(700.0, 600.0) == 1.0 and budget_progress(-1.0, 600.0) == 0.0
    assert budget_progress(0.0, 600.0, before=600.0) == pytest.approx(0.5)  # resumed after a 600 s budget
    assert budget_progress(600.0, 600.0, before=600.0) == 1.0
