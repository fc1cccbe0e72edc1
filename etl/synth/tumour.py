"""Glioma lesions: their random parameters and how one is painted into the phantom.

A lesion is an edema envelope (label ED) around a tumour core.  The core of an enhancing
tumour is an irregular enhancing rim (label ET) around a necrotic centre (label NCR/NET) with
non-enhancing patches; the core of a non-enhancing tumour is solid NCR/NET with an optional
fluid cyst.  The lesion also pushes its neighbours away (mass effect, see ``displacement``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from etl.synth.fields import box_around, inner_box, open_grid, outer_box, smooth_field
from etl.synth.tissue import CHOROID, CSF, DGM, ET, GM, NECROSIS, SOLID, WM
from etl.synth.profiles import PROFILES, Profile


@dataclass(frozen=True)
class Lesion:
    centre: tuple[float, float, float]  # template mm
    radius: float  # whole-tumour (edema envelope) radius, template mm
    axes: tuple[float, float, float]  # relative semi-axes of the envelope
    rotation: tuple[tuple[float, float, float], ...]  # 3x3 orthonormal
    core_ratio: float  # core radius / envelope radius
    core_offset: tuple[float, float, float]  # core centre relative to envelope centre, mm
    enhancing: bool
    necrosis_ratio: float  # enhancing: necrotic centre, in core radii (0 = solid)
    rim_patchiness: float  # enhancing: fraction of the rim that does not enhance
    cyst_ratio: float  # non-enhancing: fluid cyst, in core radii (0 = none)
    roughness: float  # amplitude of the shape noise
    mass_effect: float  # peak displacement of neighbouring structures, mm


def _random_rotation(rng: np.random.Generator) -> tuple[tuple[float, float, float], ...]:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return tuple(tuple(float(v) for v in row) for row in q)


def draw_lesion(rng, grade, centre, axes, scale_range, profile: Profile = PROFILES["default"]) -> Lesion:
    a = np.asarray(axes)
    c = np.asarray(centre)
    radius = float(np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]))))
    for _ in range(100):
        side = rng.choice((-1.0, 1.0))
        p = np.array([side * rng.uniform(0.12, 0.6), rng.uniform(-0.62, 0.6), rng.uniform(-0.3, 0.55)])
        if np.linalg.norm(p) + 0.6 * radius / a.min() < 0.95:
            break
        radius *= 0.97
    if grade == "HGG":
        enhancing = rng.uniform() < profile.hgg_enhancing
        core_ratio = rng.uniform(*profile.hgg_core)
    else:
        enhancing = rng.uniform() < profile.lgg_enhancing
        core_ratio = rng.uniform(0.5, 0.9)
    necrosis = 0.0 if rng.uniform() < profile.no_necrosis else rng.uniform(*profile.necrosis)
    return Lesion(
        centre=tuple(float(v) for v in c + p * a),
        radius=radius,
        axes=tuple(float(v) for v in np.exp(rng.normal(0.0, 0.18, 3))),
        rotation=_random_rotation(rng),
        core_ratio=float(core_ratio),
        core_offset=tuple(float(v) for v in rng.normal(0.0, 0.12 * radius, 3)),
        enhancing=bool(enhancing),
        necrosis_ratio=float(necrosis) if enhancing else 0.0,
        rim_patchiness=float(rng.uniform(0.0, 0.3)) if enhancing else 0.0,
        cyst_ratio=0.0 if enhancing or rng.uniform() < 0.6 else float(rng.uniform(0.3, 0.7)),
        roughness=float(rng.uniform(*profile.roughness)),
        mass_effect=float(rng.uniform(0.0, 0.35) * radius),
    )


def displacement(params, X, Y, Z):
    """Coordinates pulled towards each lesion: sampling a structure there pushes it away."""
    for lesion in params.lesions:
        if lesion.mass_effect <= 0:
            continue
        lx, ly, lz = lesion.centre
        ddx, ddy, ddz = X - lx, Y - ly, Z - lz
        d2 = ddx * ddx + ddy * ddy + ddz * ddz
        s = np.float32(lesion.radius)
        # peak displacement ``mass_effect`` mm at distance ``radius`` from the centre
        k = np.float32(lesion.mass_effect / lesion.radius) * np.exp(0.5 - d2 / (2.0 * s * s))
        X, Y, Z = X - k * ddx, Y - k * ddy, Z - k * ddz
    return X, Y, Z


def paint_lesion(lesion, rng, tissue, seg, brain, coords, crop, spacing, shape):
    """Paint one lesion into ``tissue`` and ``seg``; return (box, edema blend weight).

    Fields, all in the lesion's rotated frame: ``e_field`` (< 1 inside the edema envelope) and
    ``c_field`` (< 1 inside the tumour core), each a normalised ellipsoidal radius plus smooth
    noise.  Labels nest by construction: the core is inside a margin-widened envelope, the
    enhancing rim surrounds the necrotic centre.  ``rng`` gives the three noise fields, in the
    order envelope, core, interior.
    """
    clip = 1.6
    box, q = _lesion_frame(lesion, clip, coords, crop, spacing, shape)
    bshape = tuple(s.stop - s.start for s in box)
    R = lesion.radius
    n_env = np.clip(smooth_field(rng, bshape, 0.35 * R, spacing), -clip, clip)
    n_core = np.clip(smooth_field(rng, bshape, 0.25 * R, spacing), -clip, clip)
    n_in = smooth_field(rng, bshape, 0.2 * R, spacing)
    t = tissue[box]
    s = seg[box]
    inside = brain[box]

    e_field = _envelope_field(lesion, q, n_env, t)
    c_field = _core_field(lesion, q, n_core)
    fluid = (t == CSF) | (t == CHOROID)
    core = (c_field < 1.0) & inside
    rc = R * lesion.core_ratio
    margin = max(2.0, max(spacing)) / (rc * np.asarray(lesion.axes).min())  # edema at least ~2 mm around the core
    envelope = (c_field < 1.0 + margin) & inside
    edema = (((e_field < 1.0) & ~fluid) | envelope) & inside
    necrosis, solid, et = _core_parts(lesion, core, c_field + np.float32(0.15) * n_in, n_in)
    _label(s, t, edema, necrosis, solid, et)
    return box, _edema_weight(e_field, envelope, core | fluid | ~inside)


def _lesion_frame(lesion, clip, coords, crop, spacing, shape):
    """The crop-relative box the lesion can reach (its envelope widened by the largest shape
    noise, ``clip``) and the box's coordinates in the lesion's rotated frame, R^T (x - centre)."""
    centre = np.asarray(lesion.centre)
    axes = np.asarray(lesion.axes)
    reach = (1.12 + clip * lesion.roughness) * lesion.radius * axes.max() + 2.0 * max(spacing)
    box = inner_box(crop, box_around(centre - reach, centre + reach, spacing, shape))
    gx, gy, gz = open_grid(coords, outer_box(crop, box))
    rot = np.asarray(lesion.rotation, dtype=np.float32)
    d = (gx - centre[0], gy - centre[1], gz - centre[2])
    return box, [rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2] for i in range(3)]


def _envelope_field(lesion, q, n_env, t):
    """< 1 inside the edema envelope: vasogenic edema spreads along white matter and mostly
    spares grey matter (``t``, the tissue before the lesion is painted)."""
    R = lesion.radius
    e_field = np.sqrt(sum((qi / np.float32(R * ai)) ** 2 for qi, ai in zip(q, lesion.axes)))
    e_field += np.float32(lesion.roughness) * n_env
    e_field -= np.float32(0.12) * (t == WM)
    e_field += np.float32(0.3) * ((t == GM) | (t == DGM))
    return e_field


def _core_field(lesion, q, n_core):
    """< 1 inside the tumour core, centred at ``core_offset`` in the lesion's frame."""
    rc = lesion.radius * lesion.core_ratio
    off = lesion.core_offset
    c_field = np.sqrt(sum(((qi - oi) / np.float32(rc * ai)) ** 2 for qi, oi, ai in zip(q, off, lesion.axes)))
    c_field += np.float32(0.8 * lesion.roughness) * n_core
    return c_field


