"""From three sigmoid channels to a label map: the one rule `train evaluate`, `train predict`,
the report and validation during training all apply.

Both targets are decided as the nested BraTS regions, innermost first (ET, then the tumour core,
then the whole tumour), so a voxel is never taken from an inner region because an outer channel
fires more strongly there:

- regions (WT, TC, ET, as nnU-Net trains them): ET where p(ET) > t, else NEC/NET where
  p(TC) > t, else ED where p(WT) > t.
- classes (NEC/NET, ED, ET, mutually exclusive): the region probabilities are sums of the class
  probabilities, p(TC) = p(NEC/NET) + p(ET) and p(WT) = p(TC) + p(ED), then the same order. The
  rule it replaces (the strongest class above t) threw away what the network learned: measured in
  issue 11, the ED channel also fired inside the tumour and outvoted ET, so a patient with 4,949
  ET voxels got 224.
"""

from __future__ import annotations

import numpy as np
import torch

from shards_spec.labels import TARGETS

Array = np.ndarray | torch.Tensor

THRESHOLD = 0.5
"""A channel is on where its sigmoid probability exceeds this (validation, evaluate, predict, export)."""


def probs_to_labels(probs: Array, target: str, threshold: float = THRESHOLD, channel_axis: int = 0) -> Array:
    """Three sigmoid channels -> uint8 label map 0..3 (0 bg, 1 NEC/NET, 2 ED, 3 ET).

    Nested regions, innermost first (see the module doc): ET where p(ET) > t, else NEC/NET where
    p(TC) > t, else ED where p(WT) > t, else background; for `classes` p(TC) = p(NEC/NET) + p(ET)
    and p(WT) = p(TC) + p(ED). Torch in, torch out; numpy in, numpy out.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    if probs.shape[channel_axis] != 3:
        raise ValueError(f"probs need 3 channels on axis {channel_axis}, got shape {tuple(probs.shape)}")
    is_torch = isinstance(probs, torch.Tensor)
    p = probs.movedim(channel_axis, 0) if is_torch else np.moveaxis(np.asarray(probs), channel_axis, 0)
    where = torch.where if is_torch else np.where
    if target == "classes":
        et = p[2]
        tc = p[0] + et
        wt = tc + p[1]
    else:
        wt, tc, et = p[0], p[1], p[2]
    labels = where(et > threshold, 3, where(tc > threshold, 1, where(wt > threshold, 2, 0)))
    return labels.to(torch.uint8) if is_torch else labels.astype(np.uint8)


def expand_labels(labels: torch.Tensor, target: str) -> torch.Tensor:
    """A label map (..., H, W) of any integer dtype -> bool (..., 3, H, W) channels of `target`:
    NEC/NET, ED, ET for classes; WT, TC, ET for regions (`shards_spec.labels.expand` in torch)."""
    if target == "classes":
        channels = [labels == 1, labels == 2, labels == 3]
    elif target == "regions":
        channels = [labels > 0, (labels == 1) | (labels == 3), labels == 3]
    else:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    return torch.stack(channels, dim=-3)


__all__ = ["THRESHOLD", "expand_labels", "probs_to_labels"]
