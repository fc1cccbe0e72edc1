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
    # or, from the command line: train run ... --trainer mypackage.losses:FocalTrainer

The steps that build things (`build_model`, `build_loss`, `build_optimizer`, `build_scheduler`,
`build_augmenter`) are overridable the same way; a model or loss registered by name
(`train.models.register_model`, `train.recipe.losses.register_loss`) needs no subclass at all.

Reproducibility: the weights are seeded before the model is built (every rank alike); the data
order depends only on (seed, epoch) through the dataset; augmentation draws from a generator
re-seeded from (seed, epoch, rank) at every epoch start. So an epoch is the same whether it
follows the previous one directly or a `--resume`.

Learning rate: set before every step from the global step count, which the checkpoint keeps:
the registered `--schedule` (`train.recipe.schedules`: a warm-up over `--warmup` steps, then the
decay), whose progress under `--time-budget` is also the budget's elapsed fraction
(`budget_progress`), so a run ends annealed however its speed varied. The ranks agree on the
clock in the all-reduce that already agrees on stopping.

Two ways to stop early, on purpose different (`train.training.budget`): `--time-budget`
validates and writes a checkpoint in the middle of the epoch, which `--resume` continues exactly
(exit code 0); a stop request (SIGINT/SIGTERM, or a hook) loses the partial epoch (exit 128 + the
signal).
`--early-stop N` ends the run when the validation score has not improved for N validations.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from shards_spec.labels import CLASS_NAMES, target_names

from ..config.options import config_record
from ..metrics import COUNT_METRICS
from ..models import build_model, count_parameters
from ..recipe.augment import AUGMENTATIONS
from ..recipe.losses import build_loss, deep_supervision_loss
from ..recipe.priors import class_priors, init_head_bias
from ..recipe.schedules import SCHEDULES, budget_progress, decay_rate, schedule_rate, warmup_rate
from ..runfiles import checkpoint as ckpt, rundir
from ..runfiles.checkpoint import TrainState
from ..runtime import cpu_share, distributed, faults
from . import engine, messages
from .budget import Budget, Pace, StopRequested, StopSignal, format_duration
from .setup import Callback, Hooks, Result, Setup

PROJECTION_STEPS = 5
"""Steps timed before the speed and the projected run time are printed."""
STOP_BUDGET, STOP_SIGNAL = 1, 2
"""Levels of `check_stop`, agreed across ranks by their maximum: a signal outranks the budget."""


class BudgetReached(Exception):
    """The next step, a validation and a checkpoint would not fit in the time budget."""


