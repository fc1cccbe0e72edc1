"""The training loop as a list of named steps (nnU-Net's `run_training`, nanoGPT's loop).

    trainer = Trainer(setup)           # train.fit.run builds `setup` (config, data, device, resume)
    result = trainer.fit()

`fit` reads top to bottom: for each epoch, ask the budget, train, validate, then `end_epoch`
(scheduler -> checkpoint -> metrics.csv row -> summary line -> callbacks). A researcher changes
one step by subclassing and overriding it, never by copying the loop:

    class FocalTrainer(Trainer):
        def compute_loss(self, logits, mask):
            return my_focal_loss(logits, mask)

    train.fit.run({"shards": "shards/", "variant": "v2", "out": "runs/focal"}, trainer_class=FocalTrainer)

The steps that build things (`build_model`, `build_loss`, `build_optimizer`, `build_scheduler`,
`build_augmenter`) are overridable the same way; a model or loss registered by name
(`train.models.register_model`, `train.losses.register_loss`) needs no subclass at all.

Reproducibility: the weights are seeded before the model is built (every rank alike); the data
order depends only on (seed, epoch) through the dataset; augmentation draws from a generator
re-seeded from (seed, epoch, rank) at every epoch start. So an epoch is the same whether it
follows the previous one directly or a `--resume`.

A stop request (SIGINT/SIGTERM, or a hook) ends the epoch at the next step; nothing of the
partial epoch is written and the exit code is 128 + the signal.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from . import checkpoint as ckpt
from . import distributed, engine, faults, rundir
from .budget import Budget, StopRequested, StopSignal, format_duration, projection_line

PROJECTION_STEPS = 5
"""Steps timed before the speed and the projected run time are printed."""


class Callback(Protocol):
    """Something told about the run as it goes (experiment trackers); every method optional."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_epoch_end(self, trainer: "Trainer", row: dict) -> None: ...
    def on_fit_end(self, trainer: "Trainer", result: "Result") -> None: ...


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
    """How a run ended: `exit_code` 0 for a completed or budget-stopped run, 128 + signal."""

    run_dir: Path
    epochs_done: int
    exit_code: int
    message: str
    history: list[dict] = field(default_factory=list)


@dataclass
class Setup:
    """Everything `train.fit.run` resolved before training: what to train, on what, where."""

    config: Any  # train.config.Config
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


@dataclass
class TrainState:
    """What `--resume` restores besides the weights and optimiser: where the run stands."""

    epoch: int = 0  # completed epochs
    best: float = -math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)


