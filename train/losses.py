"""Multi-label segmentation losses on logits (B, C, H, W) and float {0, 1} targets of the same shape.

The outputs are independent sigmoid channels (NEC/NET, ED, ET or WT, TC, ET), not a softmax:
regions overlap, and even the disjoint classes are trained as the original design did.

`dice_loss` equals MONAI's `DiceLoss(sigmoid=True)` with its defaults (smooth_nr = smooth_dr =
1e-5, batch=False, reduction "mean"): a soft Dice per sample and per channel over the spatial
axes, then the mean over samples and channels. Per sample, so an empty channel of one slice is
scored on its own: with the smoothing terms it costs ~0 when the prediction is empty too and
~1 when it is not.

`dice_bce_loss` adds the mean binary cross-entropy with logits over every element. Not MONAI's
`DiceCELoss(sigmoid=True)` for C > 1: that one applies a softmax `CrossEntropyLoss` whenever the
input has more than one channel (it uses BCE only for one channel), which is wrong for
multi-label targets. It equals `DiceLoss(sigmoid=True)(x, y) + BCEWithLogitsLoss()(x, y)`.

Both compute in float32 even under autocast, since the Dice sums and the smoothing terms lose
too much in half precision.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTH_NR = 1e-5
SMOOTH_DR = 1e-5


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.shape != target.shape or logits.ndim < 3:
        raise ValueError(
            "logits and target must both be (B, C, spatial...) of the same shape, "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}"
        )


def dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over samples and channels of 1 - (2 sum(p t) + 1e-5) / (sum p + sum t + 1e-5)."""
    _check(logits, target)
    prob = torch.sigmoid(logits.float())
    target = target.float()
    spatial = tuple(range(2, logits.ndim))
    intersection = (prob * target).sum(spatial)
    total = prob.sum(spatial) + target.sum(spatial)
    dice = (2 * intersection + SMOOTH_NR) / (total + SMOOTH_DR)
    return (1 - dice).mean()


def dice_bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """`dice_loss` plus binary cross-entropy with logits, averaged over every element."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return dice_loss(logits, target) + bce


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "dice": dice_loss,
    "dice_bce": dice_bce_loss,
}


def build_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss registered as `name` ('dice' for v1, 'dice_bce' for v2)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]
