"""`train evaluate`: the numbers of a checkpoint, each with the average it is.

    train evaluate --checkpoint runs/v1/checkpoints/best.pt --shards shards/ --json runs/v1/eval.json
    train evaluate --checkpoint best.pt --shards shards/ --src data/MICCAI_BraTS2020_TrainingData --json eval.json

Three levels, top to bottom, from the fastest to the headline:

1. **slice level, dataset counts** (exactly the trainer's validation: `train.training.engine.validate`, the
   same dataset, loss and autocast as the run): TP/FP/FN of each output channel of the label
   map the label rule gives (`train.metrics.probs_to_labels`, as `predict` decides labels) summed
   over every slice of the split on the shard grid, then one Dice,
   precision and recall per channel. A channel with no voxel in prediction or truth over the
   whole split is NaN and left out of the mean Dice.
2. **patient level on the shard grid** (fast): each patient's shard slices gathered back into a
   volume (`train.data.iter_patients`), labels decided by the checkpoint's rule
   (`train.metrics.probs_to_labels`) and zeroed where the shards store background (every channel
   0), then Dice, precision and recall per class (NEC/NET, ED, ET) and per BraTS region (WT, TC,
   ET) per patient, with the BraTS 2020 rule (prediction and truth both empty: 1). Slices the
   ETL dropped (no brain) count as empty in both. Averaged over patients (mean, median, sample
   std); the same counts summed over patients are given too.
3. **patient level on the native grid** (`--src`, the headline, comparable with published BraTS
   results): each patient of the split predicted from its source volumes exactly as `train
   predict` does (`train.apply.inference.predict_volume`) and scored against its original
   segmentation with `train.metrics.patient_scores` (Dice, precision, recall, HD95 in mm as
   MONAI computes it; BraTS 2020: both empty -> Dice 1 / HD95 0, exactly one empty -> Dice 0 /
   HD95 373.13); the empty cases are counted per class/region and reported. Averaged over
   patients. With `--lesion-wise`, also the official BraTS lesion-wise Dice and HD95 per region
   (WT, TC, ET) of each patient (`train.metrics.lesionwise`, where the definition and its source
   are written down: connected components, one-to-one matching, FP/FN lesions counted) with the
   lesion counts and the penalised average, next to the 2020 numbers; averaged over patients
   with NaN (no lesion in prediction or truth) left out, as the BraTS evaluation does.

The terminal gets rich tables; `--json FILE` gets everything, each block naming its average
(`"average": ...`), with NaN written as null; the per-patient scores go to a CSV (`--csv FILE`,
default beside the JSON as `<stem>_patients.csv`): one row per patient and grid. Before any
work, every output is checked (`check_outputs`): never an input (a checkpoint, the shards'
manifest or a shard file, a source file or anything inside `--src`, compared as files on disk),
never a folder, and an existing file only with `--overwrite`.

The checkpoint's manifest digest is compared with the shards': evaluating on other shards is
legitimate (another split, a re-cut) but is said, once, as a warning line. Likewise `--src`
with the source the shards were built from (`check_source`: the ETL's fingerprint of its file
names and sizes, recorded in the manifest's provenance): another copy of the data may differ
legitimately (files re-compressed, patients added), so it is a warning, not a refusal, and the
headline itself says it. Warnings go to stderr, the tables and headline to stdout.

This module runs the levels in order (`main`) and holds levels 1 and 2; the checks are in
`train.apply.evaluate_checks`, level 3 in `train.apply.evaluate_native`, the tables, JSON and CSV
in `train.apply.evaluate_output` (their public names are importable from here too).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards_spec.progress import Progress

from ..config.options import check_option
from ..data import ShardDataset, iter_patients, stack_volume
from ..metrics import (
    BRATS,
    PATIENT_KEYS,
    THRESHOLD,
    UNDEFINED,
    patient_counts,
    probs_to_labels,
    scores_of,
    summarize_patients,
)
from ..recipe.losses import build_loss
from ..runfiles import checkpoint as ckpt
from ..runtime.distributed import Dist
from ..training import engine
from . import evaluate_native, inference
from .evaluate_checks import (
    EvaluateError,
    check_outputs,
    check_shards,
    check_source,
    evaluate_inputs,
    scan_src,
    warn,
)
from .evaluate_native import count_metric_names, native_grid, native_metric_names
from .evaluate_output import headline, patients_csv, print_tables, write_outputs
from .postprocess import relabel_small_et, scaled_threshold

AVERAGES = {
    "slice_level": ("dataset-level: TP/FP/FN of each output channel of the label map (the label rule of predict, as "
                    "the trainer validates) summed over every slice of the split on the shard grid, then one score per channel; "
                    "NaN (null) for a channel with no voxel in prediction or truth, left out of mean_dice"),
    "shard_grid": ("per patient on the shard grid (slices gathered into a volume, labels by the checkpoint's rule, "
                   "zero where the shards store background), then mean/median/sample std over patients; "
                   "BraTS 2020 rule: both empty -> 1; 'dataset_counts' sums the same TP/FP/FN over patients"),
    "native_grid": evaluate_native.AVERAGE,
}


def main(checkpoint: Path | Sequence[Path], shards: str, split: str = "val", src: Path | None = None,
         json_path: Path | None = None, device: str = "auto", batch_size: int = 32, workers: int = 2,
         cache_dir: str | None = None, csv_path: Path | None = None, console: Any = None,
         storage_options: dict | None = None, lesion_wise: bool = False, tta: bool = False,
         min_et_voxels: int = 0, overwrite: bool = False) -> dict:
    """Evaluate `checkpoint` (or an ensemble of several) on `split` of `shards` (and on `src`); print,
    write and return the results. `tta` and `min_et_voxels` (`inference.InferenceOptions`) apply
    to the patient levels; the slice level stays the trainer's validation of the first checkpoint.
    Warnings go to stderr (to `console` when one is given)."""
    from rich.console import Console

    from shards_spec.read import ShardStore

    warn_console = console or Console(stderr=True, soft_wrap=True)
    console = console or Console(soft_wrap=True)
    check_options(batch_size, workers, lesion_wise, src, min_et_voxels, device)
    paths = inference.checkpoint_paths(checkpoint)
    outputs = output_paths(json_path, csv_path)
    store = ShardStore(shards, cache_dir=cache_dir, storage_options=storage_options)
    manifest = store.manifest
    manifest.require_split(split)
    scan = scan_src(Path(src)) if src is not None else None
    check_outputs(outputs, evaluate_inputs(paths, store, scan), overwrite)
    source = check_source(manifest, scan) if scan is not None else None

    options = inference.InferenceOptions(tta=tta, min_et_voxels=min_et_voxels)
    loaded = inference.load_ensemble(paths, device, options=options)
    warnings = check_shards(loaded, manifest, shards)
    warnings += loaded.warnings
    if source is not None and source["warning"]:
        warnings.append(source["warning"])
    for line in warnings:
        warn(warn_console, line)

    results = _results_head(paths, loaded, shards, split, manifest, tta, min_et_voxels, warnings)
    results["slice_level"] = slice_level(loaded, store, split, batch_size, workers)
    results["shard_grid"] = shard_grid(loaded, store, split, batch_size, console)
    results["native_grid"] = None
    if scan is not None:
        results["native_grid"] = native_grid(loaded, manifest, split, Path(src), batch_size, console, lesion_wise,
                                             scan=scan, warn_console=warn_console)
        results["native_grid"]["source"] = {k: v for k, v in (source or {}).items() if k != "warning"}
    results["headline"] = headline(results)
    print_tables(results, console)
    write_outputs(results, outputs, overwrite, console)
    return results


def output_paths(json_path: Path | None, csv_path: Path | None) -> dict[str, Path]:
    """The outputs asked for, option -> path; the CSV defaults to `<json stem>_patients.csv` beside the JSON."""
    if csv_path is None and json_path is not None:
        csv_path = Path(json_path).with_name(Path(json_path).stem + "_patients.csv")
    return {name: Path(p) for name, p in (("--json", json_path), ("--csv", csv_path)) if p is not None}


def _results_head(paths: Sequence[Path], loaded: inference.LoadedModel, shards: str, split: str, manifest: Any,
                  tta: bool, min_et_voxels: int, warnings: list[str]) -> dict[str, Any]:
    """What was evaluated, on what and how: the first keys of the results, before the levels."""
    return {
        "checkpoint": {"path": str(paths[0]), "ensemble": [str(p) for p in paths], "epoch": loaded.epoch, "variant": loaded.variant,
                       "model": loaded.config.get("model"), "channels": loaded.channels, "target": loaded.target,
                       "best_mean_dice": loaded.best_mean_dice},
        "shards": str(shards),
        "split": split,
        "manifest_digest": {"checkpoint": loaded.manifest_digest, "shards": manifest.digest,
                            "match": loaded.manifest_digest == manifest.digest},
        "threshold": THRESHOLD,
        "inference": {"tta": tta, "min_et_voxels": min_et_voxels, "models": len(paths),
                      "applies_to": "shard_grid and native_grid (slice_level is the first checkpoint's validation)"},
        "warnings": warnings,
    }


# ---------------------------------------------------------------- checks of the options


def check_options(batch_size: int, workers: int, lesion_wise: bool, src: Path | None, min_et_voxels: int,
                  device: str = "auto") -> None:
    """The option values, before anything is read: those `train run` shares checked as it checks
    them (`check_option`), within its limits (`train.runfiles.checkpoint.size_problem`: `--workers`
    at most `BRATS_SHARDS_MAX_WORKERS` loader processes), the rest in range."""
    for name, value in (("device", device), ("batch_size", batch_size), ("workers", workers)):
        check_option(name, value)
    problem = ckpt.size_problem({"batch_size": batch_size, "workers": workers})
    if problem is not None:
        raise EvaluateError(f"--{problem[0].replace('_', '-')}: {problem[1]}")
    if lesion_wise and src is None:
        raise EvaluateError("--lesion-wise: needs --src (lesion-wise scores are taken on the native grid)")
    if min_et_voxels < 0:
        raise EvaluateError(f"--min-et-voxels: must be >= 0, got {min_et_voxels}")


# ---------------------------------------------------------------- 1. slice level


def slice_level(loaded: inference.LoadedModel, store: Any, split: str, batch_size: int, workers: int) -> dict:
    """The trainer's validation (`train.training.engine.validate`) on `split`, as the run logged it."""

    dataset = ShardDataset(store, split=split, channels=loaded.channels, target=loaded.target, shuffle=False,
                           context=loaded.context)
    loader = engine.make_loader(dataset, batch_size, workers, loaded.device, seed=0)
    config = loaded.config
    amp = engine.autocast_dtype(bool(config.get("amp", True)), config.get("amp_dtype", "auto"), loaded.device)
    loss_name = str(config.get("loss", "dice"))
    try:
        with started_workers(loader, workers) as batches:
            validation = engine.validate(loaded.model, batches, build_loss(loss_name), loaded.device, amp, Dist(),
                                         loaded.target, brain_channels=len(loaded.channels))
    except ValueError as exc:  # e.g. a grid the model cannot take (H, W not divisible by 2**depth)
        raise EvaluateError(f"the model cannot be applied to these shards' slices ({exc})") from None
    names = list(loaded.channel_names)
    scores = validation.scores()
    dice = [float(v) for v in scores["dice"]]
    counts = validation.counts.tolist()
    return {
        "average": AVERAGES["slice_level"],
        "channels": names,
        "slices": dataset.num_slices,
        "loss": float(validation.loss),
        "loss_name": loss_name,
        "autocast": None if amp is None else str(amp).replace("torch.", ""),
        "mean_dice": validation.mean_dice(),
        "undefined": [n for n, d in zip(names, dice) if math.isnan(d)],
        **{metric: {n: float(v) for n, v in zip(names, scores[metric])} for metric in count_metric_names()},
        "counts": {n: {"tp": int(counts[0][i]), "fp": int(counts[1][i]), "fn": int(counts[2][i])}
                   for i, n in enumerate(names)},
    }


