"""`train run`: set up a run, then hand it to the `Trainer` (train/training/trainer.py holds the loop).

    train run --shards shards/ --variant v1 --out runs/v1 --epochs 50 --time-budget 11h30m
    train run --out runs/v1 --resume --epochs 80          # continue, also past the first --epochs
    torchrun --standalone --nproc-per-node 2 --no-python train run --shards shards/ --variant v2 --out runs/v2

The set-up, in order, and why in that order:

1. Configuration: the variant preset plus the options given, or, with `--resume`, the run's last
   checkpoint's configuration plus the options given (only where, how long, and with what
   hardware may change without `--force`). The checkpoint is read first, so a truncated file
   fails before any data is touched.
2. Processes and device: torchrun's ranks join a process group (gloo on CPU, nccl on CUDA).
   Then the run folder is claimed (`claim_out`): rank 0 locks it for the whole run, so a second
   `train run` into it is refused, and checks that it is new, empty, or a run (`--resume`,
   `--force`); every rank learns the outcome, so they stop together.
3. Data: the manifest first (it decides which folds exist, and its content digest identifies
   the data), then two streaming `ShardDataset`s.
4. The `Trainer` (or the subclass `--trainer package.module:ClassName` names, imported once the
   configuration is resolved) builds the model, loss, optimiser and scheduler, restores last.pt
   when resuming, and runs the epochs.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

from shards_spec.errors import ToolError

from .config.options import (
    PRESETS,
    Config,
    ConfigError,
    check_against_manifest,
    differences,
    option_name,
    resolve,
    train_splits_of,
)
from .data import ShardDataset
from .reporting.report import ReportCallback
from .runfiles import checkpoint as ckpt, rundir
from .runfiles.rundir import default_out, metric_columns
from .runtime import devices, distributed
from .training.trainer import Hooks, Result, Setup, Trainer

ARCHITECTURE = ("variant", "model", "channels", "base", "depth", "batch_norm", "stem", "deep_supervision", "context")
"""Options a resumed run cannot change even with --force: the weights would not fit (or, for
the variant, the run would claim a preset its model does not follow)."""


def run(overrides: dict[str, Any], *, resume: bool = False, force: bool = False, hooks: Hooks | None = None,
        storage_options: dict | None = None, trainer_class: type[Trainer] | None = None) -> Result:
    """Train as configured; see the module docstring for the steps. Raises `ToolError` on bad
    input (one line in the CLI); returns a `Result` for every planned ending.

    `storage_options` go to fsspec for a shard URL (credentials, `endpoint_url`); they are not
    saved with the run (they may hold secrets), so a `--resume` needs them again.
    `trainer_class` is a `Trainer` subclass that overrides some of its steps (from Python; the
    option `trainer` names one to import, as `--trainer` does)."""
    hooks = hooks or Hooks()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config, preset, restored = resolve_run(overrides, resume, force)
    if config.trainer is not None:
        if trainer_class is not None:
            raise ConfigError("--trainer: give the Trainer subclass either as --trainer or as trainer_class, not both")
        trainer_class = import_trainer(config.trainer)
    if config.report:
        hooks = dataclasses.replace(hooks, callbacks=[*hooks.callbacks, ReportCallback(storage_options)])
    dist, device = start_processes(config)
    config = dataclasses.replace(config, out=distributed.broadcast_object(dist, config.out))
    lock = claim_out(config, resume, force, dist)
    try:
        console = hooks.console if hooks.console is not None else _console(dist)
        if lock is not None and lock.stale:
            console.print(f"{config.out}: taking over the lock of a train run that is no longer running "
                          f"(pid {lock.stale.get('pid')} on {lock.stale.get('host')})")
        manifest, train_ds, val_ds, train_splits = open_data(config, restored, resume, force, dist, storage_options)
        setup = Setup(config=config, preset=preset, overrides=overrides, manifest=manifest, train_ds=train_ds,
                      val_ds=val_ds, train_splits=train_splits, dist=dist, device=device, console=console,
                      hooks=hooks, restored=restored, force=force, storage_options=storage_options)
        return (trainer_class or Trainer)(setup).fit()
    finally:
        if lock is not None:
            lock.release()


def resolve_run(overrides: dict[str, Any], resume: bool, force: bool) -> tuple[Config, str, dict | None]:
    """The configuration, its preset name, and the checkpoint to resume from (None for a new run)."""
    if not resume:
        if "out" not in overrides:  # named after a valid --variant only: a 300 KB one is no folder name
            variant = overrides.get("variant")
            overrides["out"] = default_out(variant if variant in PRESETS else "run")
        config = resolve(overrides, device_kind=devices.defaults_kind(overrides.get("device", "auto")))
        check_sizes(config)
        return config, config.variant, None
    if "out" not in overrides:
        raise ConfigError("--out: --resume needs the run folder to continue (--out runs/NAME)")
    last_path = resumable_checkpoint(Path(overrides["out"]))
    restored = ckpt.load(last_path)
    ckpt.check_resumable(restored, last_path)
    saved = dict(restored["config"])
    saved["out"] = overrides["out"]
    config = resolve(overrides, saved)
    if config.trainer is not None and "trainer" not in overrides:
        raise ConfigError(f"--trainer: {config.out} was trained with --trainer {config.trainer}; give it again to "
                          "continue (a class named by a checkpoint is never imported)")
    check_sizes(config)
    changed = differences(restored["config"], config)
    blocked = [c for c in changed if c.split()[0] in {option_name(a) for a in ARCHITECTURE}]
    if blocked:
        raise ConfigError(f"--resume: the model cannot change on resume ({'; '.join(blocked)}); start a new run")
    check_same_model(config, restored, last_path)
    if changed and not force:
        raise ConfigError(f"--resume: the configuration differs from the run's ({'; '.join(changed)}); "
                          "pass --force to continue with the new values")
    if config.epochs < restored["epoch"]:
        raise ConfigError(f"--epochs: {config.out} has already trained {restored['epoch']} epochs, "
                          f"more than --epochs {config.epochs}")
    return config, restored["variant"], restored


def import_trainer(name: str) -> type[Trainer]:
    """The class `--trainer package.module:ClassName` names (spelling checked by the configuration),
    imported: the user's code, named by the user on the command line or in a `--config` file, never
    read from a checkpoint (`resolve_run`). One line when the module or the class is missing or the
    class is no `Trainer`; an error raised by the module's own code is left as its traceback."""
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise ConfigError(f"--trainer: there is no module {module_name} to import (is it installed, or its "
                              "folder on PYTHONPATH?)") from None
        raise ConfigError(f"--trainer: importing {module_name} failed: {exc}") from exc
    found = getattr(module, class_name, None)
    if found is None:
        raise ConfigError(f"--trainer: module {module_name} has no {class_name}")
    if not (isinstance(found, type) and issubclass(found, Trainer)):
        raise ConfigError(f"--trainer: {name} is not a subclass of train.training.trainer.Trainer")
    return found


