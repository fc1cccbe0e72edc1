"""The 'light' augmentation of v2: flips, small rotations and scales, intensity jitter.

As in TorchIO and MONAI, randomness is drawn first (`sample_params`, from an explicit CPU
`torch.Generator`, so a run is reproducible whatever the device) and then applied
deterministically (`apply`) to a whole batch on whatever device it lives on. `Augmenter` ties
the two to its own generator and exposes the generator state as a uint8 tensor, so a
checkpoint can store it and `torch.load(weights_only=True)` can restore it.

Apply it to the batch in the training loop, after the loader (one generator, not one per
loader worker, so resuming restores the whole random stream).

Per sample:

- geometry, one resampling for all of it: a mirror of W (p_flip) and of H (p_flip), a rotation
  by U(-rot_deg, rot_deg) degrees about the image centre, a zoom by U(scale); the image is
  resampled bilinearly, the mask by nearest neighbour on the same grid (so they stay aligned),
  and whatever comes from outside the field of view is 0 (background);
- intensity, per channel and only on brain voxels (a voxel is brain where any channel is
  non-zero, the shards' convention), so the background stays exactly 0: gamma, then
  x * U(1 - scale, 1 + scale) + U(-shift, shift) (z-score units). The data are z-scored, so
  negative values rule out x ** gamma; gamma is applied to the channel rescaled to [0, 1] over
  its brain voxels (min..max) and mapped back, as nnU-Net does, which keeps the channel's range.
  Intensity is applied before the geometry, on the original grid where the brain mask is exact.

Masks may be the label map (B, H, W) of any integer or bool dtype, or binary channels
(B, K, H, W) (float, integer or bool); they come back in the dtype they came in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Intensity:
    """Ranges of the intensity jitter (z-score units); `gamma` is drawn log-uniformly."""

    scale: float = 0.1
    shift: float = 0.1
    gamma: tuple[float, float] = (0.8, 1.25)


@dataclass(frozen=True)
class AugConfig:
    """Ranges of all random parameters; `intensity=None` leaves intensities untouched."""

    p_flip: float = 0.5
    rot_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    intensity: Intensity | None = Intensity()

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_flip <= 1.0:
            raise ValueError(f"p_flip must be in [0, 1], got {self.p_flip}")
        if not 0.0 <= self.rot_deg <= 180.0:
            raise ValueError(f"rot_deg must be in [0, 180], got {self.rot_deg}")
        if not 0.0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if self.intensity is not None:
            low, high = self.intensity.gamma
            if not 0.0 < low <= high:
                raise ValueError(f"gamma must be (low, high) with 0 < low <= high, got {(low, high)}")
            if self.intensity.scale < 0 or self.intensity.shift < 0:
                raise ValueError("intensity scale and shift must be >= 0")


@dataclass
class AugParams:
    """Drawn parameters of one batch; every field is a tensor with the batch as first axis."""

    flip_w: Tensor  # bool (B,): mirror the W (last) axis
    flip_h: Tensor  # bool (B,): mirror the H axis
    angle: Tensor  # float (B,): rotation in degrees
    zoom: Tensor  # float (B,): > 1 enlarges the content
    gain: Tensor  # float (B, C)
    offset: Tensor  # float (B, C)
    gamma: Tensor  # float (B, C)

    @classmethod
    def identity(cls, batch_size: int, channels: int) -> AugParams:
        """Parameters that change nothing (a starting point for tests and hand-built cases)."""
        no = torch.zeros(batch_size, dtype=torch.bool)
        ones = torch.ones(batch_size, channels)
        return cls(no, no.clone(), torch.zeros(batch_size), torch.ones(batch_size),
                   ones, torch.zeros(batch_size, channels), ones.clone())

    def to(self, device: torch.device | str) -> AugParams:
        return AugParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def sample_params(
    batch_size: int, channels: int, generator: torch.Generator, config: AugConfig = AugConfig()
) -> AugParams:
    """Draw one batch of parameters on the CPU, always in the same order (reproducible)."""
    b, bc = (batch_size,), (batch_size, channels)
    flip_w = torch.rand(b, generator=generator) < config.p_flip
    flip_h = torch.rand(b, generator=generator) < config.p_flip
    angle = _uniform(-config.rot_deg, config.rot_deg, b, generator)
    zoom = _uniform(*config.scale, b, generator)
    params = AugParams.identity(batch_size, channels)
    params.flip_w, params.flip_h, params.angle, params.zoom = flip_w, flip_h, angle, zoom
    if config.intensity is not None:
        jitter = config.intensity
        params.gain = _uniform(1 - jitter.scale, 1 + jitter.scale, bc, generator)
        params.offset = _uniform(-jitter.shift, jitter.shift, bc, generator)
        log_low, log_high = (math.log(g) for g in jitter.gamma)
        params.gamma = torch.exp(_uniform(log_low, log_high, bc, generator))
    return params


def _theta(params: AugParams, height: int, width: int) -> Tensor:
    """(B, 2, 3) affine for `affine_grid`: output pixel -> input pixel, in normalised coordinates.

    In pixel units about the centre, input = flips @ rotation @ output / zoom. Normalised
    coordinates scale x by 2/W and y by 2/H, so the off-diagonal terms are rescaled by the
    aspect ratio; without that a rotation of a non-square image would shear it.
    """
    rad = torch.deg2rad(params.angle.double())
    cos, sin = torch.cos(rad), torch.sin(rad)
    fw = 1.0 - 2.0 * params.flip_w.double()
    fh = 1.0 - 2.0 * params.flip_h.double()
    inv_zoom = 1.0 / params.zoom.double()
    theta = torch.zeros(len(rad), 2, 3, dtype=torch.float64, device=rad.device)
    theta[:, 0, 0] = fw * cos * inv_zoom
    theta[:, 0, 1] = -fw * sin * inv_zoom * (height / width)
    theta[:, 1, 0] = fh * sin * inv_zoom * (width / height)
    theta[:, 1, 1] = fh * cos * inv_zoom
    return theta


def _intensity(image: Tensor, params: AugParams) -> Tensor:
    """Gamma (on the brain-wise min-max rescaled channel), gain and offset on brain voxels only."""
    brain = (image != 0).any(dim=1, keepdim=True)
    inf = torch.tensor(float("inf"), dtype=image.dtype, device=image.device)
    low = torch.where(brain, image, inf).amin(dim=(2, 3), keepdim=True)
    high = torch.where(brain, image, -inf).amax(dim=(2, 3), keepdim=True)
    span = high - low
    usable = torch.isfinite(span) & (span > 1e-6)  # no brain or a constant channel: no gamma
    span = torch.where(usable, span, torch.ones_like(span))
    low = torch.where(usable, low, torch.zeros_like(low))
    unit = ((image - low) / span).clamp(0, 1)
    gamma, gain, offset = (p[:, :, None, None].to(image.dtype) for p in (params.gamma, params.gain, params.offset))
    out = torch.where(usable, unit.pow(gamma) * span + low, image)
    out = out * gain + offset
    return torch.where(brain, out, torch.zeros_like(out))


def _resample(x: Tensor, grid: Tensor, mode: str) -> Tensor:
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def apply(image: Tensor, mask: Tensor, params: AugParams) -> tuple[Tensor, Tensor]:
    """Apply drawn parameters to image (B, C, H, W) float and mask (B, H, W) or (B, K, H, W)."""
    if image.ndim != 4 or not image.is_floating_point():
        raise ValueError(
            f"image must be a float (B, C, H, W) tensor, got {image.dtype} {tuple(image.shape)}"
        )
    batch, channels, height, width = image.shape
    if mask.ndim not in (3, 4) or mask.shape[0] != batch or mask.shape[-2:] != (height, width):
        raise ValueError(f"mask must be (B, H, W) or (B, K, H, W) matching image {tuple(image.shape)}, "
                         f"got {tuple(mask.shape)}")
    if params.gain.shape != (batch, channels):
        raise ValueError(f"params drawn for {tuple(params.gain.shape)} (batch, channels), "
                         f"image has {(batch, channels)}")
    params = params.to(image.device)
    image = _intensity(image, params)
    theta = _theta(params, height, width).to(image.dtype)
    grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=False)
    image = _resample(image, grid, "bilinear")
    channels_first = mask if mask.ndim == 4 else mask[:, None]
    warped = _resample(channels_first.to(image.dtype), grid, "nearest").round().to(mask.dtype)
    return image, (warped if mask.ndim == 4 else warped[:, 0])




class Augmenter:
    """`apply(sample_params(...))` drawing from its own seeded generator; see the module doc."""

    def __init__(
        self,
        generator_seed: int,
        p_flip: float = 0.5,
        rot_deg: float = 15.0,
        scale: tuple[float, float] = (0.9, 1.1),
        intensity: Intensity | None = Intensity(),
        config: AugConfig | None = None,
    ) -> None:
        self.config = config if config is not None else AugConfig(p_flip, rot_deg, tuple(scale), intensity)
        self.generator = torch.Generator().manual_seed(generator_seed)

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        params = sample_params(image.shape[0], image.shape[1], self.generator, self.config)
        return apply(image, mask, params)

    def state(self) -> Tensor:
        """The generator state (uint8 tensor), for a `weights_only` checkpoint."""
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


AUGMENTATIONS: dict[str, Callable[[int], Any]] = {}
"""`--augment NAME` -> `make(seed)`: the epoch's augmenter, or None for no augmentation. An
augmenter is called on each training batch, `augmenter(image, mask) -> (image, mask)` on the
batch's device, and draws its randomness from a seeded `torch.Generator` whose state it gives and
takes back (`state()` -> uint8 tensor, `set_state(tensor)`): the checkpoint stores it, so
`--resume` continues the random stream exactly (`Augmenter` is one)."""


def register_augmentation(name: str, make: Callable[[int], Any]) -> Callable[[int], Any]:
    """Register `make(seed) -> augmenter | None` as `--augment NAME` (see `AUGMENTATIONS`)."""
    if name in AUGMENTATIONS:
        raise ValueError(f"an augmentation named {name!r} is registered already")
    AUGMENTATIONS[name] = make
    return make


def light(seed: int) -> Augmenter:
    """v2's augmentation: the ranges of `AugConfig()` (module docstring)."""
    return Augmenter(generator_seed=seed, config=AugConfig())


register_augmentation("none", lambda seed: None)
register_augmentation("light", light)