@contextlib.contextmanager
def started_workers(loader: Any, workers: int) -> Iterator[Any]:
    """`train.training.engine.batches(loader)`, with loader workers that cannot all be started (a process
    or file limit: `fork` fails with EAGAIN or EMFILE) one line. The workers already started are
    killed: they ignore SIGTERM (`engine.loader_worker_init`), so left alive they would hold the
    process's exit forever."""
    import multiprocessing


    before = set(multiprocessing.active_children())
    with contextlib.ExitStack() as stack:
        try:
            batches = stack.enter_context(engine.batches(loader))
        except OSError as exc:
            if not workers:
                raise
            for child in set(multiprocessing.active_children()) - before:
                child.kill()
                child.join(5)
            _disarm_half_built_iterator(exc)
            raise EvaluateError(f"--workers {workers}: the loader's worker processes cannot be started "
                                f"({exc.strerror or exc}: a limit on processes or open files?); give fewer "
                                "--workers, or 0 to read in this process") from None
        yield batches


def _disarm_half_built_iterator(exc: BaseException) -> None:
    """torch's loader iterator whose construction `exc` interrupted would, when collected, try to
    shut down workers it never finished recording and print an ignored AttributeError: its
    workers are dead already (`started_workers`), so mark it shut down."""
    tb = exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if hasattr(candidate, "_shutdown_workers") and hasattr(candidate, "_shutdown"):
            candidate._shutdown = True
        tb = tb.tb_next


