"""One synthetic glioma patient: draw its parameters, then render its four MRI volumes and labels.

Sampling is separate from rendering (as in TorchIO and MONAI): ``draw_patient(rng)`` turns a
seeded generator into a :class:`PatientParams` (plain numbers, independent of the grid), and
``render(params, shape)`` is a deterministic function of those numbers and the grid, so the same
patient can be rendered at 240x240x155 or at a tiny test size and looks the same, only coarser.

Geometry is described in "template millimetres": the 240x240x155 mm field of view of the BraTS
(SRI24) template.  A grid of another shape maps onto the same field of view, so the brain and the
tumour scale with the grid.  Axis 0 is left-right, axis 1 anterior-posterior, axis 2
inferior-superior (axial slices along axis 2, as in BraTS).

Rendering recipe (each step a few vectorised numpy passes over the brain's bounding box):

1. Brain: an ellipsoid, narrower at the front and flatter underneath, its surface perturbed by a
   smooth random field; zero outside (skull-stripped, as BraTS).
2. Tissue classes inside: white matter (WM); grey matter (GM) as a cortical ribbon plus gyri
   folded by a random field, with sulcal CSF between them and an interhemispheric fissure; deep
   grey nuclei; two banana-shaped lateral ventricles and a third ventricle (CSF), choroid plexus,
   small cortical vessels; unlabelled distractors: white-matter hyperintensities and
   periventricular caps (bright on FLAIR/T2 but not tumour, as in real older patients).
3. Tumour: 1 or 2 lesions. Each has an edema envelope (perturbed, rotated ellipsoid plus smooth
   noise, spreading further in WM than in GM, not into CSF), a tumour core inside it that
   enhances as an irregular rim (label ET) around a necrotic centre (label NCR/NET) with
   non-enhancing patches, or, for non-enhancing (mostly LGG-like) tumours, a solid core labelled
   NCR/NET with an optional fluid cyst.  The lesion pushes the ventricles and deep nuclei away
   (mass effect).
4. Intensities: a per-class contrast table per modality (T1: WM > GM > CSF; T1ce: as T1 with
   bright enhancing rim, vessels and choroid; T2: CSF brightest, GM > WM, edema and necrosis
   bright; FLAIR: CSF suppressed, edema bright), jittered per patient, with a per-modality gamma
   (scanner contrast), textured by smooth fields shared between modalities, edema blended into
   the underlying tissue with a strength fading towards its border (and a faint unlabelled tail
   beyond it, so the border is not a free give-away), partial-volume blur, a smooth
   multiplicative bias field, Gaussian noise (magnitude taken, i.e. Rician-like), optional
   thick-slice acquisition resampled to 1 mm, a per-site and per-patient global scale and
   offset, then stored as int16 (roughly 0..3000) with exactly 0 outside the brain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from etl.synth.fields import blur3, box_around, cosine_profile, inner_box, open_grid, outer_box, smooth_field, thick_slices, tight_box
from etl.synth.tissue import CHOROID, CSF, DGM, GM, N_CLASSES, VESSEL, WM, WMH
from etl.synth.tumour import Lesion, displacement, draw_lesion, paint_lesion
from etl.synth.profiles import PROFILES, Profile

MODALITIES = ("t1", "t1ce", "t2", "flair")
REF_SHAPE = (240, 240, 155)


# Relative signal per class and modality (WM on T1 = 1); each modality is rescaled separately.
# Order: BG, WM, GM, DGM, CSF, CHOROID, VESSEL, ET, NECROSIS, SOLID (non-enhancing tumour), WMH.
# BG is what surrounds the brain before skull-stripping (CSF-like), so blur at the brain surface
# mixes in CSF, not zero; it is masked to 0 afterwards.
BASE_CONTRAST = {
    "t1": (0.25, 1.00, 0.72, 0.80, 0.28, 0.55, 0.80, 0.78, 0.40, 0.62, 0.85),
    "t1ce": (0.27, 1.00, 0.74, 0.82, 0.30, 1.25, 1.45, 1.70, 0.42, 0.70, 0.87),
    "t2": (1.60, 0.55, 0.80, 0.70, 2.00, 1.20, 0.35, 1.05, 1.75, 1.30, 1.20),
    "flair": (0.20, 0.72, 0.88, 0.80, 0.22, 0.45, 0.50, 1.15, 0.85, 1.25, 1.35),
}
EDEMA_CONTRAST = {"t1": 0.80, "t1ce": 0.82, "t2": 1.40, "flair": 1.45}
# Relative texture amplitude per class: tumour classes are more heterogeneous than normal tissue.
BASE_TEXTURE = (0.0, 0.04, 0.05, 0.05, 0.05, 0.15, 0.10, 0.18, 0.25, 0.15, 0.10)
EDEMA_TEXTURE = 0.12
# Scanner units of WM per modality at four simulated acquisition sites.
SITE_SCALE = {
    "t1": (380.0, 560.0, 820.0, 1150.0),
    "t1ce": (420.0, 600.0, 760.0, 1050.0),
    "t2": (260.0, 420.0, 600.0, 820.0),
    "flair": (330.0, 480.0, 700.0, 950.0),
}


@dataclass(frozen=True)
class ModalityParams:
    contrast: tuple[float, ...]  # per tissue class, after patient jitter
    edema: float
    texture: tuple[float, ...]
    edema_texture: float
    texture_angle: float  # mixes the two shared texture fields
    gamma: float
    scale: float  # scanner units of WM
    offset: float  # fraction of scale, added inside the brain
    noise: float  # noise sigma, fraction of WM
    bias: float  # log-amplitude of the bias field
    bias_seed: int
    thick_mm: float  # acquired slice thickness (0: native 1 mm)
    blur: float  # 3-tap partial-volume weight


@dataclass(frozen=True)
class PatientParams:
    grade: str  # "HGG" or "LGG"
    site: int
    brain_centre: tuple[float, float, float]
    brain_axes: tuple[float, float, float]
    taper: float  # frontal narrowing
    boundary_roughness: float
    cortex_mm: float
    gyral_depth_mm: float
    fold_corr_mm: float
    sulcal_width: float  # threshold on the fold field: larger = wider sulci (atrophy)
    ventricle_scale: float
    periventricular_caps: float
    wmh: tuple[tuple[tuple[float, float, float], float], ...]  # (centre mm, radius mm)
    lesions: tuple[Lesion, ...]
    modalities: dict[str, ModalityParams]
    field_seed: int


def _draw_modality(rng, name: str, site: int, profile: Profile = PROFILES["default"]) -> ModalityParams:
    base = np.asarray(BASE_CONTRAST[name])
    jitter = np.exp(rng.normal(0.0, profile.contrast_jitter, N_CLASSES))
    thick_p = {"t1": 0.3, "t1ce": 0.2, "t2": 0.5, "flair": 0.55}[name]
    return ModalityParams(
        contrast=tuple(float(v) for v in base * jitter),
        edema=float(EDEMA_CONTRAST[name] * np.exp(rng.normal(0.0, 0.07))),
        texture=tuple(float(v) for v in np.asarray(BASE_TEXTURE) * rng.uniform(0.7, 1.5)),
        edema_texture=float(EDEMA_TEXTURE * rng.uniform(0.7, 1.5)),
        texture_angle=float(rng.uniform(0.0, 2.0 * math.pi)),
        gamma=float(rng.uniform(0.85, 1.15)),
        scale=float(SITE_SCALE[name][site] * np.exp(rng.normal(0.0, 0.2))),
        offset=float(rng.uniform(-0.03, 0.08)),
        noise=float(rng.uniform(*profile.noise)),
        bias=float(rng.uniform(*profile.bias)),
        bias_seed=int(rng.integers(2**31)),
        thick_mm=float(rng.uniform(3.0, 6.0)) if rng.uniform() < thick_p else 0.0,
        blur=float(rng.uniform(0.06, 0.2)),
    )


def draw_patient(rng: np.random.Generator, profile: Profile = PROFILES["default"]) -> PatientParams:
    """Draw every random choice of one patient (the rendering itself is deterministic), from the
    ranges of `profile` (`etl.synth.profiles`; the same draws in the same order for every profile)."""
    grade = "HGG" if rng.uniform() < profile.hgg_fraction else "LGG"
    site = int(rng.integers(len(SITE_SCALE["t1"])))
    centre = (120.0 + rng.normal(0, 2.5), 122.0 + rng.normal(0, 3.5), 78.0 + rng.normal(0, 3.0))
    axes = (rng.uniform(63.0, 72.0), rng.uniform(80.0, 90.0), rng.uniform(58.0, 65.0))
    n_lesions = 2 if rng.uniform() < profile.second_lesion else 1
    lesions = [draw_lesion(rng, grade, centre, axes, profile.lesion_mm, profile)]
    for _ in range(n_lesions - 1):
        lesions.append(draw_lesion(rng, grade, centre, axes, profile.satellite_mm, profile))
    n_wmh = int(rng.integers(0, 5))
    wmh = []
    for _ in range(n_wmh):
        p = np.array([rng.choice((-1, 1)) * rng.uniform(0.15, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.0, 0.45)])
        wmh.append((tuple(float(v) for v in np.asarray(centre) + p * np.asarray(axes)), float(rng.uniform(2.0, 5.0))))
    return PatientParams(
        grade=grade,
        site=site,
        brain_centre=tuple(float(v) for v in centre),
        brain_axes=tuple(float(v) for v in axes),
        taper=float(rng.uniform(0.04, 0.1)),
        boundary_roughness=float(rng.uniform(0.025, 0.05)),
        cortex_mm=float(rng.uniform(2.3, 3.2)),
        gyral_depth_mm=float(rng.uniform(12.0, 19.0)),
        fold_corr_mm=float(rng.uniform(6.0, 9.0)),
        sulcal_width=float(rng.uniform(0.07, 0.2)),
        ventricle_scale=float(rng.uniform(0.75, 1.45)),
        periventricular_caps=0.0 if rng.uniform() < 0.5 else float(rng.uniform(0.1, 0.3)),
        wmh=tuple(wmh),
        lesions=tuple(lesions),
        modalities={m: _draw_modality(rng, m, site, profile) for m in MODALITIES},
        field_seed=int(rng.integers(2**63)),
    )


# --------------------------------------------------------------------------------------- render


@dataclass
class Rendered:
    images: dict[str, np.ndarray]  # int16 (H, W, D) per modality
    seg: np.ndarray  # uint8 (H, W, D), BraTS 2020 labels 0, 1 (NCR/NET), 2 (ED), 4 (ET)
    brain: np.ndarray  # bool (H, W, D)
    tissue: np.ndarray  # uint8 (H, W, D) phantom tissue classes (BG, WM, ... WMH), for tests


def render(params: PatientParams, shape: tuple[int, int, int]) -> Rendered:
    """Render ``params`` on a grid of ``shape`` covering the 240x240x155 mm template.

    The steps draw from one generator seeded by ``params.field_seed``, in this order (the order
    is part of the output): the brain's surface field, the tissue fields, each lesion's fields.
    Each modality then draws its bias field and noise from its own ``bias_seed``.
    """
    rng = np.random.default_rng(params.field_seed)
    spacing = tuple(r / n for r, n in zip(REF_SHAPE, shape))
    coords = [(np.arange(n, dtype=np.float64) + 0.5) * sp for n, sp in zip(shape, spacing)]
    crop, brain, f_low, depth = _brain(params, rng, coords, spacing, shape)
    tissue, tex_a, tex_b = _tissue_classes(params, rng, brain, f_low, depth, coords, crop, spacing, shape)
    del f_low, depth  # only the tissue classes read them: free the memory before the images
    seg = np.zeros(_box_shape(crop), dtype=np.uint8)
    edema_maps = [
        paint_lesion(lesion, rng, tissue, seg, brain, coords, crop, spacing, shape) for lesion in params.lesions
    ]
    outside = ~brain
    images = {
        name: _modality_image(params.modalities[name], tissue, tex_a, tex_b, edema_maps, outside, crop, spacing, shape)
        for name in MODALITIES
    }
    return Rendered(images=images, seg=_paste(seg, crop, shape, np.uint8), brain=_paste(brain, crop, shape, bool),
                    tissue=_paste(tissue, crop, shape, np.uint8))


def _box_shape(box: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


def _paste(part: np.ndarray, crop: tuple[slice, ...], shape: tuple[int, int, int], dtype) -> np.ndarray:
    """``part`` (computed on ``crop``) in a zero grid of ``shape``, cast to ``dtype``."""
    full = np.zeros(shape, dtype=dtype)
    full[crop] = part
    return full


def _brain(params, rng, coords, spacing, shape):
    """Step 1: the brain mask and the depth below its surface; returns (crop, brain, f_low, depth).

    The ellipsoid (narrower at the front, flatter underneath, its surface perturbed by the smooth
    field ``f_low``) is computed on a loose box around it (the boundary noise is clipped so the
    brain cannot leave it); ``crop`` is the brain's bounding box with one voxel of margin (about
    half the voxels of the field of view), on which everything else is computed and which is
    pasted into zeros at the end. ``depth`` is in mm below the surface (radially), < 0 outside.
    """
    c = np.asarray(params.brain_centre)
    a = np.asarray(params.brain_axes)
    loose = box_around(c - 1.22 * a, c + 1.22 * a, spacing, shape)
    x, y, z = open_grid(coords, loose)
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    f_low = np.clip(smooth_field(rng, _box_shape(loose), 30.0, spacing), -3.0, 3.0)
    ax0 = a[0] * (1.0 - params.taper * (dy / a[1]))  # narrower at the front (low axis-1 index)
    ax2 = np.where(dz < 0, 0.85 * a[2], a[2]).astype(np.float32)  # flatter underneath
    r = np.sqrt((dx / ax0) ** 2 + (dy / a[1]) ** 2 + (dz / ax2) ** 2)
    r *= 1.0 + params.boundary_roughness * f_low
    brain = r < 1.0
    tight = tight_box(brain, margin=1)
    crop = tuple(slice(lo.start + t.start, lo.start + t.stop) for lo, t in zip(loose, tight))
    depth = (1.0 - r[tight]) * np.float32(float(a.mean()))
    return crop, np.ascontiguousarray(brain[tight]), np.ascontiguousarray(f_low[tight]), depth


def _tissue_classes(params, rng, brain, f_low, depth, coords, crop, spacing, shape):
    """Step 2: the tissue class of every voxel of the crop; returns (tissue, tex_a, tex_b), the
    last two the texture fields the intensities share. White matter first, then each structure
    painted over it: cortex and sulci, the fissure, the central structures, vessels, WMH."""
    cshape = _box_shape(crop)
    fold = smooth_field(rng, cshape, params.fold_corr_mm, spacing)
    tex_a = smooth_field(rng, cshape, 4.0, spacing)
    tex_b = smooth_field(rng, cshape, 12.0, spacing)
    vox = max(spacing)
    cortex = max(params.cortex_mm, 0.9 * vox)
    tissue = brain.astype(np.uint8)  # WM == 1
    _cortex_and_sulci(params, tissue, brain, depth, fold, cortex, vox)
    _fissure(params, tissue, brain, depth, coords, crop, spacing, cortex)
    _central_structures(params, tissue, brain, f_low, fold, coords, crop, spacing)
    _vessels(tissue, brain, tex_a, tex_b)
    _white_matter_hyperintensities(params, tissue, fold, coords, crop, spacing, shape)
    return tissue, tex_a, tex_b


def _cortex_and_sulci(params, tissue, brain, depth, fold, cortex, vox):
    """Grey matter: a cortical ribbon plus gyri folded by ``fold``, with sulcal CSF between them."""
    gyral = max(params.gyral_depth_mm, 2.0 * vox)
    afold = np.abs(fold)
    gm = (depth < cortex) | ((afold < 0.7) & (depth < gyral + cortex))
    np.putmask(tissue, gm & brain, GM)
    np.putmask(tissue, (afold < params.sulcal_width) & (depth < gyral) & brain, CSF)


def _vessels(tissue, brain, tex_a, tex_b):
    """Small cortical vessels: thin tubes where both texture fields cross zero, outside CSF."""
    vessels = (np.abs(tex_a) < 0.035) & (np.abs(tex_b) < 0.08) & brain & (tissue != CSF)
    np.putmask(tissue, vessels, VESSEL)


def _white_matter_hyperintensities(params, tissue, fold, coords, crop, spacing, shape):
    """Unlabelled WMH: small blobs, roughened by ``fold``, painted over white matter only."""
    for centre, radius in params.wmh:
        box = inner_box(crop, box_around(np.asarray(centre) - 2 * radius, np.asarray(centre) + 2 * radius, spacing, shape))
        bx, by, bz = open_grid(coords, outer_box(crop, box))
        e = ((bx - centre[0]) ** 2 + (by - centre[1]) ** 2 + (bz - centre[2]) ** 2) / radius**2 + 0.3 * fold[box]
        t = tissue[box]
        t[(e < 1.0) & (t == WM)] = WMH


def _modality_image(m: ModalityParams, tissue, tex_a, tex_b, edema_maps, outside, crop, spacing, shape) -> np.ndarray:
    """Step 4, one modality: the int16 image of the full grid, 0 outside the brain. Its bias
    field and noise come from its own generator (``m.bias_seed``), the bias field first."""
    mrng = np.random.default_rng(m.bias_seed)
    img = _tissue_signal(m, tissue, tex_a, tex_b, edema_maps)
    img = blur3(img, m.blur)
    _apply_bias_field(img, m, mrng, crop, shape)
    _add_magnitude_noise(img, m, mrng)
    img = _scanner_output(img, m, outside, spacing)
    return _paste(img, crop, shape, np.int16)


def _tissue_signal(m: ModalityParams, tissue, tex_a, tex_b, edema_maps) -> np.ndarray:
    """float32 signal of the crop: the class contrast (with the modality's gamma) textured by the
    mix of the shared fields, then each lesion's edema blended in (``_blend_edema``)."""
    lut = (np.asarray(m.contrast, dtype=np.float64) ** m.gamma).astype(np.float32)
    amp = np.asarray(m.texture, dtype=np.float32)
    tex = tex_a * np.float32(math.cos(m.texture_angle))
    tex += tex_b * np.float32(math.sin(m.texture_angle))
    img = amp[tissue]
    img *= tex
    img += 1.0
    img *= lut[tissue]
    _blend_edema(img, m, tex, edema_maps)
    return img


def _blend_edema(img, m: ModalityParams, tex, edema_maps) -> None:
    """Pull ``img`` towards the textured edema signal by each lesion's blend weight (in place)."""
    edema_value = np.float32(m.edema**m.gamma)
    for box, weight in edema_maps:
        target = edema_value * (1.0 + np.float32(m.edema_texture) * tex[box])
        target -= img[box]
        target *= weight
        img[box] += target


def _apply_bias_field(img, m: ModalityParams, mrng, crop, shape) -> None:
    """Smooth multiplicative bias field (receive-coil sensitivity), separable, with the global
    scale folded in (in place)."""
    p0, p1, p2 = (cosine_profile(mrng, n)[s] for n, s in zip(shape, crop))
    cross = np.float32(mrng.normal(0.0, 0.5))
    bias_xy = np.exp(np.float32(m.bias) * (p0[:, None] + p1[None, :] + cross * p0[:, None] * p1[None, :]))
    bias_xy *= np.float32(m.scale)
    img *= bias_xy[:, :, None]
    img *= np.exp(np.float32(m.bias) * p2)[None, None, :]


def _add_magnitude_noise(img, m: ModalityParams, mrng) -> None:
    """Gaussian noise, then the magnitude: Rician-like where the signal is low (in place)."""
    noise = mrng.standard_normal(img.shape, dtype=np.float32)
    noise *= np.float32(m.noise * m.scale)
    img += noise
    np.abs(img, out=img)


def _scanner_output(img, m: ModalityParams, outside, spacing) -> np.ndarray:
    """Optional thick-slice acquisition, the scanner's offset, rounded to whole units in
    1..32000, and exactly 0 outside the brain."""
    factor = int(round(m.thick_mm / spacing[2])) if m.thick_mm else 0
    if factor >= 2:
        img = thick_slices(img, factor, axis=2)
    img += np.float32(m.offset * m.scale)
    np.clip(img, 1.0, 32000.0, out=img)
    np.rint(img, out=img)
    np.putmask(img, outside, 0.0)
    return img


def _fissure(params, tissue, brain, depth, coords, crop, spacing, cortex):
    """Interhemispheric fissure: a CSF sheet at the midline, lined by grey matter."""
    c = params.brain_centre
    a = params.brain_axes
    half = max(1.0, 0.5 * spacing[0])
    reach = half + cortex + 2.0 + spacing[0]
    big = 1e9
    box = inner_box(crop, box_around((c[0] - reach, -big, -big), (c[0] + reach, big, big), spacing, [len(v) for v in coords]))
    fx, fy, fz = open_grid(coords, outer_box(crop, box))
    v = (fy - c[1]) / a[1]
    w = (fz - c[2]) / a[2]
    wobble = 2.0 * np.sin(3.0 * v + 40.0 * params.taper)  # the falx is not a perfect plane
    dist = np.abs(fx - c[0] - wobble)
    # Above the corpus callosum, and all the way down at the frontal and occipital poles.
    region = ((w > -0.05) | (np.abs(v) > 0.55)) & (depth[box] < 0.45 * float(np.mean(a))) & brain[box]
    t = tissue[box]
    t[region & (dist < half + cortex) & (t != CSF)] = GM
    t[region & (dist < half)] = CSF


def _central_structures(params, tissue, brain, f_low, fold, coords, crop, spacing):
    """Deep grey nuclei, lateral and third ventricles, choroid plexus, periventricular caps."""
    c = params.brain_centre
    a = params.brain_axes
    vs = params.ventricle_scale
    grid_shape = [len(v) for v in coords]
    m = 15.0  # room for the mass effect
    lo = (c[0] - 0.5 * a[0] - m, c[1] - 0.65 * a[1] - m, c[2] - 0.55 * a[2] - m)
    hi = (c[0] + 0.5 * a[0] + m, c[1] + 0.65 * a[1] + m, c[2] + 0.6 * a[2] + m)
    box = inner_box(crop, box_around(lo, hi, spacing, grid_shape))
    gx, gy, gz = open_grid(coords, outer_box(crop, box))
    X, Y, Z = displacement(params, *np.broadcast_arrays(gx, gy, gz))
    t = tissue[box]
    inside = brain[box]
    noise = 0.2 * f_low[box]
    # Deep grey nuclei (thalamus, basal ganglia), lateral to the ventricles.
    for side in (-1.0, 1.0):
        e = (
            ((X - (c[0] + side * 0.26 * a[0])) / (0.11 * a[0])) ** 2
            + ((Y - (c[1] + 0.02 * a[1])) / (0.22 * a[1])) ** 2
            + ((Z - (c[2] - 0.02 * a[2])) / (0.15 * a[2])) ** 2
            + noise
        )
        t[(e < 1.0) & (t == WM)] = DGM
    # Lateral ventricles: bananas whose horns bend downwards at both ends.
    vent = np.zeros(t.shape, dtype=bool)
    caps = np.zeros(t.shape, dtype=bool)
    for side in (-1.0, 1.0):
        vv = (Y - (c[1] - 0.03 * a[1])) / (0.40 * a[1] * (0.9 + 0.1 * vs))
        vu = (X - (c[0] + side * (0.04 + 0.06 * vs) * a[0])) / (0.075 * a[0] * vs)
        vw = (Z - (c[2] + 0.14 * a[2]) + 0.3 * a[2] * vv * vv) / (0.14 * a[2] * vs)
        e = vu * vu + vv * vv + vw * vw + noise
        vent |= e < 1.0
        if params.periventricular_caps > 0:
            caps |= (e < 1.0 + 3.0 * params.periventricular_caps) & (np.abs(vv) > 0.75)
    half3 = max(1.2, 0.5 * spacing[0])
    w = (Z - c[2]) / a[2]
    third = (np.abs(X - c[0]) < half3) & (np.abs((Y - c[1]) / a[1]) < 0.2) & (w > -0.3) & (w < 0.08)
    t[caps & inside & (t == WM)] = WMH
    t[(vent | third) & inside] = CSF
    t[vent & inside & (((Y - c[1]) / a[1]) > 0.2) & (fold[box] > 0.9)] = CHOROID


