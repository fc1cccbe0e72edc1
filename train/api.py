"""`train run`, `evaluate` and `predict` as Python functions, for notebooks and scripts.

    from train import api
    result = api.train("shards/", "runs/v2", variant="v2", epochs=20)    # a TrainResult
    scores = api.evaluate(result.run_dir, "shards/", src="data/BraTS2021")  # the --json object
    predictor = api.Predictor(result.run_dir)                             # loaded once
    seg = predictor.predict("BraTS2021_00000/")                           # uint8 (H, W, D)
    model = api.load_model(result.run_dir)                                # torch.nn.Module, eval, CPU

The commands call these functions (`train run` -> `train`/`resume`, `train evaluate` ->
`evaluate`, `train predict` -> `Predictor`), so a call does what the command does, with the same
checks and files. A problem is raised as the command's one line, a `shards_spec.errors.ToolError`
subclass (`str(error)` is `path: problem`); nothing calls `sys.exit`, and nothing is printed
unless `console=True` (the command's output) or a `rich.console.Console` is given. Options are
the commands' flags as keyword arguments (`--batch-size 16` is `batch_size=16`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import fit
from .apply import evaluate as evaluation
from .apply.inference import load_model as load
from .apply.predict import Predictor, resolve_checkpoint
from .runfiles import rundir

__all__ = ["Predictor", "TrainResult", "evaluate", "load_model", "resume", "train"]


@dataclass
class TrainResult:
    """How a run ended: its folder, completed epochs, the best validation mean Dice (and the
    epoch it was reached at, fractional for a budget stop mid-epoch), why it stopped, and one
    metrics.csv row per validation. `exit_code` is the command's: 0 done (also a budget or early
    stop), 1 diverged, 128 + signal when stopped by SIGINT/SIGTERM (e.g. a notebook interrupt)."""

    run_dir: Path
    epochs: int
    best_score: float | None
    best_epoch: float | None
    exit_code: int
    reason: str
    history: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def best_checkpoint(self) -> Path:
        return rundir.checkpoint_path(self.run_dir, rundir.BEST)


def train(shards: str | Path | None, out: str | Path | None = None, variant: str | None = "v2", *,
          force: bool = False, storage_options: dict | None = None, callbacks: Sequence[Any] = (),
          console: Any = False, **options: Any) -> TrainResult:
    """Train a new run, as `train run`: `variant`'s preset, overridden by `options` (`epochs`,
    `batch_size`, `time_budget`, `device`, `base`, ... every `train run` flag; None is "not
    given", as for an absent flag). Without `out`, the run goes to a new
    runs/<variant>-<timestamp>; `force` replaces a run already there.

    `storage_options` go to fsspec for a shard URL (not saved with the run); `callbacks` are
    trainer callbacks (`train.reporting.tracking`); `console=True` prints the command's progress and
    summaries on stderr."""
    given = {"shards": None if shards is None else str(shards), "out": None if out is None else str(out),
             "variant": variant, **options}
    return _fit(given, resume=False, force=force, storage_options=storage_options, callbacks=callbacks,
                console=console)


def resume(run: str | Path, *, force: bool = False, storage_options: dict | None = None,
           callbacks: Sequence[Any] = (), console: Any = False, **options: Any) -> TrainResult:
    """Continue `run` from its last checkpoint, exactly, as `train run --out RUN --resume`; `options`
    may ask for more `epochs`, another `time_budget` or device (other changes need `force`)."""
    return _fit({**options, "out": str(run)}, resume=True, force=force, storage_options=storage_options,
                callbacks=callbacks, console=console)


def _fit(overrides: dict[str, Any], *, resume: bool, force: bool, storage_options: dict | None,
         callbacks: Sequence[Any], console: Any) -> TrainResult:
    hooks = fit.Hooks(console=_console(console, stderr=True), callbacks=list(callbacks))
    result = fit.run({k: v for k, v in overrides.items() if v is not None}, resume=resume, force=force,
                     storage_options=storage_options, hooks=hooks)
    best = _best_row(result.history)
    return TrainResult(run_dir=Path(result.run_dir), epochs=result.epochs_done,
                       best_score=None if best is None else best["mean_dice"],
                       best_epoch=None if best is None else best["epoch"], exit_code=result.exit_code,
                       reason=result.message, history=list(result.history))


def _best_row(history: list[dict]) -> dict | None:
    """The row best.pt holds: the first with the highest validation mean Dice (NaN counting as -1,
    as the trainer ranks them)."""
    def score(row: dict) -> float:
        value = row.get("mean_dice", math.nan)
        return -1.0 if value is None or math.isnan(value) else value

    return max(history, key=score) if history else None


def evaluate(checkpoint: str | Path | Sequence[str | Path], shards: str | Path, split: str = "val",
             src: str | Path | None = None, *, console: Any = False, **options: Any) -> dict:
    """Score a checkpoint (a run folder means its best.pt; a list, an ensemble) on `split` of
    `shards`, and with `src` (the source folder) on the native grid, as `train evaluate`. Returns
    the object `--json` writes (NaN where the JSON has null). `options`: `json_path`, `csv_path`,
    `overwrite`, `device`, `batch_size`, `workers`, `cache_dir`, `storage_options`, `lesion_wise`,
    `tta`, `min_et_voxels`. Warnings are in the result's "warnings" (and its grids'); `console=True`
    prints the command's tables (stdout) and warnings (stderr)."""

    given = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    return evaluation.main(checkpoint=[resolve_checkpoint(p) for p in given], shards=str(shards), split=split,
                           src=None if src is None else Path(src), console=_console(console), **options)


def load_model(run_or_checkpoint: str | Path, device: str = "cpu") -> Any:
    """The model of a checkpoint (a run folder means its best.pt) with its weights, a
    `torch.nn.Module` in eval mode on `device`; channels, target and preprocessing are in the
    checkpoint (`Predictor` applies them to whole volumes)."""

    return load(resolve_checkpoint(run_or_checkpoint), device).model


def _console(console: Any, stderr: bool = False) -> Any:
    """False: a console that prints nothing; True: None, for the command's own consoles; else `console`."""
    if console is False:
        from rich.console import Console

        return Console(quiet=True, stderr=stderr)
    return None if console is True else console
