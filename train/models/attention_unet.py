"""Attention U-Net of Oktay et al. 2018, 2D, the v2 model.

The U-Net of `unet.py` with an additive attention gate on every skip connection: the decoder
feature just upsampled to the skip's resolution is the gating signal g, the gate has
max(1, skip_channels // 2) intermediate channels (as MONAI's `AttentionUnet`), and the skip is
multiplied by the gate's sigmoid map before the concatenation. Everything else (levels,
pooling, transposed-conv upsampling, 1x1 head, the divisibility rule) is the U-Net's.

Parameters with the defaults (base 32, depth 4, batch norm), 3 outputs:
in_channels 4 (v2: t1, t1ce, t2, flair): 7,851,643.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import AttentionGate
from .unet import UNet


class AttentionUNet(UNet):
    """2D attention U-Net returning logits (B, out_channels, H, W)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 3,
        base: int = 32,
        depth: int = 4,
        batch_norm: bool = True,
        stem: int = 1,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, base, depth, batch_norm, stem, deep_supervision)
        widths = [base * 2**i for i in range(depth)]
        self.gates = nn.ModuleList(
            AttentionGate(widths[i], widths[i], max(1, widths[i] // 2), batch_norm)
            for i in reversed(range(depth))
        )

    def gate_skip(self, step: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.gates[step](skip, up)