def resumable_checkpoint(run_dir: Path) -> Path:
    """The last.pt `--resume` continues from, or one line saying why there is none (and how to
    start instead: a folder that is not a run needs a new run, not `--force`)."""
    last = rundir.checkpoint_path(run_dir, rundir.LAST)
    if not run_dir.exists():
        raise ConfigError(f"--resume: {run_dir} does not exist, so there is no run to continue; "
                          "start a new run without --resume")
    if not run_dir.is_dir():
        raise ConfigError(f"--out: {run_dir} is a file, not a run folder")
    if not rundir.is_run(run_dir):
        raise ConfigError(f"--resume: {run_dir} holds no run of this tool (no run's {rundir.CONFIG}, no {last.name}); "
                          "start a new run without --resume, into a new or empty folder")
    if not last.exists():
        raise ConfigError(f"--resume: {run_dir} has no checkpoint yet ({last} is missing: no epoch was completed); "
                          "start the run again without --resume, with --force to replace it")
    return last


def check_sizes(config: Config) -> None:
    """The options that size memory and processes within `train.runfiles.checkpoint.LIMITS`, the same
    bounds a resumed checkpoint is held to."""
    problem = ckpt.size_problem(config.to_dict())
    if problem is not None:
        raise ConfigError(f"{option_name(problem[0])}: {problem[1]}")


def check_same_model(config: Config, restored: dict, path: Path) -> None:
    """The model the Trainer will build from the configuration is the one the checkpoint's
    weights were checked against (`ckpt.load`), so restoring them cannot fail."""
    expected = ckpt.model_spec(config)
    spec = restored["model"]
    described = {key: spec.get(key, expected[key] if key == "out_channels" else None) for key in expected}
    if described != expected:
        raise ckpt.CheckpointError(f"its model description {described} is not the model of its configuration "
                                   f"{expected}; it cannot be resumed", path)


