"""Model registry: one name per architecture, configured by keyword arguments.

    >>> model = build_model("attention_unet", in_channels=4)
    >>> count_parameters(model)
    7851643

Parameter counts with the defaults (base 32, depth 4, batch norm, 3 outputs):

    in_channels     unet        attention_unet
    2 (v1)          7,762,819   7,851,067
    4 (v2)          7,763,395   7,851,643
"""

from __future__ import annotations

from torch import nn

from .attention_unet import AttentionUNet
from .unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "attention_unet": AttentionUNet}


def build_model(name: str, in_channels: int, out_channels: int = 3, **kw: object) -> nn.Module:
    """Instantiate the model registered as `name`; `kw` go to its constructor (base, depth, ...)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](in_channels, out_channels, **kw)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; BN running statistics are buffers and not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["MODELS", "AttentionUNet", "UNet", "build_model", "count_parameters"]
