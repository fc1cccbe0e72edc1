"""Optional extras: import a package that only one feature needs, or say in one line which extra
to install (`pip install 'brats-shards[export]'`), instead of an ImportError traceback.

The extras are declared in pyproject.toml: `export` (onnx, onnxruntime, onnxscript,
safetensors), `tensorboard`, `mlflow`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from shards_spec.errors import ToolError


class MissingExtraError(ToolError):
    """A feature whose optional dependencies are not installed."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or raise one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        raise MissingExtraError(f"{feature} needs the optional extra [{extra}] ({missing} is not installed): "
                                f"pip install 'brats-shards[{extra}]'") from None


__all__ = ["MissingExtraError", "require"]
