"""Classes for `train run --trainer tests.helpers.toy_trainer:NAME` (tests/train/test_trainer_option.py):
a toy `Trainer` subclass that overrides one step, and a class that is no `Trainer`."""

from __future__ import annotations

from train.training.trainer import Trainer

CALLS: list[bool] = []
"""One entry per `DoubledLoss.compute_loss` call: whether the model was in training mode."""


class DoubledLoss(Trainer):
    """The built-in loss, doubled, recording each call in `CALLS`."""

    def compute_loss(self, logits, mask):
        CALLS.append(self.model.training)
        return 2.0 * super().compute_loss(logits, mask)


class NotATrainer:
    """Named by `--trainer` to check the refusal of a class that is no `Trainer` subclass."""
