"""The shard contract `brats-slices/1` (see SPEC.md), implemented once for the ETL and the trainer."""

from .errors import SourceError, SpecError, ToolError
from .manifest import MANIFEST_NAME, PLAN_NAME, SPEC_VERSION, Manifest

__all__ = ["SPEC_VERSION", "MANIFEST_NAME", "PLAN_NAME", "Manifest", "ToolError", "SpecError", "SourceError"]