class Trainer:
    """Trains `setup.config` on `setup`'s data; see the module docstring for the steps."""

    def __init__(self, setup: Setup) -> None:
        import numpy as np
        import torch

        self.setup, self.config, self.dist, self.device = setup, setup.config, setup.dist, setup.device
        self.console, self.hooks = setup.console, setup.hooks
        self.run_dir = Path(self.config.out)
        self.columns = rundir.metric_columns(self.config.target)
        self.channel_names = target_names(self.config.target)
        torch.manual_seed(self.config.seed)  # before the model: every rank starts from the same weights
        np.random.seed(self.config.seed % 2**32)
        self.model = engine.prepare_model(self.build_model(), self.device)
        if setup.restored is None and self.config.head_bias == "prior":
            init_head_bias(self.model, class_priors(setup.manifest, setup.train_splits, self.config.target))
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
        self.threads_before = torch.get_num_threads()
        self.governor = self.plan_threads()
        self.after_step = self.hooks.after_step or faults.sigterm_hook(self.dist.rank)
        self.pace = Pace(self.config.batch_size, setup.val_ds.num_slices)  # this process's measured speed
        self.steps_per_epoch = max(1, setup.train_ds.batches_per_epoch(self.config.batch_size, self.config.workers))
        # The schedule spans --epochs (also after a resume that asks for more); a budget's clock may end it first.
        self.state.schedule_steps = self.config.epochs * self.steps_per_epoch
        self.trained_before = sum(self.state.epoch_seconds)  # earlier processes of a resumed run
        self.clock_reading = (0.0, 0.0)  # (elapsed, reserve) of the budget, agreed by the ranks before each step
        self.progress = 0.0  # the decay's progress under a budget, which never goes back
        self.projected = False
        self.skipped_before = self._skip_counts()
        self.stop = StopSignal()

    def plan_threads(self) -> cpu_share.ThreadGovernor | None:
        """`--threads`: pin the count, or follow what other work leaves of the CPU (`train.runtime.cpu_share`)."""
        import torch

        threads, follow = cpu_share.plan(self.config.threads, device_type=self.device.type,
                                         budgeted=self.budget.limit is not None, distributed=self.dist.enabled)
        if threads is not None:
            torch.set_num_threads(threads)
        return cpu_share.ThreadGovernor(torch.get_num_threads()) if follow else None

    # ------------------------------------------------------------ building (override to change)

    def build_model(self) -> Any:

        return build_model(self.config.model, in_channels=self.config.in_channels, out_channels=3,
                           **self.config.model_kwargs)

    def build_loss(self) -> Callable:

        return build_loss(self.config.loss)

    def build_optimizer(self) -> Any:
        import torch

        return torch.optim.Adam(self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def build_scheduler(self) -> Any:
        """The scheduler of a per-validation `--schedule` (plateau's ReduceLROnPlateau); None for a
        per-step one, whose rate `learning_rate` sets (`train.recipe.schedules.SCHEDULES`)."""
        make = SCHEDULES[self.config.schedule].per_validation
        return None if make is None else make(self.optimizer, self.config)

    def learning_rate(self, step: int) -> float:
        """The rate of global step `step` (0-based) for `--schedule cosine` or `poly`; under a time
        budget the decay's progress is the larger of the steps' and the budget clock's (and never
        goes back: a better estimate of the final validation must not raise the rate again)."""
        config, total = self.config, self.state.schedule_steps
        if self.budget.limit is None:
            return schedule_rate(config.schedule, config.lr, step, total, config.warmup)
        warmup = min(config.warmup, total // 10)
        if step < warmup:
            return warmup_rate(config.lr, step, warmup)
        elapsed, reserve = self.clock_reading
        by_clock = budget_progress(elapsed, self.budget.limit - reserve, self.trained_before)
        self.progress = max(self.progress, by_clock, (step - warmup) / max(total - warmup, 1))
        return decay_rate(config.schedule, config.lr, self.progress)

    def build_augmenter(self, epoch: int) -> Any:
        """This epoch's augmenter (None: no augmentation), seeded from (seed, epoch, rank)."""

        return AUGMENTATIONS[self.config.augment](engine.mix_seed(self.config.seed, epoch, self.dist.rank, 2))

    def make_loader(self, dataset: Any, stream: int) -> Any:
        seed = engine.mix_seed(self.config.seed, 0, self.dist.rank, stream)
        return engine.make_loader(dataset, self.config.batch_size, self.config.workers, self.device, seed,
                                  persistent=True)

    def restore(self, restored: dict) -> None:
        """Weights, optimiser, scheduler, scaler, RNG states and run state from last.pt, which
        `checkpoint.check_resumable` checked (`checkpoint.restore`); then a `--force`d option wins."""
        self.state = ckpt.restore(restored, rundir.checkpoint_path(self.run_dir, rundir.LAST), model=self.model,
                                  optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        if self.setup.force:  # forced new hyper-parameters win over the restored ones
            for group in self.optimizer.param_groups:
                group["lr"], group["weight_decay"] = self.config.lr, self.config.weight_decay
            if self.config.schedule == "plateau" and self.scheduler is not None:
                self.scheduler.factor, self.scheduler.patience = self.config.plateau_factor, self.config.plateau_patience

    # ------------------------------------------------------------ the loop

    def fit(self) -> Result:
        """Train from `state.epoch` to `config.epochs`, or until the budget, early stopping or a signal ends it."""
        outcome = self.begin()
        if outcome is not None:
            return outcome
        epoch = self.state.epoch
        with self.stop:
            try:
                for epoch in range(self.state.epoch, self.config.epochs):
                    started = self.hooks.clock()
                    try:
                        train_loss = self.train_epoch(epoch)
                    except BudgetReached:
                        return self.finish(self.budget_stop(epoch, started))
                    if not math.isfinite(train_loss):
                        return self.diverged(epoch, train_loss)
                    validation = self.validate_epoch(epoch)
                    self.end_epoch(epoch, started, train_loss, validation)
                    if self.config.early_stop is not None and self.state.stale >= self.config.early_stop:
                        return self.finish(f"early stop: no better validation mean Dice in {self.state.stale} "
                                           f"validations; best {self.state.best:.4f} at epoch {self.state.best_epoch}")
            except StopRequested as stopped:
                return self.stopped(stopped, epoch)
        return self.finish(None)

    def begin(self) -> Result | None:
        """Write config.json and metrics.csv (rank 0), print what will run; a Result if nothing will."""

        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record = config_record(self.config, self.setup.preset, self.setup.overrides, self.setup.manifest.digest)
            record["autocast"] = messages.autocast_name(self.amp_dtype)  # what `auto` became on this machine
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

    def out_of_time(self) -> bool:
        """Whether one more step, then a validation and a checkpoint, would pass the budget."""
        return self.pace.out_of_time(self.budget, self.state.val_seconds)

    def budget_stop(self, epoch: int, started: float) -> str:
        """The budget ends the run in the middle of epoch `epoch`: validate and checkpoint what was
        trained (resumable exactly) unless no step of this epoch was taken."""
        last = rundir.checkpoint_path(self.run_dir, rundir.LAST)
        done = self.state.epoch_step
        if done:
            loss_sum, seen = self.state.epoch_loss
            validation = self.validate_epoch(epoch)
            self.end_epoch(epoch, started, loss_sum / max(seen, 1.0), validation, partial=True)
        where = f"{done} of {self.steps_per_epoch} steps into epoch {epoch + 1}" if done else f"after epoch {epoch}"
        return (f"time budget: stopped {where} with a checkpoint {last} "
                f"({format_duration(self.budget.elapsed())} used of {format_duration(self.budget.limit or 0)}); "
                "continue with --resume")

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training stream; returns the mean per-slice loss over its slices (all
        ranks). A mid-epoch checkpoint's steps are skipped (the stream is deterministic)."""
        import torch

        self.setup.train_ds.set_epoch(epoch)
        self.augmenter = self.build_augmenter(epoch)
        skip, state = self.state.epoch_step, self.state
        if skip and self.augmenter is not None and state.augmenter_state is not None:
            self.augmenter.set_state(state.augmenter_state)
        dtype = engine.sum_dtype(self.device)
        loss_sum = torch.tensor(state.epoch_loss[0] if skip else 0.0, dtype=dtype, device=self.device)
        seen = torch.tensor(state.epoch_loss[1] if skip else 0.0, dtype=dtype, device=self.device)
        self.net.train()
        title = f"epoch {epoch + 1}/{self.config.epochs}"
        with _progress(self.console, title, self.steps_per_epoch) as advance, \
                engine.batches(self.train_loader) as batches:
            advance(skip)
            last = self.hooks.clock()  # the end of the previous step: a step's time includes its data wait
            for step, (image, mask) in enumerate(batches):
                if step < skip:
                    last = self.hooks.clock()
                    continue
                if self.check_stop() == STOP_BUDGET:
                    state.epoch_loss = (float(loss_sum), float(seen))
                    raise BudgetReached
                self.set_learning_rate()
                losses = self.train_step(image, mask)
                loss_sum += losses.to(dtype).sum()
                seen += losses.numel()
                state.steps += 1
                state.epoch_step = step + 1
                advance()
                last = self.after_train_step(epoch, step, last)
        distributed.all_reduce_sum(self.dist, loss_sum)
        distributed.all_reduce_sum(self.dist, seen)
        if not self.projected:
            self.print_projection(epoch)
        state.epoch_step, state.epoch_loss, state.augmenter_state = 0, (0.0, 0.0), None
        return (loss_sum / seen.clamp(min=1)).item()

    def train_step(self, image: Any, mask: Any) -> Any:
        """Move, augment, forward, loss, backward, step; returns each slice's loss (B,), detached,
        under the definition the validation loss uses (`engine.slice_losses`)."""
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
        import torch

        main = logits[0] if isinstance(logits, tuple) else logits
        with torch.no_grad():
            return engine.slice_losses(self.compute_loss, main.detach().float(), mask)

    def compute_loss(self, logits: Any, mask: Any) -> Any:
        """The configured loss; over every output of a deeply supervised model (a tuple)."""
        if isinstance(logits, tuple):

            return deep_supervision_loss(self.loss_fn, logits, mask)
        return self.loss_fn(logits, mask)

    def set_learning_rate(self) -> None:
        if self.scheduler is None:
            rate = self.learning_rate(self.state.steps)
            for group in self.optimizer.param_groups:
                group["lr"] = rate

    def check_stop(self) -> int:
        """Before a step: a signal on any rank stops at once (raises); the budget's verdict is returned.
        The same all-reduce agrees on the budget's clock (the largest elapsed time and final reserve)."""
        level = STOP_SIGNAL if self.stop.requested else STOP_BUDGET if self.out_of_time() else 0
        reserve = self.pace.reserve(self.state.val_seconds)
        level, elapsed, reserve = distributed.agree_max(self.dist, [level, self.budget.elapsed(), reserve], self.device)
        level, self.clock_reading = int(level), (elapsed, reserve)
        if level == STOP_SIGNAL:
            raise StopRequested(self.stop.signum or 15)
        return level

    def after_train_step(self, epoch: int, step: int, last: float) -> float:
        """The test hook, the step's time since the previous one ended (`last`), the speed
        projection after a few steps; returns the time this step ended."""
        if self.after_step is not None:
            self.after_step(epoch, step, self.stop)
        now = self.hooks.clock()
        self.pace.record(now - last)
        if self.governor is not None and (threads := self.governor.poll()) is not None:
            self.console.print(f"CPU shared: {threads} intra-op thread(s) now, for the cores other processes "
                               f"leave free (of {self.governor.ceiling})")
        if not self.projected and self.pace.steps == PROJECTION_STEPS:
            self.print_projection(epoch)
        return now

    def validate_epoch(self, epoch: int) -> engine.Validation:
        """The validation pass with rank 0's BatchNorm statistics (the model rank 0 saves)."""
        distributed.broadcast_buffers(self.dist, self.model)
        started = self.hooks.clock()
        with engine.batches(self.val_loader) as batches:
            validation = engine.validate(self.model, batches, self.compute_loss, self.device, self.amp_dtype,
                                         self.dist, self.config.target, self.stop,
                                         brain_channels=len(self.config.channels))
        self.state.val_seconds = max(self.state.val_seconds, self.hooks.clock() - started)
        return validation

    def end_epoch(self, epoch: int, started: float, train_loss: float, validation: engine.Validation,
                  partial: bool = False) -> None:
        """Scheduler, then the checkpoint, then the CSV row, the summary line and the callbacks.
        `partial`: a budget stop inside the epoch (a fractional epoch, resumable where it stopped)."""
        lr = self.optimizer.param_groups[0]["lr"]
        mean_dice = validation.mean_dice()
        score = mean_dice if not math.isnan(mean_dice) else -1.0
        if self.scheduler is not None and not partial:
            self.scheduler.step(score)
        if self.config.on_bad_shard == "skip":
            self.console.print(self.skipped_line(epoch + 1))
        seconds = self.hooks.clock() - started
        done = epoch + (round(self.state.epoch_step / self.steps_per_epoch, 3) if partial else 1)
        row = self.metrics_row(done, train_loss, validation, lr, seconds)
        improved = score > self.state.best
        if improved:
            self.state.best, self.state.best_epoch, self.state.stale = score, done, 0
        else:
            self.state.stale += 1
        if not partial:
            self.state.epoch = epoch + 1
        self.state.history.append(row)
        self.state.epoch_seconds.append(seconds)
        if self.dist.is_main:
            self.save_checkpoint(improved)
            rundir.append_metrics_row(self.run_dir, self.columns, row)
            for callback in self.callbacks():
                _call(callback, "on_epoch_end", self, row)
        self.console.print(self.summary(row, improved))

    def metrics_row(self, epoch: float, train_loss: float, validation: engine.Validation, lr: float,
                    seconds: float) -> dict:
        """One metrics.csv row (`rundir.metric_columns`); `epoch` counts the epochs trained (1-based)."""

        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "val_loss": validation.loss,
                               "mean_dice": validation.mean_dice()}
        regions = self.config.target == "regions"  # the seed's per-class columns, then a regions run's WT, TC, ET
        for classes in (True, False) if regions else (False,):
            scores = validation.scores(classes=classes)
            names = CLASS_NAMES if classes else self.channel_names
            for metric in COUNT_METRICS.values():
                for name, value in zip(names, scores[metric.name]):
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
        """The checkpoint of this run as it stands (`train.runfiles.checkpoint.payload` lists its keys)."""
        return ckpt.payload(config=self.config, variant=self.setup.preset, manifest=self.setup.manifest,
                            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                            augmenter=self.augmenter, state=self.state)

    # ------------------------------------------------------------ endings and messages

    def finish(self, outcome: str | None, announce: bool = False) -> Result:
        """A completed (or budget-stopped) run: message, callbacks (the report is one:
        `train.reporting.report.ReportCallback`), process group down."""
        done = self.state.epoch
        best = rundir.checkpoint_path(self.run_dir, rundir.BEST)
        message = outcome or (f"finished {done} epoch(s); best mean Dice {self.state.best:.4f} at epoch "
                               f"{self.state.best_epoch} -> {best}")
        self.console.print(message)
        return self.close(Result(self.run_dir, done, 0, message, self.state.history, trained=not announce))

    def diverged(self, epoch: int, train_loss: float) -> Result:
        """The training loss is not finite: nothing of this epoch is validated or saved (a NaN model
        would score as 'best' and replace best.pt); the run ends with exit code 1."""
        last = rundir.checkpoint_path(self.run_dir, rundir.LAST)
        kept = f"{last} holds epoch {self.state.epoch}" if self.state.history else "no checkpoint was written"
        message = (f"error: training diverged in epoch {epoch + 1} (training loss {train_loss}): nothing of it is "
                   f"kept; {kept}; try a lower --lr (now {self.config.lr:g})")
        self.console.print(message)
        return self.close(Result(self.run_dir, self.state.epoch, 1, message, self.state.history))

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
        import torch

        torch.set_num_threads(self.threads_before)  # an in-process caller (a notebook) gets its count back
        return result

    def callbacks(self) -> list:
        return list(self.hooks.callbacks) if self.dist.is_main else []

    def print_plan(self) -> None:

        setup = self.setup
        for line in messages.plan_lines(self.config, count_parameters(self.model), self.device, self.amp_dtype,
                                        self.dist, setup.train_splits, setup.train_ds.num_slices,
                                        setup.val_ds.num_slices, self.state.epoch, self.run_dir,
                                        self.threads_text()):
            self.console.print(line)

    def threads_text(self) -> str:
        """The sizes line's intra-op threads on the CPU (`--threads`)."""
        if self.device.type != "cpu":
            return ""
        import torch

        follows = " following the load (--threads)" if self.governor is not None else ""
        return f", {torch.get_num_threads()} intra-op thread(s){follows}"

    def print_projection(self, epoch: int) -> None:
        self.projected = True
        workers = self.config.workers
        bound = self.setup.train_ds.memory_bound(workers, 2 if workers > 0 else 0, self.config.batch_size)
        steps, seconds = self.pace.recent_total()
        for line in messages.projection_lines(steps, seconds, self.steps_per_epoch,
                                              self.config.epochs - epoch, self.budget, bound, self.device):
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
        return messages.skipped_line(epoch, counts.tolist())

    def summary(self, row: dict, improved: bool) -> str:
        return messages.summary_line(row, self.channel_names, self.config.epochs, improved)


def _call(callback: Any, name: str, *args: Any) -> None:
    method = getattr(callback, name, None)
    if method is not None:
        method(*args)


def _progress(console: Any, title: str, total: int) -> Any:
    from shards_spec.progress import Progress

    return Progress(console, title, total)


__all__ = ["Callback", "Hooks", "Result", "Setup", "TrainState", "Trainer"]
