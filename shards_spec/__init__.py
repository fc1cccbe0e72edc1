"""The shard contract `brats-slices/1` (see SPEC.md), implemented once for the ETL and the trainer."""

from typing import Any

from .errors import SourceError, SpecError, ToolError

_FROM_MANIFEST = ("SPEC_VERSION", "MANIFEST_NAME", "PLAN_NAME", "Manifest")


def __getattr__(name: str) -> Any:
    """The manifest's names, imported on first use: the command lines import light submodules
    (`errors`, `cli`) at start-up, and `--help` should not wait for numpy."""
    if name in _FROM_MANIFEST:
        from . import manifest

        return getattr(manifest, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SPEC_VERSION", "MANIFEST_NAME", "PLAN_NAME", "Manifest", "ToolError", "SpecError", "SourceError"]
