"""Losses against MONAI's DiceLoss / BCEWithLogits as the independent reference."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from train.recipe.losses import build_loss, dice_bce_loss, dice_loss

torch.set_num_threads(1)

SHAPES = [(1, 3, 8, 8), (4, 3, 16, 12), (2, 1, 5, 7), (3, 3, 4, 4, 4)]


def random_case(shape, seed, empty_channels=True):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape, generator=g)
    target = (torch.rand(shape, generator=g) < 0.3).float()
    if empty_channels and shape[1] > 1:
        target[0, 1] = 0  # an empty target channel
        logits[-1, 0] = -20  # an (almost) empty prediction
        target[-1, 0] = 0  # ... with an empty target too
    return logits, target


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dice_matches_monai(shape, seed):
    logits, target = random_case(shape, seed)
    reference = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    assert torch.allclose(dice_loss(logits, target), reference, atol=1e-5)
    # our constants are MONAI's defaults: the bare constructor agrees as well
    assert torch.allclose(dice_loss(logits, target), DiceLoss(sigmoid=True, batch=True)(logits, target), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dice_bce_matches_monai_dice_plus_bce(shape, seed):
    logits, target = random_case(shape, seed)
    reference = DiceLoss(sigmoid=True, batch=True)(logits, target) + torch.nn.BCEWithLogitsLoss()(logits, target)
    assert torch.allclose(dice_bce_loss(logits, target), reference, atol=1e-5)


def test_dice_bce_matches_monai_dicece_per_channel():
    # MONAI's DiceCELoss uses BCE only for single-channel input; per channel it is our loss
    logits, target = random_case((3, 1, 8, 8), 3)
    reference = DiceCELoss(sigmoid=True, batch=True)(logits, target)
    assert torch.allclose(dice_bce_loss(logits, target), reference, atol=1e-5)


def test_empty_channel_cost():
    target = torch.zeros(1, 3, 8, 8)
    assert dice_loss(torch.full_like(target, -30.0), target) < 1e-5  # empty and predicted empty
    assert dice_loss(torch.full_like(target, 30.0), target) > 0.99  # empty but predicted full


def test_perfect_prediction_and_gradient():
    _, target = random_case((2, 3, 8, 8), 5, empty_channels=False)
    logits = (target * 2 - 1) * 30
    assert dice_loss(logits, target) < 1e-5
    logits = torch.zeros(2, 3, 8, 8, requires_grad=True)
    dice_bce_loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_half_precision_input_computes_in_float32():
    logits, target = random_case((2, 3, 8, 8), 6)
    expected = dice_bce_loss(logits, target)
    got = dice_bce_loss(logits.bfloat16(), target.bfloat16())
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=0.02)


def test_build_loss_and_shape_errors():
    assert build_loss("dice") is dice_loss and build_loss("dice_bce") is dice_bce_loss
    with pytest.raises(ValueError, match="choose one of \\['dice', 'dice_bce'\\]"):
        build_loss("focal")
    with pytest.raises(ValueError, match="same shape"):
        dice_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4))


@pytest.mark.parametrize("loss", ["dice", "dice_bce"])
def test_an_all_empty_batch_and_a_batch_missing_a_class_against_monai(loss):
    """The hand-built cases of the quality issue: an all-empty target batch (no tumour in any
    slice), and a class that no slice of the batch has, each against MONAI's batch Dice (+ BCE)."""
    g = torch.Generator().manual_seed(7)
    logits = 2 * torch.randn(4, 3, 8, 8, generator=g)
    empty = torch.zeros(4, 3, 8, 8)
    missing = (torch.rand(4, 3, 8, 8, generator=g) < 0.3).float()
    missing[:, 0] = 0  # NEC/NET (or WT) absent from the whole batch
    for target in (empty, missing):
        reference = DiceLoss(sigmoid=True, batch=True)(logits, target)
        if loss == "dice_bce":
            reference = reference + torch.nn.BCEWithLogitsLoss()(logits, target)
        assert torch.allclose(build_loss(loss)(logits, target), reference, atol=1e-5)
    # by hand: an absent class costs 1 - s / (sum p + s) with s = 1e-5, so even a confident "absent"
    # (p = sigmoid(-12) on 256 pixels: sum p = 0.0016) costs ~0.994, the batch Dice's known trait
    confident_absent = torch.full((4, 3, 8, 8), -12.0)
    sum_p = 256 * torch.sigmoid(torch.tensor(-12.0)).item()
    assert dice_loss(confident_absent, empty).item() == pytest.approx(1 - 1e-5 / (sum_p + 1e-5), rel=1e-4)
