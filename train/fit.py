"""`train run`: the training loop, top to bottom (nanoGPT's train.py, as one function).

    train run --shards shards/ --variant v1 --out runs/v1 --epochs 50 --time-budget 11h30m
    train run --out runs/v1 --resume --epochs 80          # continue, also past the first --epochs
    torchrun --standalone --nproc-per-node 2 --no-python train run --shards shards/ --variant v2 --out runs/v2

The steps, in order, and why in that order:

1. Configuration: the variant preset plus the options given, or, with `--resume`, the run's last
   checkpoint's configuration plus the options given (only where, how long, and with what
   hardware may change without `--force`). The checkpoint is read first, so a truncated file
   fails before any data is touched.
2. Processes and device: torchrun's ranks join a process group (gloo on CPU, nccl on CUDA).
3. Data: the manifest first (it decides which folds exist, and its content digest identifies
   the data), then two streaming `ShardDataset`s. The training order depends only on
   (seed, epoch): `set_epoch` reshuffles shards and the buffer from those, and the loader's
   worker seeds come from a generator seeded the same way, never from the global RNG.
4. Model, loss, optimiser (Adam), ReduceLROnPlateau(mode="max") on validation mean Dice, the
   AMP scaler, the augmenter (v2), seeded before the model is built so every rank starts alike.
5. Restore from last.pt when resuming: weights, optimiser, scheduler, scaler, RNG states, best
   score, metrics history (metrics.csv is rewritten from it, so a crash between the checkpoint
   and the CSV row cannot leave them out of step).
6. Epochs: the budget may refuse to start one; train; validate (TP/FP/FN summed over the
   validation set, sigmoid > 0.5); scheduler step; checkpoint (last.pt always, best.pt when the
   mean Dice improves) before the CSV row; a one-line summary. A signal stops the epoch at the
   next step, and nothing of the partial epoch is written.
7. The report (`train.report.main(run_dir)`) when that module is installed.

Augmentation draws from a generator re-seeded from (seed, epoch, rank) at every epoch start,
so, like the data order, it does not depend on how many epochs this process ran before: an
epoch is the same whether it follows the previous one directly or a `--resume`.

metrics.csv columns are fixed per target; the three channel names are NEC/NET, ED, ET for
`--target classes` and WT, TC, ET for `--target regions` (`metric_columns`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from shards_spec.labels import CLASS_NAMES, REGION_NAMES

from . import checkpoint as ckpt
from . import distributed
from .budget import Budget, StopRequested, StopSignal, format_duration, projection_line
from .config import (
    ConfigError,
    Config,
    check_against_manifest,
    config_record,
    differences,
    option_name,
    resolve,
    train_splits_of,
)

PROJECTION_STEPS = 5
"""Steps timed before the speed and the projected run time are printed."""
FAULT_ENV = "TRAIN_FAULT_SIGTERM_AT"
"""Test hook for subprocess runs (torchrun): "EPOCH:STEP:RANK" (0-based) makes that rank send
itself SIGTERM after that training step, the real signal path, at a known step."""
ARCHITECTURE = ("variant", "model", "channels", "base", "depth", "batch_norm")
"""Options a resumed run cannot change even with --force: the weights would not fit (or, for
the variant, the run would claim a preset its model does not follow)."""


SCORES = (("dice", "dice"), ("prec", "precision"), ("recall", "recall"))
"""metrics.csv column prefix -> key of `metrics.scores_from_counts`."""


def channel_names(target: str) -> tuple[str, ...]:
    return CLASS_NAMES if target == "classes" else REGION_NAMES


def metric_columns(target: str) -> list[str]:
    """metrics.csv header: fixed order; channel names NEC/NET, ED, ET or WT, TC, ET."""
    per_class = [f"{prefix}_{name}" for prefix, _ in SCORES for name in channel_names(target)]
    return ["epoch", "train_loss", "val_loss", "mean_dice", *per_class, "lr", "seconds"]


@dataclass
class Hooks:
    """Injection points for tests and embedding: the clock the budget and timings read, a call
    after every training step (`after_step(epoch, step, stop)`, e.g. to deliver a signal), and
    where the progress bar and summaries go."""

    clock: Callable[[], float] = time.monotonic
    after_step: Callable[[int, int, StopSignal], None] | None = None
    console: Any = None


@dataclass
class Result:
    """How `run` ended: `exit_code` 0 for a completed or budget-stopped run, 128 + signal."""

    run_dir: Path
    epochs_done: int
    exit_code: int
    message: str
    history: list[dict] = field(default_factory=list)


def default_out(variant: str, now: datetime | None = None) -> str:
    """runs/<variant>-<YYYYmmdd-HHMMSS>, with -2, -3, ... when that folder exists already."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{variant}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return str(candidate)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, stream), independent of call history."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def open_dataset(config: Config, store: Any, splits: list[str], *, training: bool, dist: distributed.Dist) -> Any:
    """A `ShardDataset` over `splits`: shuffled and cut to equal batch counts per rank for
    training; in order, whole, split by rank for validation (counts are all-reduced after)."""
    from .data import ShardDataset

    try:
        return ShardDataset(
            store,
            split=splits if len(splits) > 1 else splits[0],
            channels=list(config.channels),
            target=config.target,
            shuffle=training,
            shuffle_buffer=config.shuffle_buffer,
            seed=config.seed,
            policy=config.on_bad_shard,
            oversample_tumour=config.oversample_tumour if training else 1,
            rank=dist.rank if dist.enabled else None,
            world_size=dist.world_size if dist.enabled else None,
            batch_size=config.batch_size if (training and dist.enabled) else None,
        )
    except ValueError as exc:  # e.g. fewer shards than ranks
        raise ConfigError(f"--shards: {exc}") from None


