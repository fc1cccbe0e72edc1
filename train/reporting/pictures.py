"""Validation slices drawn with their ground truth and prediction: the report's picture and the
trackers' overlay."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

CLASS_COLOURS = {1: ("NEC/NET", "#e41a1c"), 2: ("ED", "#4daf4a"), 3: ("ET", "#ffd92f")}
DISPLAY_CHANNELS = ("flair", "t1ce")
"""The background image of the slice pictures: the first of these the shards hold."""


@dataclass
class ShownSlice:
    """One patient's slice chosen for the picture."""

    role: str  # best / median / worst
    patient: str
    dice: float  # mean patient Dice over NEC/NET, ED, ET (shard grid)
    slice_index: int  # index along the source volume's third axis
    image: np.ndarray  # (H, W) display channel
    truth: np.ndarray  # (H, W) label map 0..3
    pred: np.ndarray  # (H, W) label map 0..3
    channel: str


def plot_slices(shown: list[ShownSlice]) -> Any:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cmap = plt.get_cmap("gray").with_extremes(bad="black")
    fig, axes = plt.subplots(len(shown), 2, figsize=(8, 4 * len(shown)), squeeze=False)
    for row, item in zip(axes, shown):
        background = np.ma.masked_equal(item.image.T, 0.0)  # outside the brain (stored as exactly 0)
        brain = item.image[item.image != 0]
        low, high = (np.percentile(brain, (1, 99)) if brain.size else (0.0, 1.0))
        for ax, labels, what in zip(row, (item.truth, item.pred), ("ground truth", "prediction")):
            ax.imshow(background, cmap=cmap, origin="lower", interpolation="nearest", vmin=low, vmax=high)
            for value, (_, colour) in CLASS_COLOURS.items():
                mask = (labels == value).astype(float)
                if mask.any():
                    ax.contour(mask.T, levels=[0.5], colors=[colour], linewidths=1.2, origin="lower")
            ax.set_title(f"{item.role}: {item.patient}, slice {item.slice_index}\n{what} "
                         f"(patient Dice {item.dice:.3f})", fontsize=9)
            ax.set_axis_off()
    handles = [Line2D([0], [0], color=colour, lw=2, label=name) for name, colour in CLASS_COLOURS.values()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"Validation slices ({shown[0].channel}), best / median / worst patient by mean class Dice")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def png_bytes(figure: Any) -> bytes:
    """A figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(figure)
    return buffer.getvalue()


__all__ = ["CLASS_COLOURS", "DISPLAY_CHANNELS", "ShownSlice", "plot_slices", "png_bytes"]
