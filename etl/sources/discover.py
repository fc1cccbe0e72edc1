"""Finding the data under a source folder: one breadth-first walk that every layout looks at.

Each registered layout (`etl.sources.SOURCES`) claims what it recognises: a folder that is one
patient (not descended into), or a folder holding its data files. Every entry is either looked
at or reported: an entry whose type cannot be read (permission denied, a stale network mount, a
symbolic link to itself), a folder that cannot be listed, and a folder reached a second time
through a link (a loop, or the same data twice) become problems that the scan reports like a bad
patient (fatal unless `--skip-bad`), never a silent gap. The walk is bounded in depth (the
search scope: data deeper than `MAX_DEPTH` is not looked for) and in the number of folders
listed, because people point `--src` at their home folder; reaching that bound is a problem too.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from shards_spec.errors import SourceError

from .base import SourceLayout

MAX_DEPTH = 6
"""How deep below the given root to look for patient folders or Kaggle slices."""
MAX_FOLDERS = 20_000
"""Stop descending after listing this many folders (someone passed `/`)."""


def discover(root: Path, sources: dict[str, SourceLayout]) -> tuple[dict[str, list[Path]], list[SourceError]]:
    """(layout name -> the folders it claimed under `root`, entries that could not be scanned)."""
    found: dict[str, list[Path]] = {name: [] for name in sources}
    problems: list[SourceError] = []
    seen: dict[tuple[int, int], Path] = {}
    level, listed = [root], 0
    for _ in range(MAX_DEPTH + 1):
        below: list[Path] = []
        for folder in level:
            if not _first_visit(folder, seen, problems):
                continue
            owner = next((name for name, s in sources.items() if s.is_patient_folder(folder.name)), None)
            if owner is not None:
                found[owner].append(folder)  # a patient folder: nothing to find inside
                continue
            if listed >= MAX_FOLDERS:
                problems.append(SourceError(f"not scanned: more than {MAX_FOLDERS} folders were listed below "
                                            f"{root}; point --src at the release's folder", folder))
                break
            listed += 1
            for name in _list(folder, sources, below, problems):
                found[name].append(folder)
        if not below:
            break
        level = sorted(below)
    return found, problems


def _first_visit(folder: Path, seen: dict[tuple[int, int], Path], problems: list[SourceError]) -> bool:
    """False (and a problem) when `folder` is a folder already walked, reached through a link."""
    try:
        info = folder.stat()
    except OSError as exc:
        problems.append(SourceError(f"cannot be read ({_reason(exc)})", folder))
        return False
    key = (info.st_dev, info.st_ino)
    if key in seen:
        problems.append(SourceError(f"is a link to {seen[key]}, which is scanned already (a link loop, or the same "
                                    "data twice): not scanned again", folder))
        return False
    seen[key] = folder
    return True


def _list(folder: Path, sources: dict[str, SourceLayout], below: list[Path], problems: list[SourceError]) -> list[str]:
    """Append the sub-folders of `folder` to `below`; return the layouts claiming its files."""
    holders: list[str] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()
                    if not is_dir and entry.is_symlink() and not os.path.exists(entry.path):
                        raise FileNotFoundError(errno.ENOENT, "a symbolic link to nothing", entry.path)
                except OSError as exc:
                    problems.append(SourceError(f"cannot be read ({_reason(exc)})", entry.path))
                    continue
                if is_dir:
                    below.append(Path(entry.path))
                    continue
                for name, source in sources.items():
                    if name not in holders and source.is_data_file(entry.name):
                        holders.append(name)
    except OSError as exc:
        problems.append(SourceError(f"cannot be listed ({_reason(exc)})", folder))
        return []
    return [name for name in sources if name in holders]


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop"
    return exc.strerror or str(exc)


def choose_layout(root: Path, found: dict[str, list[Path]], layout: str | None,
                  sources: dict[str, SourceLayout], problems: list[SourceError] = ()) -> str:
    """The one layout to read: `layout` if given (and found), else the only one found."""
    present = [name for name in sources if found[name]]
    unread = f"; {len(problems)} entr{'y' if len(problems) == 1 else 'ies'} could not be scanned, e.g. {problems[0]}" \
        if problems else ""
    if layout is not None:
        if layout not in sources:
            raise SourceError(f"unknown layout {layout!r}: expected one of {', '.join(sources)}")
        if not found[layout]:
            also = f" (found {', '.join(present)})" if present else ""
            raise SourceError(f"no {layout} data found within {MAX_DEPTH} folder levels{also}{unread}", root)
        return layout
    if not present:
        expected = "; ".join(s.expected for s in sources.values())
        raise SourceError(f"no BraTS data found within {MAX_DEPTH} folder levels: expected {expected}{unread}", root)
    if len(present) > 1:
        counts = ", ".join(f"{name} ({len(found[name])} folders)" for name in present)
        raise SourceError(f"holds more than one layout: {counts}; choose one with --layout", root)
    return present[0]
