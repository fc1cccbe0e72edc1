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

from typing import Any, Callable

from torch import nn

from .attention_unet import AttentionUNet
from .unet import UNet

MODELS: dict[str, Callable[..., nn.Module]] = {}
"""Model name -> constructor `(in_channels, out_channels, **kwargs)`; `train run --model NAME`."""


def register_model(name: str, constructor: Callable[..., nn.Module] | None = None) -> Any:
    """Register a model under `name` (also usable as a class decorator). Its constructor takes
    `(in_channels, out_channels, base=..., depth=..., batch_norm=...)` (the options of `train run`;
    ignore what does not apply) and returns logits (B, out_channels, H, W)."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"a model named {name!r} is registered already")
        MODELS[name] = fn
        return fn

    return add if constructor is None else add(constructor)


register_model("unet", UNet)
register_model("attention_unet", AttentionUNet)


def build_model(name: str, in_channels: int, out_channels: int = 3, **kw: object) -> nn.Module:
    """Instantiate the model registered as `name`; `kw` go to its constructor (base, depth, ...)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](in_channels, out_channels, **kw)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; BN running statistics are buffers and not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["MODELS", "AttentionUNet", "UNet", "build_model", "count_parameters", "register_model"]