def _core_parts(lesion, core, inner, n_in):
    """(necrosis, solid, et) masks of the core: an enhancing rim with non-enhancing patches
    around a necrotic centre, or solid non-enhancing tumour around an optional fluid cyst."""
    if lesion.enhancing:
        necrosis = core & (inner < lesion.necrosis_ratio)
        rim = core & ~necrosis
        thr = _normal_quantile(1.0 - lesion.rim_patchiness) if lesion.rim_patchiness > 0 else np.inf
        solid = rim & (n_in > thr)  # non-enhancing patches of the rim (label NCR/NET)
        return necrosis, solid, rim & ~solid
    necrosis = core & (inner < lesion.cyst_ratio)  # a fluid cyst, if any
    return necrosis, core & ~necrosis, np.zeros_like(core)


def _label(s, t, edema, necrosis, solid, et):
    """Write the BraTS labels into ``s`` (edema only where nothing is labelled yet) and the
    tumour tissue classes into ``t``."""
    s[edema & (s == 0)] = 2
    s[necrosis | solid] = 1
    s[et] = 4
    t[necrosis] = NECROSIS
    t[solid] = SOLID
    t[et] = ET


def _edema_weight(e_field, envelope, excluded):
    """Edema appearance: strongest near the core, fading towards the labelled border
    (e_field = 1) and continuing faintly just beyond it, where annotators stopped; 0 on
    ``excluded`` (core, fluid, outside the brain)."""
    weight = np.clip((np.float32(1.12) - e_field) / np.float32(0.4), 0.0, 1.0)
    np.maximum(weight, np.float32(0.55) * envelope, out=weight)
    weight[excluded] = 0.0
    return weight


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1e-8)."""
    p = min(max(p, 1e-12), 1 - 1e-12)
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01, -1.328068155288572e01)
    cc = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    if p < 0.02425:
        qq = math.sqrt(-2 * math.log(p))
        return (((((cc[0] * qq + cc[1]) * qq + cc[2]) * qq + cc[3]) * qq + cc[4]) * qq + cc[5]) / ((((d[0] * qq + d[1]) * qq + d[2]) * qq + d[3]) * qq + 1)
    if p > 1 - 0.02425:
        return -_normal_quantile(1 - p)
    qq = p - 0.5
    rr = qq * qq
    return (((((a[0] * rr + a[1]) * rr + a[2]) * rr + a[3]) * rr + a[4]) * rr + a[5]) * qq / (((((b[0] * rr + b[1]) * rr + b[2]) * rr + b[3]) * rr + b[4]) * rr + 1)
