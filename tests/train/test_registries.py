"""Where to add a model, a loss, a metric, a learning-rate schedule, an augmentation or a training
step: each is one registration (or one overridden method), shown here end to end through
`train run` and `train evaluate`'s code."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from shards_spec.read import ShardStore
from tests.helpers.train_runs import options, quiet
from train import fit, models
from train.metrics import COUNT_METRICS, ratio, register_count_metric
from train.recipe import augment, losses, schedules
from train.training.trainer import Trainer

torch.set_num_threads(1)


class PixelNet(nn.Module):
    """A toy model: one 1x1 convolution (logits per pixel from its channels)."""

    def __init__(self, in_channels: int, out_channels: int = 3, **ignored: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture
def registered():
    """Register the toys, and take them out again so other tests see the stock registries."""
    models.register_model("toy_pixelnet", PixelNet)
    calls = []

    def toy_loss(logits, target):
        calls.append(logits.shape)
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), target.float())

    losses.register_loss("toy_bce", toy_loss)
    register_count_metric("jaccard", "jacc", lambda tp, fp, fn: ratio(tp, tp + fp + fn))
    yield calls
    models.MODELS.pop("toy_pixelnet")
    losses.LOSSES.pop("toy_bce")
    COUNT_METRICS.pop("jaccard")


def read_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_registered_model_loss_and_metric_run_end_to_end(shards, tmp_path, registered):  # noqa: F811
    out = tmp_path / "toy"
    result = fit.run(options(shards, out, model="toy_pixelnet", loss="toy_bce", epochs=2), hooks=quiet())
    assert result.exit_code == 0 and result.epochs_done == 2
    assert registered and all(shape[1] == 3 for shape in registered)  # the registered loss was the one used
    weights = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model_state"]
    assert set(weights) == {"conv.weight", "conv.bias"}  # the registered model was the one trained
    rows = read_rows(out)
    assert len(rows) == 2
    for row in rows:
        for name in ("NEC/NET", "ED", "ET"):
            dice, jaccard = float(row[f"dice_{name}"]), float(row[f"jacc_{name}"])
            if math.isnan(dice):
                assert math.isnan(jaccard)
            else:  # an identity of the two scores, independent of how either is computed: J = D / (2 - D)
                assert jaccard == pytest.approx(dice / (2 - dice), abs=1e-12)


def test_a_trainer_subclass_overrides_one_step(shards, tmp_path):  # noqa: F811
    seen = []

    class Weighted(Trainer):
        def compute_loss(self, logits, mask):
            seen.append(self.model.training)
            return 2.0 * super().compute_loss(logits, mask)

    plain = fit.run(options(shards, tmp_path / "plain", epochs=1), hooks=quiet())
    doubled = fit.run(options(shards, tmp_path / "doubled", epochs=1), hooks=quiet(), trainer_class=Weighted)
    assert True in seen and False in seen  # the training steps and the validation both use it
    # Adam is invariant to a constant loss scale (up to eps), so the weights barely move apart,
    # but both logged losses are the overridden one's: about twice the plain run's.
    for column in ("train_loss", "val_loss"):
        ratio_ = doubled.history[0][column] / plain.history[0][column]
        assert ratio_ == pytest.approx(2.0, rel=0.05), column


def test_unknown_names_are_refused_naming_the_choices(shards, tmp_path):  # noqa: F811
    from train.config.options import ConfigError

    with pytest.raises(ConfigError, match=r"--model: must be one of \['attention_unet', 'unet'\]"):
        fit.run(options(shards, tmp_path / "x", model="nope"), hooks=quiet())
    with pytest.raises(ValueError, match="registered already"):
        models.register_model("unet", PixelNet)
    with pytest.raises(ValueError, match="registered already"):
        register_count_metric("dice", "d2", lambda tp, fp, fn: np.zeros_like(tp))


def test_a_registered_schedule_sets_every_steps_rate(shards, tmp_path):  # noqa: F811
    """A per-step decay registered by name drives the rate after the warm-up: the rate logged for
    each epoch is the one the decay gives at that point (a step count known independently: one
    step per batch of 4 slices)."""
    schedules.register_schedule("toy_halving", decay=lambda lr, t: lr * 0.5 ** (4 * t))
    try:
        result = fit.run(options(shards, tmp_path / "s", schedule="toy_halving", warmup=0, epochs=3), hooks=quiet())
    finally:
        schedules.SCHEDULES.pop("toy_halving")
    assert result.exit_code == 0
    # Each epoch's logged rate is its last step's, 0.01 x 0.5^(4 t) at t = (k S - 1) / (3 S) for S
    # steps per epoch: the third epoch gives S, which must be a whole number the others agree with.
    done = [math.log2(0.01 / row["lr"]) / 4 for row in result.history]
    steps = 1 / (3 * (1 - done[2]))
    assert steps == pytest.approx(round(steps), abs=1e-6) and round(steps) >= 2
    for k, fraction in enumerate(done, start=1):
        assert fraction == pytest.approx((k * round(steps) - 1) / (3 * round(steps)), abs=1e-9)
    with pytest.raises(ValueError, match="registered already"):
        schedules.register_schedule("cosine", decay=lambda lr, t: lr)
    with pytest.raises(ValueError, match="either decay"):
        schedules.register_schedule("neither")


def test_a_registered_augmentation_sees_every_training_batch_and_resumes(shards, tmp_path):  # noqa: F811
    """An augmentation registered by name is built once per epoch from its seed and called on
    every training batch (never on validation), and its generator is what the checkpoint keeps."""
    made, calls = [], []

    class Noise(augment.Augmenter):
        def __call__(self, image, mask):
            calls.append(image.shape[0])
            noise = torch.randn(image.shape, generator=self.generator) * 0.01
            return image + noise.to(image.device), mask

    def make(seed):
        made.append(seed)
        return Noise(generator_seed=seed)

    augment.register_augmentation("toy_noise", make)
    try:
        result = fit.run(options(shards, tmp_path / "a", augment="toy_noise", epochs=2), hooks=quiet())
    finally:
        augment.AUGMENTATIONS.pop("toy_noise")
    assert result.exit_code == 0
    assert len(made) == 2 and len(set(made)) == 2  # one augmenter per epoch, each with its own seed
    manifest = ShardStore(shards).manifest  # one pass per slice (oversample 1): the train split's slices
    per_epoch = sum(manifest.content["patients"][p]["slices"] for p in manifest.patients_of("train"))
    assert sum(calls) == 2 * per_epoch  # every training slice of both epochs, no validation slice
    saved = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["rng"]["augmenter"].dtype == torch.uint8  # the generator's state, for --resume
