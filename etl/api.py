"""`etl synth` and `etl build-shards` as Python functions, for notebooks and scripts.

    from etl import api
    api.synth("data/synth", patients=6, shape=(48, 48, 24))
    summary = api.build_shards("data/synth", "shards/", size=64, workers=0)
    summary.digest, summary.content["splits"]

The commands are these functions behind a command line (`etl.cli` parses the flags and prints
the summary), so a call does exactly what the command does: the same checks, the same output
folder, the same resume of an interrupted build. A problem is raised as the command's one line,
a `shards_spec.errors.ToolError` subclass (`str(error)` is `path: problem`); nothing is printed
unless `progress=True` (the command's progress bar and log lines, on stderr) or a `Reporter`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards_spec.errors import ToolError

from .build import BuildOptions, BuildSummary, Reporter, build_shards as _run_build

__all__ = ["BuildOptions", "BuildSummary", "ProgressReporter", "Reporter", "SynthSummary", "build_shards", "synth"]


@dataclass
class SynthSummary:
    """What `synth` left in `out`: `patients` in all, `added` of them by this call."""

    out: Path
    layout: str
    shape: tuple[int, int, int]
    patients: int
    added: int
    seconds: float


def synth(out: str | Path, *, patients: int = 10, layout: str = "brats2020",
          shape: tuple[int, int, int] = (240, 240, 155), seed: int = 0, profile: str = "default",
          progress: bool = False) -> SynthSummary:
    """Write (or complete) a synthetic BraTS-like dataset in a release layout, as `etl synth`.

    The same call again adds nothing; more `patients` adds the missing ones. A folder holding
    other files, or a dataset made with other options, is refused (`ToolError`)."""
    from .synth import LAYOUTS, check_arguments, synthesize
    from .synth.folder import prepare

    out = Path(out)
    if layout not in LAYOUTS:
        raise ToolError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if isinstance(patients, int) and patients < 1:
        raise ToolError(f"--patients must be at least 1, got {patients}")
    try:
        check_arguments(patients, layout, shape, seed, profile=profile)
    except ValueError as exc:  # e.g. a shape below the phantom's minimum
        raise ToolError(f"--{str(exc).split()[0]}: {exc}") from None
    dims = tuple(int(v) for v in shape)
    started = time.time()
    total, had = prepare(out, layout=layout, shape=dims, seed=seed, patients=patients, profile=profile)
    if total > had:
        with _bar(progress, "synthesising", total) as advance:
            synthesize(out, patients=total, layout=layout, shape=dims, seed=seed, profile=profile,
                       progress=lambda *_a, **_k: advance())
    return SynthSummary(out, layout, dims, total, total - had, time.time() - started)  # type: ignore[arg-type]


def build_shards(src: str | Path, out: str | Path, *, progress: bool | Reporter = False,
                 **options: Any) -> BuildSummary:
    """Build (or resume, or confirm) the shard folder `out` from the source folder `src`, as
    `etl build-shards`; `options` are `BuildOptions` fields (`format`, `size`, `channels`,
    `split`, `folds`, `seed`, `workers` (0: no Dask), `norm`, `patients_per_shard`, `overwrite`, ...).

    Returns the `BuildSummary`: `action` (built, resumed, repaired, up to date), the manifest's
    `content` and `provenance`, `digest`, shard counts, warnings. `progress=True` draws the
    command's progress bar on stderr; a `Reporter` receives the log lines and progress instead."""
    known = {f.name for f in dataclasses.fields(BuildOptions)} - {"src", "out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"build_shards() got unknown option(s) {', '.join(unknown)}; "
                        f"the options are {', '.join(sorted(known))}")
    if "channels" in options:  # a list or a comma-separated string, as --modalities takes it
        channels = options["channels"]
        options["channels"] = tuple(c.strip() for c in channels.split(",")) if isinstance(channels, str) \
            else tuple(channels)
    reporter = ProgressReporter() if progress is True else (progress or None)
    return _run_build(BuildOptions(src=Path(src), out=Path(out), **options), reporter)


class ProgressReporter(Reporter):
    """The commands' progress bar and log lines on stderr for `build_shards` (and, counting cases,
    `export_nnunet`). The bar counts the shards (cases) this run builds (kept ones are said in a
    line), so its rate and time left are those of the work still to do."""

    def __init__(self, title: str = "shard") -> None:
        from rich.console import Console

        self.console = Console(stderr=True, soft_wrap=True)
        self.title = title
        self.bar: Any = None
        self.step: Any = None

    def log(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def start(self, total: int, kept: int) -> None:
        from shards_spec.progress import Progress

        if kept:
            self.log(f"keeping {kept} complete {self.title}(s) of {total}")
        self.bar = Progress(self.console, f"{self.title}s", total - kept, transient=False)
        self.step = self.bar.__enter__()

    def advance(self, result: dict) -> None:
        if self.step is not None:
            self.step()

    def finish(self) -> None:  # called once on success and again on the way out: idempotent
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = self.step = None


def _bar(progress: bool, title: str, total: int) -> Any:
    """The project's progress bar on stderr when `progress`, else a context that counts nothing."""
    import contextlib

    from shards_spec.progress import Progress

    if progress:
        return Progress(None, title, total, transient=False)
    return contextlib.nullcontext(lambda *_a, **_k: None)