# ---------------------------------------------------------------- 2. shard grid


@dataclass
class ShardPatient:
    """One patient predicted on the shard grid: its slices, labels and scores."""

    patient: Any  # train.data.PatientSlices
    pred: np.ndarray  # uint8 (S, H, W) label map by the checkpoint's rule, 0 where the shards store background
    counts: dict[str, dict[str, int]]  # PATIENT_KEYS -> {tp, fp, fn}

    def scores(self) -> dict[str, dict[str, float]]:
        return {k: scores_of(c, BRATS) for k, c in self.counts.items()}


def shard_grid_patients(loaded: inference.LoadedModel, store: Any, split: str, batch_size: int,
                        channels: list[str] | None = None) -> Iterator[ShardPatient]:
    """Each patient of `split` predicted on the shard grid and counted against its mask; the
    one loop behind `evaluate`'s shard-grid level and the report's slice pictures. `channels`
    selects what the patient's image holds (default: the model's inputs, in its order)."""

    wanted = channels or loaded.channels
    index = [wanted.index(c) for c in loaded.channels]
    for patient in iter_patients(store, split, wanted):
        images = stack_volume(patient.image[:, index], patient.slice_index, loaded.context)
        probs = inference.predict_slices(loaded, images, batch_size)
        pred = probs_to_labels(probs, loaded.target, threshold=THRESHOLD, channel_axis=1)
        pred[np.all(patient.image == 0, axis=1)] = 0  # background as the shards store it
        if loaded.options.min_et_voxels:
            threshold = scaled_threshold(loaded.options.min_et_voxels, patient.info.get("source_shape"), loaded.size)
            pred = relabel_small_et(pred, threshold)
        yield ShardPatient(patient, pred, patient_counts(pred, patient.mask))


