"""Smooth random fields and small separable filters, in numpy only.

Everything here is deterministic given its inputs (a numpy ``Generator`` for the random parts)
and works on float32 arrays of any 3D shape.  Lengths are given in millimetres together with the
voxel spacing, so a field keeps its physical correlation length when the grid is coarse (tests
use 48x48x24 grids of the 240x240x155 template; one voxel is then ~5 mm).

How a smooth field is made: white noise on a coarse lattice (spacing = half the correlation
length), smoothed with a 5-tap binomial kernel along each axis, then linearly interpolated up to
the voxel grid one axis at a time.  That costs about three passes over the output, instead of an
FFT of the full volume.
"""

from __future__ import annotations

import math

import numpy as np

# A 5-tap binomial kernel (two passes of [1, 2, 1] / 4); its squared weights sum to 70/256, so a
# white-noise lattice has standard deviation sqrt(70/256) per axis after smoothing.
_BINOMIAL5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0], dtype=np.float32) / 16.0
_BINOMIAL5_GAIN = math.sqrt(70.0 / 256.0)


def resample_axis(a: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` at fractional indices ``positions``.

    Positions are clipped to the valid range, so the ends are extended as constants.
    """
    n = a.shape[axis]
    x = np.clip(np.asarray(positions, dtype=np.float64), 0.0, n - 1.0)
    i0 = np.minimum(np.floor(x).astype(np.intp), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    w = (x - i0).astype(np.float32)
    bshape = [1] * a.ndim
    bshape[axis] = len(x)
    w = w.reshape(bshape)
    lo = np.take(a, i0, axis=axis)
    hi = np.take(a, i1, axis=axis)
    hi -= lo
    hi *= w
    lo += hi
    return lo


def _smooth_lattice(g: np.ndarray) -> np.ndarray:
    """Valid 5-tap binomial convolution along every axis (each axis shrinks by 4)."""
    for axis in range(g.ndim):
        g = np.moveaxis(g, axis, 0)
        n = g.shape[0] - 4
        out = _BINOMIAL5[0] * g[0:n]
        for k in range(1, 5):
            out += _BINOMIAL5[k] * g[k : k + n]
        g = np.moveaxis(out, 0, axis)
    return g / np.float32(_BINOMIAL5_GAIN**g.ndim)


def smooth_field(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    corr_mm: float,
    spacing: tuple[float, ...],
) -> np.ndarray:
    """A float32 random field of ``shape``, about unit variance, correlation length ``corr_mm``.

    ``spacing`` is the voxel size in mm along each axis.  Where the correlation length is below
    two voxels the lattice is the voxel grid itself (the field is then as rough as the grid).
    """
    steps = [max(corr_mm / 2.0 / sp, 1.0) for sp in spacing]
    low = [int(math.ceil((n - 1) / st)) + 2 + 4 for n, st in zip(shape, steps)]
    g = _smooth_lattice(rng.standard_normal(low, dtype=np.float32))
    # A random sub-lattice phase, so lattice nodes do not always sit on the same voxels.
    phase = rng.uniform(0.0, 1.0, size=len(shape))
    # Upsample the axis that is cheapest to gather last: axis 0 (contiguous rows).
    for axis in reversed(range(len(shape))):
        pos = np.arange(shape[axis], dtype=np.float64) / steps[axis] + phase[axis]
        g = resample_axis(g, axis, pos)
    return np.ascontiguousarray(g)


def blur3(a: np.ndarray, weight: float, axes: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """3-tap blur ``[w, 1-2w, w]`` along ``axes`` with replicated edges; returns a new array.

    ``w = 0.15`` is close to a Gaussian of sigma 0.55 voxel: the partial-volume smoothing of a
    scanner's point-spread function plus resampling to the 1 mm grid.
    """
    w = np.float32(weight)
    c = np.float32(1.0 - 2.0 * weight)
    tmp = np.empty_like(a)
    for axis in axes:
        if a.shape[axis] < 2:
            continue
        src = np.moveaxis(a, axis, 0)
        out = np.multiply(src, c, out=np.moveaxis(tmp, axis, 0))
        t = np.empty_like(src[1:])
        np.multiply(src[:-1], w, out=t)
        out[1:] += t
        np.multiply(src[1:], w, out=t)
        out[:-1] += t
        out[0] += w * src[0]
        out[-1] += w * src[-1]
        a, tmp = tmp, a
    return a


def thick_slices(a: np.ndarray, factor: int, axis: int = 2) -> np.ndarray:
    """Simulate a thick-slice acquisition resampled to the fine grid along ``axis``.

    Blocks of ``factor`` slices are averaged (the thick slice), then linearly interpolated back
    at the fine slice centres: the stair-free but blurred through-plane look of 2D sequences
    (typical for T2 and FLAIR in multi-institutional data) after registration to 1 mm.
    """
    if factor < 2 or a.shape[axis] < 2 * factor:
        return a
    n = a.shape[axis]
    pad = (-n) % factor
    v = np.moveaxis(a, axis, 0)
    if pad:
        v = np.concatenate([v, np.repeat(v[-1:], pad, axis=0)], axis=0)
    low = v.reshape((v.shape[0] // factor, factor) + v.shape[1:]).mean(axis=1, dtype=np.float32)
    pos = (np.arange(n, dtype=np.float64) - (factor - 1) / 2.0) / factor
    out = resample_axis(low, 0, pos)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def cosine_profile(rng: np.random.Generator, n: int, terms: int = 2) -> np.ndarray:
    """A smooth 1D random profile over ``n`` samples: a few low-order cosines, unit-ish scale."""
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    out = np.zeros(n, dtype=np.float64)
    for k in range(1, terms + 1):
        amp = rng.normal(0.0, 1.0 / k)
        out += amp * np.cos(math.pi * k * t + rng.uniform(0, 2 * math.pi))
    return out.astype(np.float32)


# ------------------------------------------------------------------- boxes on the voxel grid


def box_around(lo_mm, hi_mm, spacing, shape) -> tuple[slice, ...]:
    out = []
    for lo, hi, sp, n in zip(lo_mm, hi_mm, spacing, shape):
        a = max(int(math.floor(lo / sp)), 0)
        b = min(int(math.ceil(hi / sp)) + 1, n)
        out.append(slice(a, max(a, b)))
    return tuple(out)


def inner_box(box: tuple[slice, ...], inner: tuple[slice, ...]) -> tuple[slice, ...]:
    """``inner`` (full-grid slices) relative to ``box`` (full-grid slices), clipped to it."""
    out = []
    for b, i in zip(box, inner):
        a = min(max(i.start, b.start), b.stop) - b.start
        e = min(max(i.stop, b.start), b.stop) - b.start
        out.append(slice(a, max(a, e)))
    return tuple(out)


def open_grid(coords, box):
    """Open (broadcastable) coordinate arrays, float32, for a box of the crop."""
    return [c[s].astype(np.float32).reshape([-1 if k == i else 1 for k in range(3)]) for i, (c, s) in enumerate(zip(coords, box))]


def tight_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, widened by ``margin`` voxels and clipped."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(k for k in range(mask.ndim) if k != axis)
        hit = np.nonzero(mask.any(axis=other))[0]
        if len(hit) == 0:
            raise ValueError("the brain mask is empty: grid too small")
        out.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(out)


def outer_box(crop: tuple[slice, ...], box: tuple[slice, ...]) -> tuple[slice, ...]:
    """A crop-relative box back in full-grid indices."""
    return tuple(slice(c.start + b.start, c.start + b.stop) for c, b in zip(crop, box))
