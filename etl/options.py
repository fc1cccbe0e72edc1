"""The options of `etl build-shards`, checked up front, and the part of them that decides the bytes.

Every check names the option and the allowed values, before anything is scanned or written. The
allowed values come from their one definition: formats and compressions from the writer
registry (`etl.writers`, tied to the readers' `shards_spec.formats`), normalisations from
`shards_spec.preprocess`, channels from `shards_spec.labels`, layout options from the layouts
that declare them (`etl.sources`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from shards_spec.checked_io import refuse_broken_link
from shards_spec.errors import ToolError
from shards_spec.labels import CHANNELS

from .sources.base import MAX_PATIENT_BYTES, channel_problem
from .split import SplitSpec, parse_split

MAX_SIZE = 4096


@dataclass(frozen=True)
class BuildOptions:
    """Everything `etl build-shards` takes; `plan_options` is the part that decides the bytes.

    `source_options` holds layout-specific options by name (`kaggle_channel_order`), None or
    missing meaning the layout's default; see `etl.sources.SourceLayout.options`."""

    src: Path
    out: Path
    format: str = "webdataset"
    size: int = 128
    channels: tuple[str, ...] = CHANNELS
    split: str | None = None
    folds: int | None = None
    split_file: Path | None = None  # nnU-Net's splits_final.json (etl.splits_file)
    seed: int = 0
    workers: int | None = None  # None: one per core; 0: in this process, without Dask
    scheduler: str | None = None
    norm: str = "slice"
    patients_per_shard: int = 1
    layout: str | None = None
    source_options: dict = field(default_factory=dict)
    keep_empty: bool = False
    skip_bad: bool = False
    overwrite: bool = False
    compression: str = "none"
    max_patient_bytes: int = MAX_PATIENT_BYTES
    command: tuple[str, ...] = ()

    def validate(self) -> SplitSpec:
        """Check every option up front, naming the allowed values; return the split spec."""
        from shards_spec.preprocess import NORMS

        _check_format(self.format, self.compression)
        if self.norm not in NORMS:
            raise ToolError(f"--norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if not 1 <= self.size <= MAX_SIZE:
            raise ToolError(f"--size must be between 1 and {MAX_SIZE}, got {self.size}")
        if self.patients_per_shard < 1:
            raise ToolError(f"--patients-per-shard must be at least 1, got {self.patients_per_shard}")
        if self.max_patient_bytes < 1:
            raise ToolError(f"--max-patient-memory must be positive, got {self.max_patient_bytes} bytes")
        if self.workers is not None and self.workers < 0:
            raise ToolError(f"--workers must be 0 (in this process) or more, got {self.workers}")
        problem = channel_problem(self.channels)
        if problem:
            raise ToolError(f"--modalities: {problem}")
        self.resolved_source_options()
        check_folders(self.src, self.out)
        return parse_split(self.split, self.folds, self.seed, self.split_file)

    def resolved_source_options(self, layout: str | None = None) -> dict:
        """Every layout's options with defaults filled in (validated), or those of `layout` only."""
        return resolve_source_options(self.source_options, layout)

    def plan_options(self, layout: str, split: dict) -> dict:
        """The options `plan.json` records: a re-run with other values may not keep the shards."""
        from .sources import source

        options = {
            "format": self.format,
            "size": self.size,
            "channels": list(self.channels),
            "norm": self.norm,
            "keep_empty": self.keep_empty,
            "compression": self.compression,
            "patients_per_shard": self.patients_per_shard,
            "layout": layout,
            "split": split,
        }
        options.update(source(layout).recorded_options(self.resolved_source_options(layout)))
        return options


def resolve_source_options(given: dict, layout: str | None = None) -> dict:
    """Layout options (`etl.sources.SourceLayout.options`) from `given` (None = default), validated:
    every layout's, or those of `layout` only."""
    from .sources import SOURCES

    known = {name for s in SOURCES.values() for name in s.options}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ToolError(f"no source layout takes the option(s) {', '.join(unknown)}")
    resolved = {name: s.resolve_options(given) for name, s in SOURCES.items()}
    return resolved[layout] if layout is not None else {k: v for r in resolved.values() for k, v in r.items()}


def _check_format(fmt: str, compression: str) -> None:
    from .writers import compressions, writer

    chosen = writer(fmt)
    allowed = compressions()
    if compression not in allowed:
        raise ToolError(f"--compress must be one of {', '.join(allowed)}, got {compression!r}")
    if compression not in chosen.compressions:
        raise ToolError(chosen.compression_refused or f"--compress {compression} does not apply to {fmt} shards")


def check_folders(src: Path, out: Path) -> None:
    for flag, folder in (("--src", src), ("--out", out)):
        url = as_url(folder)
        if url:
            raise ToolError(f"{flag} {url}: build-shards reads and writes folders on a file system, not fsspec URLs; "
                            "use a folder every Dask worker can reach (a shared mount), then publish the out folder "
                            "(docs/sharing.md)")
    for folder in (src, out):
        refuse_broken_link(folder)  # else resolve() raises RuntimeError on a loop
    if src.resolve() == out.resolve() or src.resolve() in out.resolve().parents:
        raise ToolError("--out must not be the source folder or inside it", out)


def as_url(folder: Path | str) -> str | None:
    """The URL a `--src`/`--out` value was meant as (`s3://b/x` arrives as Path('s3:/b/x')), or None."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$", str(folder))
    return f"{match.group(1)}://{match.group(2)}" if match else None
