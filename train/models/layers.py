"""Small blocks shared by the U-Net family (one home, as timm keeps its `layers/`).

Convolutions followed by batch norm carry no bias: BN subtracts the batch mean, so a bias
would be a dead parameter that only inflates the count.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, batch_norm: bool) -> list[nn.Module]:
    """3x3 'same' convolution, optional batch norm, ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return layers


class DoubleConv(nn.Sequential):
    """The U-Net level: two (3x3 conv [+ BN] + ReLU), keeping the spatial size."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = True) -> None:
        super().__init__(
            *conv_bn_relu(in_channels, out_channels, batch_norm),
            *conv_bn_relu(out_channels, out_channels, batch_norm),
        )


def conv1x1_bn(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    """1x1 convolution with optional batch norm (the projections of an attention gate)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers)


class AttentionGate(nn.Module):
    """Additive attention gate of Oktay et al. 2018 on a skip connection.

    alpha = sigmoid(psi(ReLU(W_g g + W_x x))), output x * alpha. As in MONAI's `AttentionUnet`,
    the gating signal g is the decoder feature already upsampled to the skip's resolution, so
    no strided projection or resampling of alpha is needed.
    """

    def __init__(
        self, skip_channels: int, gate_channels: int, inter_channels: int, batch_norm: bool = True
    ) -> None:
        super().__init__()
        self.w_g = conv1x1_bn(gate_channels, inter_channels, batch_norm)
        self.w_x = conv1x1_bn(skip_channels, inter_channels, batch_norm)
        self.psi = conv1x1_bn(inter_channels, 1, batch_norm)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(self.relu(self.w_g(g) + self.w_x(x))))
        return x * alpha


def check_spatial(x: torch.Tensor, depth: int) -> None:
    """Refuse inputs the encoder cannot halve `depth` times without rounding (skips would misalign)."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    factor = 2**depth
    height, width = x.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"input H and W must be divisible by 2**depth = {factor} (depth {depth}), "
            f"got {height}x{width}"
        )
