"""From three sigmoid channels to a label map: the one rule `train evaluate`, `train predict`,
the report and validation during training all apply."""

from __future__ import annotations

import numpy as np
import torch

from shards_spec.labels import TARGETS

Array = np.ndarray | torch.Tensor


def probs_to_labels(probs: Array, target: str, threshold: float = 0.5, channel_axis: int = 0) -> Array:
    """Three sigmoid channels -> uint8 label map 0..3 (0 bg, 1 NEC/NET, 2 ED, 3 ET).

    classes (NEC/NET, ED, ET): the argmax channel + 1 where its probability exceeds `threshold`.
    regions (WT, TC, ET): ET where p(ET) > t, else NEC/NET where p(TC) > t, else ED where
    p(WT) > t, else background (the nested BraTS regions, innermost first).
    Torch in, torch out; numpy in, numpy out.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if probs.shape[channel_axis] != 3:
        raise ValueError(f"probs need 3 channels on axis {channel_axis}, got shape {tuple(probs.shape)}")
    is_torch = isinstance(probs, torch.Tensor)
    p = probs.movedim(channel_axis, 0) if is_torch else np.moveaxis(np.asarray(probs), channel_axis, 0)
    where = torch.where if is_torch else np.where
    if target == "classes":
        best = p.argmax(0)
        top = p.max(0).values if is_torch else p.max(0)
        labels = where(top > threshold, best + 1, 0)
    else:
        labels = where(p[2] > threshold, 3, where(p[1] > threshold, 1, where(p[0] > threshold, 2, 0)))
    return labels.to(torch.uint8) if is_torch else labels.astype(np.uint8)


__all__ = ["probs_to_labels"]