def shard_grid(loaded: inference.LoadedModel, store: Any, split: str, batch_size: int, console: Any) -> dict:
    """Patient-level scores on the shard grid (see the module docstring, level 2)."""
    per_patient, totals = [], {k: {"tp": 0, "fp": 0, "fn": 0} for k in PATIENT_KEYS}
    patients = store.manifest.patients_of(split)
    with Progress(console, f"patients of {split} (shard grid)", len(patients)) as advance:
        for item in shard_grid_patients(loaded, store, split, batch_size):
            for key, c in item.counts.items():
                for name in ("tp", "fp", "fn"):
                    totals[key][name] += c[name]
            per_patient.append({"patient": item.patient.patient, "slices": int(item.patient.mask.shape[0]),
                                "scores": item.scores(),
                                "voxels": {k: {"truth": c["tp"] + c["fn"], "pred": c["tp"] + c["fp"]}
                                           for k, c in item.counts.items()}})
            advance()
    return {
        "average": AVERAGES["shard_grid"],
        "patients": len(per_patient),
        "summary": summarize_patients(per_patient, count_metric_names()),
        "dataset_counts": {k: {**c, **scores_of(c, UNDEFINED)} for k, c in totals.items()},
        "per_patient": per_patient,
    }


__all__ = ["AVERAGES", "EvaluateError", "ShardPatient", "check_options", "check_outputs", "check_shards", "check_source",
           "count_metric_names", "evaluate_inputs", "headline", "main", "native_grid", "native_metric_names",
           "output_paths", "patients_csv", "print_tables", "scan_src", "shard_grid", "shard_grid_patients",
           "slice_level"]