def claim_out(config: Config, resume: bool, force: bool, dist: distributed.Dist) -> Any:
    """Rank 0 locks the run folder (`shards_spec.lock.FolderLock`, held until `run` returns: a
    second `train run` into it is refused, a dead holder's lock is taken over) and checks what
    it holds (`check_out`); every rank learns the outcome. Returns rank 0's lock."""
    from shards_spec.lock import FolderLock

    lock, problem = None, None
    if dist.is_main:
        run_dir = Path(config.out)
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise ConfigError(f"--out: {run_dir} is a file; give a folder for the run")
            lock = FolderLock(run_dir, "train run")
            lock.acquire()
            check_out(run_dir, resume, force)
        except OSError as exc:
            problem = ConfigError(f"--out: {run_dir} cannot be written ({exc.strerror or exc})")
        except ToolError as exc:
            problem = exc
        if problem is not None and lock is not None:
            lock.release()
    message = distributed.broadcast_object(dist, None if problem is None else str(problem))
    if problem is not None:
        raise problem
    if message is not None:
        raise ConfigError(message)
    return lock


def check_out(run_dir: Path, resume: bool, force: bool) -> None:
    """A new run goes into a new or empty folder, or over a run with `--force` (only the run's own
    files are replaced, in `open_data`); a folder of other files is refused naming a few."""
    if resume:
        if not rundir.is_run(run_dir):  # replaced since it was read (resolve_run)
            raise ConfigError(f"--resume: {run_dir} holds no run of this tool any more; start a new run")
        return
    if rundir.is_run(run_dir):
        if not force:
            raise ConfigError(f"--out: {run_dir} already holds a run ({rundir.CONFIG}); continue it with --resume "
                              "or start over with --force (which replaces only the run's own files)")
        return
    found = rundir.entries(run_dir)
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ConfigError(f"--out: {run_dir} holds {len(found)} file(s) or folder(s) that are not a train run "
                          f"({shown}); give a new or empty folder")


def start_processes(config: Config) -> tuple[distributed.Dist, Any]:
    """Join torchrun's process group if any; the device this rank trains on (`train.runtime.devices`:
    under torchrun, cuda and auto mean GPU LOCAL_RANK)."""
    launched = distributed.from_env()
    device = devices.resolve(config.device, launched.local_rank if launched.enabled else None)
    dist = distributed.init(device.type)
    return dist, device


def open_data(config: Config, restored: dict | None, resume: bool, force: bool, dist: distributed.Dist,
              storage_options: dict | None) -> tuple[Any, Any, Any, list[str]]:
    """The manifest (checked against the options and a resumed run's data), a new run's folder
    cleared of a forced-over run's files, and the training and validation datasets."""
    from shards_spec.read import ShardStore

    store = ShardStore(config.shards, cache_dir=config.cache_dir, storage_options=storage_options)
    manifest = store.manifest
    check_against_manifest(config, manifest)
    run_dir = Path(config.out)
    if restored is not None and restored["manifest_digest"] != manifest.digest and not force:
        raise ConfigError(f"--shards: {config.shards} (content digest {manifest.digest[:12]}) is not the data "
                          f"{run_dir} was trained on (digest {restored['manifest_digest'][:12]}); "
                          "pass --force to continue on these shards anyway")
    if not resume and dist.is_main:  # over a run with --force (claim_out refused anything else)
        rundir.remove_own_files(run_dir)
    train_splits = train_splits_of(config, manifest)
    train_ds = open_dataset(config, store, train_splits, training=True, dist=dist)
    val_ds = open_dataset(config, store, [config.val_split], training=False, dist=dist)
    return manifest, train_ds, val_ds, train_splits


def open_dataset(config: Config, store: Any, splits: list[str], *, training: bool, dist: distributed.Dist) -> Any:
    """A `ShardDataset` over `splits`: shuffled and cut to equal batch counts per rank for
    training; in order, whole, split by rank for validation (counts are all-reduced after)."""

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
            context=config.context,
        )
    except ValueError as exc:  # e.g. fewer shards than ranks
        raise ConfigError(f"--shards: {exc}") from None


def _console(dist: distributed.Dist) -> Any:
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, quiet=not dist.is_main)


__all__ = ["ARCHITECTURE", "Hooks", "Result", "claim_out", "metric_columns", "open_dataset", "resolve_run", "run"]
