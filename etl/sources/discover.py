"""Finding the data under a source folder: one breadth-first walk that every layout looks at.

Each registered layout (`etl.sources.SOURCES`) claims what it recognises: a folder that is one
patient (not descended into), or a folder holding its data files. The walk is bounded in depth
and in the number of folders listed, because people point `--src` at their home folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from shards_spec.errors import SourceError

from .base import SourceLayout

MAX_DEPTH = 6
"""How deep below the given root to look for patient folders or Kaggle slices."""
MAX_FOLDERS = 20_000
"""Stop descending after listing this many folders (someone passed `/`)."""


def discover(root: Path, sources: dict[str, SourceLayout]) -> dict[str, list[Path]]:
    """Layout name -> the folders it claimed under `root` (breadth first, sorted per level)."""
    found: dict[str, list[Path]] = {name: [] for name in sources}
    level, listed = [root], 0
    for _ in range(MAX_DEPTH + 1):
        below: list[Path] = []
        for folder in level:
            owner = next((name for name, s in sources.items() if s.is_patient_folder(folder.name)), None)
            if owner is not None:
                found[owner].append(folder)  # a patient folder: nothing to find inside
                continue
            if listed >= MAX_FOLDERS:
                continue
            listed += 1
            holders = _list(folder, sources, below)
            for name in holders:
                found[name].append(folder)
        if not below:
            break
        level = sorted(below)
    return found


def _list(folder: Path, sources: dict[str, SourceLayout], below: list[Path]) -> list[str]:
    """Append the sub-folders of `folder` to `below`; return the layouts claiming its files."""
    holders: list[str] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    below.append(Path(entry.path))
                    continue
                for name, source in sources.items():
                    if name not in holders and source.is_data_file(entry.name):
                        holders.append(name)
    except OSError:
        return []
    return [name for name in sources if name in holders]


def choose_layout(root: Path, found: dict[str, list[Path]], layout: str | None,
                  sources: dict[str, SourceLayout]) -> str:
    """The one layout to read: `layout` if given (and found), else the only one found."""
    present = [name for name in sources if found[name]]
    if layout is not None:
        if layout not in sources:
            raise SourceError(f"unknown layout {layout!r}: expected one of {', '.join(sources)}")
        if not found[layout]:
            also = f" (found {', '.join(present)})" if present else ""
            raise SourceError(f"no {layout} data found within {MAX_DEPTH} folder levels{also}", root)
        return layout
    if not present:
        expected = "; ".join(s.expected for s in sources.values())
        raise SourceError(f"no BraTS data found within {MAX_DEPTH} folder levels: expected {expected}", root)
    if len(present) > 1:
        counts = ", ".join(f"{name} ({len(found[name])} folders)" for name in present)
        raise SourceError(f"holds more than one layout: {counts}; choose one with --layout", root)
    return present[0]
