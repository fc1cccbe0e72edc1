"""U-Net of Ronneberger et al. 2015, 2D, the v1 baseline.

Level i of the encoder has `base * 2**i` channels (i = 0..depth-1), the bottleneck
`base * 2**depth`; each level is two 3x3 'same' convolutions (+ BN) + ReLU, max-pooling goes
down, a 2x2 stride-2 transposed convolution goes up and halves the channels, the skip is
concatenated, and a 1x1 convolution gives `out_channels` logits (apply a sigmoid per channel:
the outputs are multi-label). 'Same' padding (not the paper's valid convolutions) keeps the
output on the input grid; H and W must be divisible by 2**depth.

Parameters with the defaults (base 32, depth 4, batch norm), 3 outputs:
in_channels 2 (v1: t1ce, flair): 7,762,819.

`stem=2` puts a stride-2 3x3 convolution (+ BN + ReLU) before the first level and a 2x2 stride-2
transposed convolution before the head, as MONAI's `UNet` with a strided first layer does: every
level then works at half the resolution, which cuts the FLOPs per slice about 4x at the same
widths (bench/quality.py measures what that buys on a CPU). H and W must then be divisible by
2**(depth + 1).

`deep_supervision=True` adds 1x1 output heads on the decoder's levels at 1/2 and 1/4 of the
output resolution (nnU-Net's deep supervision, without its two lowest scales): in training mode
`forward` then returns a tuple (output, aux at 1/2, aux at 1/4), and `deep_supervision_loss`
weighs their losses 4:2:1 against targets downsampled by nearest neighbour. In eval mode (and so
in `predict`, `evaluate` and exported models) it returns the output alone.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import DoubleConv, check_spatial


class UNet(nn.Module):
    """2D U-Net returning logits (B, out_channels, H, W)."""

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
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("base", base), ("depth", depth)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if stem not in (1, 2):
            raise ValueError(f"stem must be 1 (none) or 2 (a stride-2 first convolution), got {stem}")
        self.depth, self.stem_stride = depth, stem
        widths = [base * 2**i for i in range(depth + 1)]
        first = in_channels
        self.stem = self.unstem = None
        if stem == 2:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, base, kernel_size=3, stride=2, padding=1, bias=not batch_norm),
                *([nn.BatchNorm2d(base)] if batch_norm else []), nn.ReLU(inplace=True))
            self.unstem = nn.ConvTranspose2d(base, base, kernel_size=2, stride=2)
            first = base
        self.encoder = nn.ModuleList(
            DoubleConv(c_in, c_out, batch_norm)
            for c_in, c_out in zip([first, *widths[:-2]], widths[:-1])
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(widths[-2], widths[-1], batch_norm)
        # Decoder lists run from the deepest level up, in the order forward uses them.
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2)
            for i in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(
            DoubleConv(2 * widths[i], widths[i], batch_norm) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        # decoder step -> its auxiliary head: the last steps before the output (1/2, then 1/4)
        self.aux_steps = [s for s in (depth - 2, depth - 3) if s >= 0] if deep_supervision else []
        self.aux_heads = nn.ModuleList(nn.Conv2d(widths[depth - 1 - s], out_channels, kernel_size=1)
                                       for s in self.aux_steps)

    def gate_skip(self, step: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """What decoder step `step` concatenates: the plain skip here; gated in `AttentionUNet`."""
        return skip

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        check_spatial(x, self.depth + (self.stem_stride == 2))
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        aux = {}
        for step, (up, level) in enumerate(zip(self.up, self.decoder)):
            x = up(x)
            skip = self.gate_skip(step, skips.pop(), x)
            x = level(torch.cat([skip, x], dim=1))
            if self.training and step in self.aux_steps:
                aux[step] = x
        if self.unstem is not None:
            x = self.unstem(x)
        out = self.head(x)
        if not aux:
            return out
        return (out, *(head(aux[s]) for s, head in zip(self.aux_steps, self.aux_heads)))
