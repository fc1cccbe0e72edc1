"""What goes into a `Trainer` and what comes out: the `Setup` that `train.fit.run` resolves, the
`Hooks` a test or an embedding program injects, the `Callback`s told about the run (trackers, the
end-of-run report), and the `Result`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..runtime import distributed
from .budget import StopSignal


class Callback(Protocol):
    """Something told about the run as it goes (experiment trackers); every method optional."""

    def on_fit_start(self, trainer: Any) -> None: ...
    def on_epoch_end(self, trainer: Any, row: dict) -> None: ...
    def on_fit_end(self, trainer: Any, result: "Result") -> None: ...


@dataclass
class Hooks:
    """Injection points for tests and embedding: the clock the budget and timings read, a call
    after every training step (`after_step(epoch, step, stop)`, e.g. to deliver a signal), where
    the progress bar and summaries go, and callbacks told about every epoch (rank 0 only)."""

    clock: Callable[[], float] = time.monotonic
    after_step: Callable[[int, int, StopSignal], None] | None = None
    console: Any = None
    callbacks: list = field(default_factory=list)


@dataclass
class Result:
    """How a run ended: `exit_code` 0 for a completed or budget-stopped run, 128 + signal.
    `trained`: this call trained to its end (its epochs, the time budget or early stopping), so
    its checkpoints are final (what the end-of-run report waits for)."""

    run_dir: Path
    epochs_done: int
    exit_code: int
    message: str
    history: list[dict] = field(default_factory=list)
    trained: bool = False


@dataclass
class Setup:
    """Everything `train.fit.run` resolved before training: what to train, on what, where."""

    config: Any  # train.config.options.Config
    preset: str
    overrides: dict
    manifest: Any
    train_ds: Any
    val_ds: Any
    train_splits: list[str]
    dist: distributed.Dist
    device: Any
    console: Any
    hooks: Hooks
    restored: dict | None = None
    force: bool = False
    storage_options: dict | None = None


__all__ = ["Callback", "Hooks", "Result", "Setup"]