class Trainer:
    """Trains `setup.config` on `setup`'s data; see the module docstring for the steps."""

    def __init__(self, setup: Setup) -> None:
        import numpy as np
        import torch

        self.setup, self.config, self.dist, self.device = setup, setup.config, setup.dist, setup.device
        self.console, self.hooks = setup.console, setup.hooks
        self.run_dir = Path(self.config.out)
        self.columns = rundir.metric_columns(self.config.target)
        self.channel_names = rundir.channel_names(self.config.target)
        torch.manual_seed(self.config.seed)  # before the model: every rank starts from the same weights
        np.random.seed(self.config.seed % 2**32)
        self.model = self.build_model().to(self.device)
        self.net = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.loss_fn = self.build_loss()
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_scheduler()
        self.amp_dtype = engine.autocast_dtype(self.config.amp, self.config.amp_dtype, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.augmenter: Any = None
        self.state = TrainState()
        if setup.restored is not None:
            self.restore(setup.restored)
        self.train_loader = self.make_loader(setup.train_ds, stream=0)
        self.val_loader = self.make_loader(setup.val_ds, stream=1)
        self.budget = Budget(self.config.time_budget_seconds, clock=self.hooks.clock)
        self.after_step = self.hooks.after_step or faults.sigterm_hook(self.dist.rank)
        self.session_seconds: list[float] = []
        self.steps_per_epoch = max(1, setup.train_ds.batches_per_epoch(self.config.batch_size, self.config.workers))
        self.projected = False
        self.skipped_before = self._skip_counts()
        self.stop = StopSignal()

    # ------------------------------------------------------------ building (override to change)

    def build_model(self) -> Any:
        from .models import build_model

        return build_model(self.config.model, in_channels=len(self.config.channels), out_channels=3,
                           **self.config.model_kwargs)

    def build_loss(self) -> Callable:
        from .losses import build_loss

        return build_loss(self.config.loss)

    def build_optimizer(self) -> Any:
        import torch

        return torch.optim.Adam(self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def build_scheduler(self) -> Any:
        import torch

        return torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="max", factor=self.config.plateau_factor,
                                                          patience=self.config.plateau_patience)

    def build_augmenter(self, epoch: int) -> Any:
        """This epoch's augmenter (None: no augmentation), seeded from (seed, epoch, rank)."""
        from .augment import AUGMENTATIONS, Augmenter

        ranges = AUGMENTATIONS[self.config.augment]
        if ranges is None:
            return None
        return Augmenter(generator_seed=engine.mix_seed(self.config.seed, epoch, self.dist.rank, 2), config=ranges)

    def make_loader(self, dataset: Any, stream: int) -> Any:
        seed = engine.mix_seed(self.config.seed, 0, self.dist.rank, stream)
        return engine.make_loader(dataset, self.config.batch_size, self.config.workers, self.device, seed,
                                  persistent=True)

    def restore(self, restored: dict) -> None:
        """Weights, optimiser, scheduler, scaler, RNG states and run state from last.pt."""
        self.model.load_state_dict(restored["model_state"])
        self.optimizer.load_state_dict(restored["optimizer"])
        self.scheduler.load_state_dict(restored["scheduler"])
        if restored.get("scaler"):
            self.scaler.load_state_dict(restored["scaler"])
        if self.setup.force:  # forced new hyper-parameters win over the restored ones
            for group in self.optimizer.param_groups:
                group["lr"], group["weight_decay"] = self.config.lr, self.config.weight_decay
            self.scheduler.factor, self.scheduler.patience = self.config.plateau_factor, self.config.plateau_patience
        ckpt.set_rng_state(restored["rng"])
        self.state = TrainState(epoch=restored["epoch"], best=restored["best_mean_dice"],
                                best_epoch=restored["best_epoch"], history=list(restored["history"]),
                                epoch_seconds=list(restored["epoch_seconds"]))

    # ------------------------------------------------------------ the loop

    def fit(self) -> Result:
        """Train from `state.epoch` to `config.epochs`, or until the budget or a signal stops it."""
        outcome = self.begin()
        if outcome is not None:
            return outcome
        epoch = self.state.epoch
        with self.stop:
            try:
                for epoch in range(self.state.epoch, self.config.epochs):
                    refusal = self.budget_refusal(epoch)
                    if refusal is not None:
                        return self.finish(refusal)
                    started = self.hooks.clock()
                    train_loss = self.train_epoch(epoch)
                    validation = self.validate_epoch(epoch)
                    self.end_epoch(epoch, started, train_loss, validation)
            except StopRequested as stopped:
                return self.stopped(stopped, epoch)
        return self.finish(None)

    def begin(self) -> Result | None:
        """Write config.json and metrics.csv (rank 0), print what will run; a Result if nothing will."""
        from .config import config_record

        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record = config_record(self.config, self.setup.preset, self.setup.overrides, self.setup.manifest.digest)
            rundir.write_config(self.run_dir, record)
            rundir.write_metrics(self.run_dir, self.columns, self.state.history)
        for callback in self.callbacks():
            _call(callback, "on_fit_start", self)
        if self.state.epoch >= self.config.epochs:
            message = (f"{self.run_dir} has already trained {self.state.epoch} epoch(s) of {self.config.epochs}; "
                       "ask for more with --epochs")
            return self.finish(message, announce=True)
        self.print_plan()
        return None

    def budget_refusal(self, epoch: int) -> str | None:
        """Why the next epoch may not start (a stop that arrived while saving, or the budget), or None."""
        if distributed.agree(self.dist, self.stop.requested, self.device):
            raise StopRequested(self.stop.signum or 15)
        durations = self.session_seconds or self.state.epoch_seconds
        if not distributed.agree(self.dist, not self.budget.allows_epoch(durations), self.device):
            return None
        last = rundir.checkpoint_path(self.run_dir, rundir.LAST)
        return (f"time budget: epoch {epoch + 1} is projected to take "
                f"{format_duration(Budget.projected_epoch(durations))}, {format_duration(self.budget.remaining())} "
                f"are left; stopped after epoch {epoch} with its checkpoint {last}; continue with --resume")

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training stream; returns the mean loss over its slices (all ranks)."""
        import torch

        self.setup.train_ds.set_epoch(epoch)
        self.augmenter = self.build_augmenter(epoch)
        self.net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = torch.zeros((), dtype=torch.float64, device=self.device)
        started = self.hooks.clock()
        title = f"epoch {epoch + 1}/{self.config.epochs}"
        with _progress(self.console, title, self.steps_per_epoch) as advance, \
                engine.batches(self.train_loader) as batches:
            for step, (image, mask) in enumerate(batches):
                loss = self.train_step(image, mask)
                loss_sum += loss.detach().double() * image.shape[0]
                seen += image.shape[0]
                advance()
                self.after_train_step(epoch, step, started)
        distributed.all_reduce_sum(self.dist, loss_sum)
        distributed.all_reduce_sum(self.dist, seen)
        if not self.projected:
            steps = max(1, int(seen.item()) // self.config.batch_size)
            self.print_projection(steps, self.hooks.clock() - started, epoch)
        return (loss_sum / seen.clamp(min=1)).item()

    def train_step(self, image: Any, mask: Any) -> Any:
        """Move, augment, forward, loss, backward, step; returns the loss tensor."""
        image = image.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        if self.augmenter is not None:
            image, mask = self.augmenter(image, mask)
        with engine.autocast(self.device, self.amp_dtype):
            logits = self.net(image)
            loss = self.compute_loss(logits, mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss

    def compute_loss(self, logits: Any, mask: Any) -> Any:
        return self.loss_fn(logits, mask)

    def after_train_step(self, epoch: int, step: int, started: float) -> None:
        """The test hook, the all-ranks stop agreement, and the speed projection after a few steps."""
        if self.after_step is not None:
            self.after_step(epoch, step, self.stop)
        if distributed.agree(self.dist, self.stop.requested, self.device):
            raise StopRequested(self.stop.signum or 15)
        if not self.projected and step + 1 == PROJECTION_STEPS:
            self.print_projection(step + 1, self.hooks.clock() - started, epoch)

    def validate_epoch(self, epoch: int) -> engine.Validation:
        """The validation pass with rank 0's BatchNorm statistics (the model rank 0 saves)."""
        distributed.broadcast_buffers(self.dist, self.model)
        with engine.batches(self.val_loader) as batches:
            return engine.validate(self.model, batches, self.loss_fn, self.device, self.amp_dtype, self.dist,
                                   self.config.target, self.stop)

    def end_epoch(self, epoch: int, started: float, train_loss: float, validation: engine.Validation) -> None:
        """Scheduler, then the checkpoint, then the CSV row, the summary line and the callbacks."""
        lr = self.optimizer.param_groups[0]["lr"]
        mean_dice = validation.mean_dice()
        score = mean_dice if not math.isnan(mean_dice) else -1.0
        self.scheduler.step(score)
        if self.config.on_bad_shard == "skip":
            self.console.print(self.skipped_line(epoch + 1))
        seconds = self.hooks.clock() - started
        row = self.metrics_row(epoch, train_loss, validation, lr, seconds)
        improved = score > self.state.best
        if improved:
            self.state.best, self.state.best_epoch = score, epoch + 1
        self.state.epoch = epoch + 1
        self.state.history.append(row)
        self.state.epoch_seconds.append(seconds)
        if self.dist.is_main:
            self.save_checkpoint(improved)
            rundir.append_metrics_row(self.run_dir, self.columns, row)
            for callback in self.callbacks():
                _call(callback, "on_epoch_end", self, row)
        self.session_seconds.append(self.hooks.clock() - started)
        self.console.print(self.summary(row, improved))

    def metrics_row(self, epoch: int, train_loss: float, validation: engine.Validation, lr: float,
                    seconds: float) -> dict:
        """One metrics.csv row (`rundir.metric_columns`)."""
        from .metrics import COUNT_METRICS

        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": validation.loss,
                               "mean_dice": validation.mean_dice()}
        scores = validation.scores()
        for metric in COUNT_METRICS.values():
            for name, value in zip(self.channel_names, scores[metric.name]):
                row[f"{metric.column}_{name}"] = float(value)
        row.update(lr=lr, seconds=round(seconds, 3))
        return row

    def save_checkpoint(self, improved: bool) -> None:
        """last.pt always, best.pt when the score improved (atomically; rank 0 only)."""
        payload = self.payload()
        ckpt.save(payload, rundir.checkpoint_path(self.run_dir, rundir.LAST))
        if improved:
            ckpt.save(payload, rundir.checkpoint_path(self.run_dir, rundir.BEST))

    def payload(self) -> dict[str, Any]:
        """The checkpoint (`train.checkpoint` lists its keys)."""
        import torch

        config, manifest, state = self.config, self.setup.manifest, self.state
        finished = state.epoch == config.epochs
        return {
            "format": ckpt.FORMAT,
            "epoch": state.epoch,
            "state": (ckpt.RunState.FINISHED if finished else ckpt.RunState.RUNNING).value,
            "variant": self.setup.preset,
            "model": {"name": config.model, "kwargs": config.model_kwargs, "in_channels": len(config.channels),
                      "out_channels": 3},
            "model_state": self.model.state_dict(),
            "channels": list(config.channels),
            "target": config.target,
            "preprocessing": dict(manifest.content["preprocessing"]),
            "labels": dict(manifest.content["labels"]),
            "manifest_digest": manifest.digest,
            "config": config.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(self.augmenter),
            "best_mean_dice": float(state.best),
            "best_epoch": int(state.best_epoch),
            "history": [dict(r) for r in state.history],
            "epoch_seconds": [float(s) for s in state.epoch_seconds],
            "versions": {"torch": str(torch.__version__)},
        }

    # ------------------------------------------------------------ endings and messages

    def finish(self, outcome: str | None, announce: bool = False) -> Result:
        """A completed (or budget-stopped) run: message, report, callbacks, process group down."""
        done = self.state.epoch
        best = rundir.checkpoint_path(self.run_dir, rundir.BEST)
        message = outcome or (f"finished {done} epoch(s); best mean Dice {self.state.best:.4f} at epoch "
                               f"{self.state.best_epoch} -> {best}")
        self.console.print(message)
        if self.dist.is_main and self.config.report and self.state.history and not announce:
            from . import report

            report.main(self.run_dir, console=self.console, storage_options=self.setup.storage_options)
        return self.close(Result(self.run_dir, done, 0, message, self.state.history))

    def stopped(self, stopped: StopRequested, epoch: int) -> Result:
        signum = stopped.signum
        name = "SIGINT" if signum == 2 else "SIGTERM" if signum == 15 else f"signal {signum}"
        last = rundir.checkpoint_path(self.run_dir, rundir.LAST)
        kept = (f"{last} holds epoch {self.state.epoch}" if self.state.history
                else "no epoch was completed, so there is no checkpoint")
        message = (f"stopped by {name} during epoch {epoch + 1}: the partial epoch is lost; {kept}"
                   + ("; continue with --resume" if self.state.history else ""))
        self.console.print(message)
        return self.close(Result(self.run_dir, self.state.epoch, stopped.exit_code, message, self.state.history))

    def close(self, result: Result) -> Result:
        for loader in (self.train_loader, self.val_loader):
            engine.close_loader(loader)
        for callback in self.callbacks():
            _call(callback, "on_fit_end", self, result)
        distributed.shutdown(self.dist)
        return result

    def callbacks(self) -> list:
        return list(self.hooks.callbacks) if self.dist.is_main else []

    def print_plan(self) -> None:
        from .models import count_parameters

        config, dist = self.config, self.dist
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off"
        self.console.print(
            f"{config.variant}: {config.model} ({count_parameters(self.model):,} parameters), channels "
            f"{','.join(config.channels)}, loss {config.loss}, augmentation {config.augment}, target {config.target}, "
            f"device {self.device}, autocast {amp}, ranks {dist.world_size}")
        per_rank = " per rank" if dist.enabled else ""
        self.console.print(
            f"train on {'+'.join(self.setup.train_splits)} ({self.setup.train_ds.num_slices} slices{per_rank}), "
            f"validate on {config.val_split} ({self.setup.val_ds.num_slices} slices{per_rank}); epochs "
            f"{self.state.epoch + 1}..{config.epochs} -> {self.run_dir}")

    def print_projection(self, steps: int, seconds: float, epoch: int) -> None:
        import torch

        self.projected = True
        epochs_left = self.config.epochs - epoch
        self.console.print(projection_line(steps, seconds, self.steps_per_epoch, epochs_left, self.budget))
        workers = self.config.workers
        bound = self.setup.train_ds.memory_bound(workers, 2 if workers > 0 else 0, self.config.batch_size)
        line = f"host memory bound of the training stream: {bound / 2**20:.0f} MiB"
        if self.device.type == "cuda":
            line += f"; peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
        self.console.print(line)

    def _skip_counts(self) -> dict:
        return {"train": self.setup.train_ds.skip_counts(), "val": self.setup.val_ds.skip_counts()}

    def skipped_line(self, epoch: int) -> str:
        """`--on-bad-shard skip`: shards and slices left out this epoch, over every rank and loader
        worker (the datasets count in shared memory; ranks are summed here)."""
        import torch

        now, before = self._skip_counts(), self.skipped_before
        self.skipped_before = now
        counts = torch.tensor([[now[name][k] - before[name][k] for k in ("shards", "slices")]
                               for name in ("train", "val")], dtype=torch.int64, device=self.device)
        distributed.all_reduce_sum(self.dist, counts)
        (train_shards, train_slices), (val_shards, val_slices) = counts.tolist()
        return (f"epoch {epoch}: skipped {train_shards + val_shards} bad shard(s) ({train_slices + val_slices} "
                f"slices): train {train_shards} ({train_slices} slices), validation {val_shards} ({val_slices} slices)"
                + ("; the warnings above name them" if train_shards + val_shards else ""))

    def summary(self, row: dict, improved: bool) -> str:
        names = self.channel_names
        per_class = " ".join(f"{n} {row['dice_' + n]:.3f}" for n in names)
        empty = [n for n in names if math.isnan(row["dice_" + n])]
        note = f" ({', '.join(empty)}: empty in prediction and truth, left out of the mean)" if empty else ""
        return (f"epoch {row['epoch']}/{self.config.epochs}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
                f"dice {row['mean_dice']:.4f} [{per_class}]{note}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
                + ("  *best" if improved else ""))


def _call(callback: Any, name: str, *args: Any) -> None:
    method = getattr(callback, name, None)
    if method is not None:
        method(*args)


def _progress(console: Any, title: str, total: int) -> Any:
    from shards_spec.progress import Progress

    return Progress(console, title, total)


__all__ = ["Callback", "Hooks", "Result", "Setup", "TrainState", "Trainer"]
