"""Streaming 2D U-Net training on BraTS slice shards: the `train` command and its Python API.

`import train` loads nothing heavy; `train.api` (train, resume, evaluate, Predictor, load_model)
is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["api"]


def __getattr__(name: str) -> Any:
    if name == "api":
        return importlib.import_module(".api", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
