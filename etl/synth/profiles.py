"""Generator settings of `etl synth --profile`: the ranges patients are drawn from.

`default` is the data every recipe choice of this project was measured on. `shifted` is a second
data set for the quality harness (bench/quality.py `--profile`), so that a recipe change is kept
only when it helps on data it was not tuned on. Its settings were chosen before any result on it
was seen and are kept fixed, each moved towards variety the real BraTS releases have: more
low-grade patients (BraTS 2020: 76 LGG of 369; low-grade tumours often without enhancement, so
more patients without ET), more multifocal tumours, a wider range of sizes (small lesions
included), necrosis from none to most of the core, rougher shapes, larger contrast differences
between patients, noisier images and stronger bias fields (the releases are not bias-corrected).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    hgg_fraction: float = 0.8  # the rest are LGG
    second_lesion: float = 0.15  # probability of a second (multifocal) lesion
    lesion_mm: tuple[float, float] = (14.0, 38.0)  # radius range (log-uniform) of the main lesion
    satellite_mm: tuple[float, float] = (8.0, 20.0)  # of a second lesion
    hgg_enhancing: float = 0.97  # probability that a high-grade lesion enhances (has ET)
    lgg_enhancing: float = 0.25
    hgg_core: tuple[float, float] = (0.38, 0.75)  # core radius / lesion radius
    no_necrosis: float = 0.15  # probability of an enhancing lesion without necrosis
    necrosis: tuple[float, float] = (0.3, 0.8)  # necrotic fraction of the core otherwise
    roughness: tuple[float, float] = (0.18, 0.35)  # amplitude of the lesion's boundary noise
    contrast_jitter: float = 0.06  # per-patient log-normal jitter of every tissue's contrast
    noise: tuple[float, float] = (0.015, 0.05)  # noise sigma, fraction of WM
    bias: tuple[float, float] = (0.04, 0.22)  # log-amplitude of the bias field


PROFILES: dict[str, Profile] = {
    "default": Profile(),
    "shifted": Profile(hgg_fraction=0.65, second_lesion=0.35, lesion_mm=(8.0, 45.0), satellite_mm=(5.0, 16.0),
                       hgg_enhancing=0.9, lgg_enhancing=0.15, hgg_core=(0.25, 0.85), no_necrosis=0.3,
                       necrosis=(0.15, 0.9), roughness=(0.25, 0.45), contrast_jitter=0.1, noise=(0.03, 0.08),
                       bias=(0.1, 0.35)),
}
"""`--profile NAME` -> its settings."""
