"""`--head-bias prior`: each output starts at its class frequency in the training data."""

from __future__ import annotations

import math
from typing import Any

import torch


def class_priors(manifest: Any, splits: list[str], target: str) -> list[float] | None:
    """Fraction of the training slices' pixels in each output channel (from the manifest's per-patient
    label counts on the shard grid): NEC/NET, ED, ET or WT, TC, ET; None when the manifest lacks them."""
    counts = [0, 0, 0, 0]
    for pid in (p for split in splits for p in manifest.patients_of(split)):
        voxels = manifest.content["patients"][pid].get("class_voxels")
        if voxels is None:
            return None
        for label, n in enumerate(voxels):
            counts[label] += int(n)
    total = max(sum(counts), 1)
    nec, ed, et = counts[1], counts[2], counts[3]
    channels = (nec, ed, et) if target == "classes" else (nec + ed + et, nec + et, et)
    return [c / total for c in channels]


def init_head_bias(model: Any, priors: list[float] | None) -> None:
    """Start every output channel at its class prior, bias log(p / (1 - p)) (RetinaNet's and
    nnU-Net-style practice for rare classes): with a zero bias every pixel starts at p = 0.5, and
    the loss on the overwhelming background first drives the rare channels (NEC/NET, ~0.1 % of
    pixels) to zero, where measured runs stayed for hundreds of steps. Models without a `head`
    convolution are left as they are."""
    head = getattr(model, "head", None)
    bias = getattr(head, "bias", None)
    if priors is None or bias is None or bias.numel() != len(priors):
        return
    with torch.no_grad():
        for i, p in enumerate(priors):
            p = min(max(p, 1e-6), 0.5)
            bias[i] = math.log(p / (1 - p))


__all__ = ["class_priors", "init_head_bias"]