def run(overrides: dict[str, Any], *, resume: bool = False, force: bool = False,
        hooks: Hooks | None = None, storage_options: dict | None = None) -> Result:
    """Train as configured; see the module docstring for the steps. Raises `ToolError` on bad
    input (one line in the CLI); returns a `Result` for every planned ending.

    `storage_options` go to fsspec for a shard URL (credentials, `endpoint_url`); they are not
    saved with the run (they may hold secrets), so a `--resume` needs them again."""
    import numpy as np
    import torch
    from rich.console import Console

    from .losses import build_loss
    from .models import build_model, count_parameters

    hooks = hooks or Hooks()
    overrides = {k: v for k, v in overrides.items() if v is not None}

    # 1. configuration -----------------------------------------------------------------------
    restored: dict[str, Any] | None = None
    if resume:
        if "out" not in overrides:
            raise ConfigError("--out: --resume needs the run folder to continue (--out runs/NAME)")
        last_path = Path(overrides["out"]) / "checkpoints" / ckpt.LAST
        if not last_path.exists():
            raise ConfigError(f"--resume: {last_path} does not exist (no completed epoch to continue from); "
                              "start the run again with --force")
        restored = ckpt.load(last_path)
        saved = dict(restored["config"])
        saved["out"] = overrides["out"]
        config = resolve(overrides, saved)
        changed = differences(restored["config"], config)
        blocked = [c for c in changed if c.split()[0] in {option_name(a) for a in ARCHITECTURE}]
        if blocked:
            raise ConfigError(f"--resume: the model cannot change on resume ({'; '.join(blocked)}); start a new run")
        if changed and not force:
            raise ConfigError(f"--resume: the configuration differs from the run's ({'; '.join(changed)}); "
                              "pass --force to continue with the new values")
        if config.epochs < restored["epoch"]:
            raise ConfigError(f"--epochs: {config.out} has already trained {restored['epoch']} epochs, "
                              f"more than --epochs {config.epochs}")
        preset = restored["variant"]
    else:
        overrides.setdefault("out", default_out(str(overrides.get("variant", "run"))))
        config = resolve(overrides)
        preset = config.variant

    # 2. processes and device ------------------------------------------------------------------
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda was asked for, but torch sees no CUDA device (use --device cpu or auto)")
    device_type = "cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()) else "cpu"
    dist = distributed.init(device_type)
    device = torch.device(device_type, dist.local_rank) if device_type == "cuda" else torch.device("cpu")
    config = dataclasses.replace(config, out=distributed.broadcast_object(dist, config.out))
    run_dir = Path(config.out)
    checkpoints = run_dir / "checkpoints"
    console = hooks.console if hooks.console is not None else Console(stderr=True, soft_wrap=True, quiet=not dist.is_main)

    # 3. data -------------------------------------------------------------------------------------
    from shards_spec.read import ShardStore

    store = ShardStore(config.shards, cache_dir=config.cache_dir, storage_options=storage_options)
    manifest = store.manifest
    check_against_manifest(config, manifest)
    if restored is not None and restored["manifest_digest"] != manifest.digest and not force:
        raise ConfigError(f"--shards: {config.shards} (content digest {manifest.digest[:12]}) is not the data "
                          f"{run_dir} was trained on (digest {restored['manifest_digest'][:12]}); "
                          "pass --force to continue on these shards anyway")
    if not resume and dist.is_main:
        existing = [p for p in (run_dir / "config.json", checkpoints / ckpt.LAST) if p.exists()]
        if existing and not force:
            raise ConfigError(f"--out: {run_dir} already holds a run ({existing[0].name}); "
                              "continue it with --resume or start over with --force")
        for stale in (checkpoints / ckpt.LAST, checkpoints / ckpt.BEST, run_dir / "metrics.csv"):
            stale.unlink(missing_ok=True)
    train_splits = train_splits_of(config, manifest)
    train_ds = open_dataset(config, store, train_splits, training=True, dist=dist)
    val_ds = open_dataset(config, store, [config.val_split], training=False, dist=dist)
    prefetch = 2 if config.workers > 0 else None

    def loader(ds: Any, epoch: int, stream: int) -> Any:
        generator = torch.Generator().manual_seed(mix_seed(config.seed, epoch, dist.rank, stream))
        return torch.utils.data.DataLoader(ds, batch_size=config.batch_size, num_workers=config.workers,
                                           prefetch_factor=prefetch, pin_memory=device.type == "cuda",
                                           generator=generator, worker_init_fn=_loader_worker_init)

    # 4. model, loss, optimiser, scheduler, scaler, augmenter ----------------------------------
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    model = build_model(config.model, in_channels=len(config.channels), out_channels=3, **config.model_kwargs)
    model.to(device)
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = build_loss(config.loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=config.plateau_factor,
                                                           patience=config.plateau_patience)
    amp_dtype = autocast_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def augmenter_for(epoch: int) -> Any:
        if config.augment == "none":
            return None
        from .augment import Augmenter

        return Augmenter(generator_seed=mix_seed(config.seed, epoch, dist.rank, 2))

    # 5. restore -----------------------------------------------------------------------------
    start_epoch, best, best_epoch, history, past_seconds = 0, -math.inf, 0, [], []
    if restored is not None:
        model.load_state_dict(restored["model_state"])
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        if restored.get("scaler"):
            scaler.load_state_dict(restored["scaler"])
        if force:  # forced new hyper-parameters win over the restored ones
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = config.lr, config.weight_decay
            scheduler.factor, scheduler.patience = config.plateau_factor, config.plateau_patience
        ckpt.set_rng_state(restored["rng"])
        start_epoch, best, best_epoch = restored["epoch"], restored["best_mean_dice"], restored["best_epoch"]
        history, past_seconds = list(restored["history"]), list(restored["epoch_seconds"])

    columns = metric_columns(config.target)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = config_record(config, preset, overrides, manifest.digest)
        _write_atomic(run_dir / "config.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
        _write_atomic(run_dir / "metrics.csv", _csv_text(columns, history))
    if start_epoch >= config.epochs:
        message = (f"{run_dir} has already trained {start_epoch} epoch(s) of {config.epochs}; "
                   "ask for more with --epochs")
        console.print(message)
        distributed.shutdown(dist)
        return Result(run_dir, start_epoch, 0, message, history)

    n_params = count_parameters(model)
    console.print(f"{config.variant}: {config.model} ({n_params:,} parameters), channels {','.join(config.channels)}, "
                  f"loss {config.loss}, augmentation {config.augment}, target {config.target}, device {device}, "
                  f"autocast {str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'}, ranks {dist.world_size}")
    per_rank = " per rank" if dist.enabled else ""
    console.print(f"train on {'+'.join(train_splits)} ({train_ds.num_slices} slices{per_rank}), validate on "
                  f"{config.val_split} ({val_ds.num_slices} slices{per_rank}); epochs {start_epoch + 1}..{config.epochs}"
                  f" -> {run_dir}")

    # 6. epochs ------------------------------------------------------------------------------
    budget = Budget(config.time_budget_seconds, clock=hooks.clock)
    after_step = hooks.after_step or _fault_hook(dist.rank)
    session_seconds: list[float] = []
    steps_per_epoch = max(1, train_ds.batches_per_epoch(config.batch_size, config.workers))
    projected = False
    epoch = start_epoch
    outcome = None
    skipped_before = {"train": train_ds.skip_counts(), "val": val_ds.skip_counts()}
    with StopSignal() as stop:
        try:
            for epoch in range(start_epoch, config.epochs):
                if distributed.agree(dist, stop.requested, device):  # arrived while the last epoch was saved
                    raise StopRequested(stop.signum or 15)
                if distributed.agree(dist, not budget.allows_epoch(session_seconds or past_seconds), device):
                    outcome = (f"time budget: epoch {epoch + 1} is projected to take "
                               f"{format_duration(Budget.projected_epoch(session_seconds or past_seconds))}, "
                               f"{format_duration(budget.remaining())} are left; stopped after epoch {epoch} "
                               f"with its checkpoint {checkpoints / ckpt.LAST}; continue with --resume")
                    break
                started = hooks.clock()
                lr = optimizer.param_groups[0]["lr"]
                train_ds.set_epoch(epoch)
                augmenter = augmenter_for(epoch)

                # train
                net.train()
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                seen = torch.zeros((), dtype=torch.float64, device=device)
                with _progress(console, f"epoch {epoch + 1}/{config.epochs}", steps_per_epoch) as advance, \
                        _batches(loader(train_ds, epoch, 0)) as batches:
                    for step, (image, mask) in enumerate(batches):
                        image = image.to(device, non_blocking=True)
                        mask = mask.to(device, non_blocking=True)
                        if augmenter is not None:
                            image, mask = augmenter(image, mask)
                        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                            logits = net(image)
                            loss = loss_fn(logits, mask)
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        loss_sum += loss.detach().double() * image.shape[0]
                        seen += image.shape[0]
                        advance()
                        if after_step is not None:
                            after_step(epoch, step, stop)
                        if distributed.agree(dist, stop.requested, device):
                            raise StopRequested(stop.signum or 15)
                        if not projected and step + 1 == PROJECTION_STEPS:
                            projected = True
                            _print_projection(console, step + 1, hooks.clock() - started, steps_per_epoch,
                                              config.epochs - epoch, budget, train_ds, config, device)
                distributed.all_reduce_sum(dist, loss_sum)
                distributed.all_reduce_sum(dist, seen)
                train_loss = (loss_sum / seen.clamp(min=1)).item()
                if not projected:
                    projected = True
                    _print_projection(console, max(1, int(seen.item()) // config.batch_size),
                                      hooks.clock() - started, steps_per_epoch, config.epochs - epoch, budget,
                                      train_ds, config, device)

                # validate
                distributed.broadcast_buffers(dist, model)  # validate the model rank 0 saves
                with _batches(loader(val_ds, epoch, 1)) as batches:
                    scores = validate(model, batches, loss_fn, device, amp_dtype, dist, stop)
                mean_dice = float(np.nanmean(scores["dice"])) if not np.all(np.isnan(scores["dice"])) else math.nan
                score = mean_dice if not math.isnan(mean_dice) else -1.0
                scheduler.step(score)

                if config.on_bad_shard == "skip":
                    console.print(_skipped_line(epoch + 1, train_ds, val_ds, skipped_before, dist, device))
                    skipped_before = {"train": train_ds.skip_counts(), "val": val_ds.skip_counts()}

                # checkpoint, then the CSV row
                seconds = hooks.clock() - started
                row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": scores["loss"], "mean_dice": mean_dice}
                for prefix, key in SCORES:
                    for name, value in zip(channel_names(config.target), scores[key]):
                        row[f"{prefix}_{name}"] = float(value)
                row.update(lr=lr, seconds=round(seconds, 3))
                history.append(row)
                improved = score > best
                if improved:
                    best, best_epoch = score, epoch + 1
                past_seconds.append(seconds)
                state = ckpt.RunState.FINISHED if epoch + 1 == config.epochs else ckpt.RunState.RUNNING
                if dist.is_main:
                    payload = _payload(config, preset, model, optimizer, scheduler, scaler, manifest, epoch + 1,
                                       state, best, best_epoch, history, past_seconds, augmenter)
                    ckpt.save(payload, checkpoints / ckpt.LAST)
                    if improved:
                        ckpt.save(payload, checkpoints / ckpt.BEST)
                    with open(run_dir / "metrics.csv", "a", newline="") as fh:
                        csv.writer(fh).writerow([_cell(row[c]) for c in columns])
                session_seconds.append(hooks.clock() - started)
                console.print(_summary(row, channel_names(config.target), config.epochs, improved))
        except StopRequested as stopped:
            name = "SIGINT" if stopped.signum == 2 else "SIGTERM" if stopped.signum == 15 else f"signal {stopped.signum}"
            kept = (f"{checkpoints / ckpt.LAST} holds epoch {len(history)}" if history
                    else "no epoch was completed, so there is no checkpoint")
            message = (f"stopped by {name} during epoch {epoch + 1}: the partial epoch is lost; {kept}"
                       + ("; continue with --resume" if history else ""))
            console.print(message)
            distributed.shutdown(dist)
            return Result(run_dir, len(history), stopped.exit_code, message, history)

    done = len(history)
    message = outcome or f"finished {done} epoch(s); best mean Dice {best:.4f} at epoch {best_epoch} -> {checkpoints / ckpt.BEST}"
    console.print(message)

    # 7. report ------------------------------------------------------------------------------
    if dist.is_main and config.report and history:
        _report(run_dir, console, storage_options)
    distributed.shutdown(dist)
    return Result(run_dir, done, 0, message, history)


@contextlib.contextmanager
def _batches(dataloader: Any) -> Any:
    """Iterate a DataLoader and always shut its worker processes down, also when the loop raises
    (a bad shard) or stops: they ignore SIGTERM (`_loader_worker_init`), so workers left to the
    interpreter's exit would be waited for forever (measured: `train run` hung on a corrupt shard)."""
    iterator = iter(dataloader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None:
            shutdown()


def _fault_hook(rank: int) -> Callable[[int, int, Any], None] | None:
    """The `TRAIN_FAULT_SIGTERM_AT` hook for this rank, or None."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    epoch, step, target = (int(v) for v in value.split(":"))
    if target != rank:
        return None

    def deliver(at_epoch: int, at_step: int, stop: Any) -> None:
        if (at_epoch, at_step) == (epoch, step):
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    return deliver


def _loader_worker_init(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which stops after the current
    step and shuts them down (a worker killed by Ctrl-C would otherwise break the last fetch);
    one thread each, since they only decode."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def autocast_dtype(config: Config, device: Any) -> Any:
    """fp16 on CUDA with --amp (the default); on CPU only when asked for by --amp-dtype (bf16 there
    is how tests exercise the autocast path); None = full float32."""
    import torch

    if not config.amp:
        return None
    if config.amp_dtype == "auto":
        return torch.float16 if device.type == "cuda" else None
    return getattr(torch, config.amp_dtype)


def validate(model: Any, loader: Any, loss_fn: Any, device: Any, amp_dtype: Any, dist: distributed.Dist,
             stop: StopSignal | None = None) -> dict[str, Any]:
    """Loss (mean over validation slices) and dataset-level Dice, precision, recall per channel
    from TP/FP/FN summed over the whole split (sigmoid > 0.5, i.e. logit > 0), all-reduced.

    The loss is computed slice by slice: the training Dice is taken over the batch, so a batched
    value would depend on how slices fall into batches (batch size, loader workers, ranks)."""
    import torch

    from .metrics import confusion_counts, scores_from_counts

    model.eval()
    counts = torch.zeros(3, 3, dtype=torch.int64, device=device)  # rows tp, fp, fn
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for image, mask in loader:
            image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(image)
                per_slice = torch.stack([loss_fn(logits[i:i + 1], mask[i:i + 1]) for i in range(image.shape[0])])
            loss_sum += per_slice.double().sum()
            seen += image.shape[0]
            counts += torch.stack(confusion_counts(logits.float() > 0, mask > 0.5))
            if stop is not None and stop.requested and not dist.enabled:
                raise StopRequested(stop.signum or 15)
    distributed.all_reduce_sum(dist, counts)
    distributed.all_reduce_sum(dist, loss_sum)
    distributed.all_reduce_sum(dist, seen)
    if stop is not None and distributed.agree(dist, stop.requested, device):
        raise StopRequested(stop.signum or 15)
    scores = scores_from_counts(counts[0], counts[1], counts[2])
    scores["loss"] = (loss_sum / seen).item() if seen.item() > 0 else math.nan
    scores["counts"] = counts.cpu()
    return scores


# ---------------------------------------------------------------- helpers of `run`


def _payload(config: Config, preset: str, model: Any, optimizer: Any, scheduler: Any, scaler: Any, manifest: Any,
             epoch: int, state: ckpt.RunState, best: float, best_epoch: int, history: list[dict],
             epoch_seconds: list[float], augmenter: Any) -> dict[str, Any]:
    import torch

    return {
        "format": ckpt.FORMAT,
        "epoch": epoch,
        "state": state.value,
        "variant": preset,
        "model": {"name": config.model, "kwargs": config.model_kwargs, "in_channels": len(config.channels),
                  "out_channels": 3},
        "model_state": model.state_dict(),
        "channels": list(config.channels),
        "target": config.target,
        "preprocessing": dict(manifest.content["preprocessing"]),
        "labels": dict(manifest.content["labels"]),
        "manifest_digest": manifest.digest,
        "config": config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": ckpt.rng_state(augmenter),
        "best_mean_dice": float(best),
        "best_epoch": int(best_epoch),
        "history": [dict(r) for r in history],
        "epoch_seconds": [float(s) for s in epoch_seconds],
        "versions": {"torch": str(torch.__version__)},
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def _csv_text(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in columns])
    return buffer.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class _progress:
    """A rich progress bar for one epoch; the context value advances it by one step.

    It is redrawn from the loop itself, never by rich's refresh thread: loader workers are forked
    at the start of every epoch and validation, and a fork while another thread is starting or
    ending can deadlock the child in CPython 3.11 (measured: a DDP rank's loader worker hung in
    `PyOS_AfterFork_Child`, the bar's thread having just started)."""

    REFRESH_SECONDS = 0.1

    def __init__(self, console: Any, title: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True, auto_refresh=False)
        self.task = self.progress.add_task(title, total=total)
        self.drawn = 0.0

    def __enter__(self) -> Callable[[], None]:
        self.progress.start()
        return self._advance

    def _advance(self) -> None:
        self.progress.advance(self.task)
        now = time.monotonic()
        if now - self.drawn >= self.REFRESH_SECONDS:
            self.drawn = now
            self.progress.refresh()

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _print_projection(console: Any, steps: int, seconds: float, steps_per_epoch: int, epochs_left: int,
                      budget: Budget, train_ds: Any, config: Config, device: Any) -> None:
    import torch

    console.print(projection_line(steps, seconds, steps_per_epoch, epochs_left, budget))
    bound = train_ds.memory_bound(config.workers, 2 if config.workers > 0 else 0, config.batch_size)
    line = f"host memory bound of the training stream: {bound / 2**20:.0f} MiB"
    if device.type == "cuda":
        line += f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    console.print(line)


def _skipped_line(epoch: int, train_ds: Any, val_ds: Any, before: dict, dist: distributed.Dist, device: Any) -> str:
    """`--on-bad-shard skip`: shards and slices left out this epoch, over every rank and loader
    worker (the datasets count in shared memory; ranks are summed here)."""
    import torch

    counts = torch.tensor([[ds.skip_counts()[k] - before[name][k] for k in ("shards", "slices")]
                           for name, ds in (("train", train_ds), ("val", val_ds))], dtype=torch.int64, device=device)
    distributed.all_reduce_sum(dist, counts)
    (train_shards, train_slices), (val_shards, val_slices) = counts.tolist()
    return (f"epoch {epoch}: skipped {train_shards + val_shards} bad shard(s) ({train_slices + val_slices} slices): "
            f"train {train_shards} ({train_slices} slices), validation {val_shards} ({val_slices} slices)"
            + ("; the warnings above name them" if train_shards + val_shards else ""))


def _summary(row: dict, names: tuple[str, ...], epochs: int, improved: bool) -> str:
    per_class = " ".join(f"{n} {row['dice_' + n]:.3f}" for n in names)
    empty = [n for n in names if math.isnan(row["dice_" + n])]
    note = f" ({', '.join(empty)}: empty in prediction and truth, left out of the mean)" if empty else ""
    return (f"epoch {row['epoch']}/{epochs}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  "
            f"dice {row['mean_dice']:.4f} [{per_class}]{note}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
            + ("  *best" if improved else ""))


def _report(run_dir: Path, console: Any, storage_options: dict | None = None) -> None:
    import importlib

    try:
        report = importlib.import_module("train.report")
    except ModuleNotFoundError as exc:
        if exc.name != "train.report":
            raise
        console.print("report skipped: train.report is not installed in this version")
        return
    report.main(run_dir, storage_options=storage_options)
