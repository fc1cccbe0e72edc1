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
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from shards_spec.errors import ToolError
from shards_spec.fileio import write_atomic
from shards_spec.progress import Progress

from ..data import ShardDataset, iter_patients, stack_volume
from ..metrics import (
    BRATS,
    BRATS_MAX_HD95,
    COUNT_METRICS,
    PATIENT_KEYS,
    THRESHOLD,
    UNDEFINED,
    label_masks,
    patient_counts,
    patient_scores,
    probs_to_labels,
    scores_of,
    summarize_patients,
)
from ..metrics.lesionwise import LESION_MAX_HD95, LESION_METRICS, lesionwise_scores, summarize_lesionwise
from ..recipe.losses import build_loss
from ..runfiles import checkpoint as ckpt
from ..runtime.distributed import Dist
from ..training import engine
from . import inference
from .postprocess import relabel_small_et, scaled_threshold


def count_metric_names() -> tuple[str, ...]:
    """The registered count scores (dice, precision, recall, ...), read when used so that a metric
    registered after import is included."""
    return tuple(COUNT_METRICS)


def native_metric_names() -> tuple[str, ...]:
    return (*count_metric_names(), "hd95")

AVERAGES = {
    "slice_level": ("dataset-level: TP/FP/FN of each output channel of the label map (the label rule of predict, as "
                    "the trainer validates) summed over every slice of the split on the shard grid, then one score per channel; "
                    "NaN (null) for a channel with no voxel in prediction or truth, left out of mean_dice"),
    "shard_grid": ("per patient on the shard grid (slices gathered into a volume, labels by the checkpoint's rule, "
                   "zero where the shards store background), then mean/median/sample std over patients; "
                   "BraTS 2020 rule: both empty -> 1; 'dataset_counts' sums the same TP/FP/FN over patients"),
    "native_grid": ("per patient on the native grid (predicted from the source volumes exactly as `train predict`, "
                    "scored against the original segmentation), then mean/median/sample std over patients; "
                    f"BraTS 2020 rule: both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 "
                    f"{BRATS_MAX_HD95} mm; HD95 in mm as MONAI computes it"),
}


class EvaluateError(ToolError):
    """Shards or a source that this checkpoint cannot be evaluated on."""


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
    check_options(batch_size, workers, lesion_wise, src, min_et_voxels)
    paths = inference.checkpoint_paths(checkpoint)
    if csv_path is None and json_path is not None:
        csv_path = Path(json_path).with_name(Path(json_path).stem + "_patients.csv")
    outputs = {name: Path(p) for name, p in (("--json", json_path), ("--csv", csv_path)) if p is not None}
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
        _warn(warn_console, line)

    results: dict[str, Any] = {
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
    results["slice_level"] = slice_level(loaded, store, split, batch_size, workers)
    results["shard_grid"] = shard_grid(loaded, store, split, batch_size, console)
    results["native_grid"] = None
    if scan is not None:
        results["native_grid"] = native_grid(loaded, manifest, split, Path(src), batch_size, console, lesion_wise,
                                             scan=scan, warn_console=warn_console)
        results["native_grid"]["source"] = {k: v for k, v in (source or {}).items() if k != "warning"}

    results["headline"] = headline(results)
    print_tables(results, console)
    texts = {"--json": json.dumps(_clean(results), indent=1, allow_nan=False) + "\n", "--csv": patients_csv(results)}
    if not overwrite:
        check_outputs(outputs, {}, overwrite)  # again: another process may have written one meanwhile
    for name, path in outputs.items():
        _write(path, texts[name])
        console.print(f"wrote {path}", highlight=False)
    return results


def _warn(console: Any, line: str) -> None:
    from rich.markup import escape

    console.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False)


# ---------------------------------------------------------------- checks


def check_options(batch_size: int, workers: int, lesion_wise: bool, src: Path | None, min_et_voxels: int) -> None:
    """The option values, before anything is read: sizes within `train run`'s limits
    (`train.runfiles.checkpoint.size_problem`: `--workers` at most `BRATS_SHARDS_MAX_WORKERS` loader
    processes), the rest in range."""
    problem = ckpt.size_problem({"batch_size": batch_size, "workers": workers})
    if problem is not None:
        raise EvaluateError(f"--{problem[0].replace('_', '-')}: {problem[1]}")
    if lesion_wise and src is None:
        raise EvaluateError("--lesion-wise: needs --src (lesion-wise scores are taken on the native grid)")
    if min_et_voxels < 0:
        raise EvaluateError(f"--min-et-voxels: must be >= 0, got {min_et_voxels}")


def scan_src(src: Path) -> Any:
    """The `--src` scan (names, sizes and headers only: cheap), done before any work so that its
    files are protected from the outputs and its fingerprint is checked."""
    from etl.sources import scan_source

    return scan_source(src, require_labels=True)


def evaluate_inputs(checkpoints: Sequence[Path], store: Any, scan: Any) -> dict[Path, str]:
    """What an output must never be (path -> what it is): the checkpoints, a local shard
    folder's manifest and listed files, `--src` and every source file or folder its patients
    are read from (a folder protects everything inside it)."""
    from shards_spec.manifest import MANIFEST_NAME
    from shards_spec.read import is_url

    inputs = {Path(p): "the input --checkpoint" for p in checkpoints}
    if not is_url(store.root):
        inputs[Path(store.location(MANIFEST_NAME))] = "the shards' manifest"
        for entry in store.manifest.content["shards"]:
            for item in entry["files"]:
                inputs[Path(store.location(item["path"]))] = "a shard file"
    if scan is not None:
        inputs[Path(scan.root)] = "inside --src, the source data"
        for ref in scan.patients:
            for path in ref.files.values():
                inputs[Path(path)] = f"the source file of patient {ref.id}"
    return inputs


def check_outputs(outputs: dict[str, Path], inputs: dict[Path, str], overwrite: bool) -> None:
    """Refuse, in one line and before any work, an output that is an input (always: compared as
    files on disk, so a symbolic link, `..` or a hard link to one is refused too) or lies inside
    an input folder, a folder, the other output, or an existing file (unless `overwrite`)."""
    files = {_identity(p): (p, what) for p, what in inputs.items() if _identity(p) is not None and p.is_file()}
    folders = [(Path(os.path.realpath(p)), p, what) for p, what in inputs.items() if p.is_dir()]
    seen: dict[Any, str] = {}
    for name, path in outputs.items():
        identity = _identity(path)
        if identity in files:
            source, what = files[identity]
            raise EvaluateError(f"is {what} ({source}): evaluate never writes over its inputs; give another {name}",
                                path)
        real = Path(os.path.realpath(path))
        for folder, given, what in folders:
            if real == folder or folder in real.parents:
                raise EvaluateError(f"is {what} ({given}): evaluate never writes into its inputs; give another {name}",
                                    path)
        if os.path.isdir(path):
            raise EvaluateError(f"is a folder; {name} writes a file", path)
        parent = next((a for a in Path(path).absolute().parents if os.path.lexists(a)), None)
        if parent is not None and not parent.is_dir():
            raise EvaluateError(f"cannot be written: {parent} is not a folder", path)
        key = identity or real
        if key in seen:
            raise EvaluateError(f"is also the {seen[key]} output; give {name} another file", path)
        seen[key] = name
        if os.path.lexists(path) and not overwrite:
            raise EvaluateError(f"exists already; pass --overwrite to replace it (or give another {name})", path)


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of the file `path` reaches (links followed, `..` resolved); None if none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_source(manifest: Any, scan: Any) -> dict:
    """`--src` against the source the shards were built from: the ETL's fingerprint
    (`etl.sources.source_fingerprint`: layout, file names and sizes) of this scan and the one
    the manifest's provenance records. A warning line when they differ; nothing to compare
    (`match` None) when the manifest records none."""
    from etl.sources import source_fingerprint

    recorded = ((manifest.provenance or {}).get("source") or {}).get("fingerprint")
    found = source_fingerprint(scan)
    match = None if not recorded else found == recorded
    warning = None
    if match is False:
        warning = (f"--src {scan.root} is not the source these shards were built from: its fingerprint (layout, "
                   f"file names and sizes) {found[:12]} differs from the manifest's {recorded[:12]} (another copy, "
                   "or files added, removed or changed since the build); the native-grid scores and the headline "
                   "compare with its segmentations")
    return {"fingerprint": found, "shards_fingerprint": recorded, "match": match, "warning": warning}


def check_shards(loaded: inference.LoadedModel, manifest: Any, shards: str) -> list[str]:
    """Refuse shards without the model's channels; warn about other data or another grid."""
    missing = [c for c in loaded.channels if c not in manifest.channels]
    if missing:
        raise EvaluateError(f"the checkpoint was trained on {','.join(loaded.channels)} but these shards hold "
                            f"{','.join(manifest.channels)} (no {','.join(missing)})", shards)
    warnings = []
    if loaded.manifest_digest != manifest.digest:
        warnings.append(f"these shards (content digest {manifest.digest[:12]}) are not the ones the checkpoint was "
                        f"trained on (digest {loaded.manifest_digest[:12]}): evaluating on other data")
    pre = manifest.content["preprocessing"]
    if int(pre["size"]) != loaded.size or pre.get("norm") != loaded.norm:
        warnings.append(f"these shards were cut at size {pre['size']} with norm {pre.get('norm')}, the checkpoint's "
                        f"data at size {loaded.size} with norm {loaded.norm}: shard-grid scores use the shards as "
                        "they are, --src uses the checkpoint's settings")
    return warnings


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


# ---------------------------------------------------------------- 3. native grid


def native_grid(loaded: inference.LoadedModel, manifest: Any, split: str, src: Path, batch_size: int,
                console: Any, lesion_wise: bool = False, scan: Any = None, warn_console: Any = None) -> dict:
    """Patient-level scores on the native grid from the source volumes (level 3, the headline).
    `scan`: `src` already scanned (`scan_src`); warnings go to `warn_console` (default `console`)."""
    from etl.sources import SOURCES, load_patient


    warn_console = warn_console or console
    source = manifest.content.get("source") or {}
    scan = scan if scan is not None else scan_src(src)
    by_id = {ref.id: ref for ref in scan.patients}
    wanted = manifest.patients_of(split)
    missing = [p for p in wanted if p not in by_id]
    if len(missing) == len(wanted):
        raise EvaluateError(f"--src: none of the {len(wanted)} patient(s) of split {split!r} is in this "
                            f"{scan.layout} source (first: {wanted[0] if wanted else '-'})", src)
    if missing:
        reasons = [str(p) for p in scan.problems if any(m in str(p) for m in missing)]
        _warn(warn_console, f"{len(missing)} of {len(wanted)} patient(s) of {split!r} not found (or unreadable) in "
                            f"--src, left out: {', '.join(missing[:5])}" + (f" ... ({'; '.join(reasons[:2])})" if reasons else ""))
    layout = SOURCES.get(scan.layout)
    # the layout's own options as the ETL recorded them (e.g. the Kaggle channel order), else its defaults
    layout_options = layout.resolve_options(source) if layout is not None else {}
    empty = {k: {"both_empty": 0, "truth_empty_pred_not": 0, "pred_empty_truth_not": 0} for k in PATIENT_KEYS}
    per_patient, warnings = [], []
    present = [p for p in wanted if p in by_id]
    with Progress(console, f"patients of {split} (native grid, --src)", len(present)) as advance:
        for pid in present:
            ref = by_id[pid]
            volume = load_patient(ref, channels=loaded.channels, require_labels=True, **layout_options)
            expected = manifest.content["patients"][pid].get("source_shape")
            if expected is not None and list(volume.shape) != list(expected):
                warnings.append(f"{pid}: source shape {'x'.join(map(str, volume.shape))} differs from the "
                                f"shards' record {'x'.join(map(str, expected))} (another copy of the data?)")
            prediction = inference.predict_volume(loaded, volume.volume, volume.brain, batch_size=batch_size)
            scores = patient_scores(prediction.labels, volume.labels, volume.spacing)
            pred_masks, truth_masks = label_masks(prediction.labels), label_masks(volume.labels)
            voxels = {}
            for key in PATIENT_KEYS:
                n_pred, n_truth = int(pred_masks[key].sum()), int(truth_masks[key].sum())
                voxels[key] = {"truth": n_truth, "pred": n_pred}
                if n_pred == 0 and n_truth == 0:
                    empty[key]["both_empty"] += 1
                elif n_truth == 0:
                    empty[key]["truth_empty_pred_not"] += 1
                elif n_pred == 0:
                    empty[key]["pred_empty_truth_not"] += 1
            per_patient.append({"patient": pid, "shape": list(volume.shape),
                                "spacing": [float(s) for s in volume.spacing], "scores": scores, "voxels": voxels})
            if lesion_wise:
                per_patient[-1]["lesion_wise"] = lesionwise_scores(prediction.labels, volume.labels, volume.spacing)
            del volume, prediction
            advance()
    for line in warnings:
        _warn(warn_console, line)
    return {
        "average": AVERAGES["native_grid"],
        "src": str(src),
        "layout": scan.layout,
        "patients": len(per_patient),
        "missing": missing,
        "warnings": warnings,
        "empty_cases": empty,
        "summary": summarize_patients(per_patient, native_metric_names()),
        "lesion_wise": summarize_lesionwise([p["lesion_wise"] for p in per_patient]) if lesion_wise else None,
        "per_patient": per_patient,
    }


# ---------------------------------------------------------------- summaries and output


def print_tables(results: dict, console: Any) -> None:
    """The terminal summary: one table per level, each titled with its average (cells never
    wrapped: `shards_spec.cli.print_table`)."""
    from rich.table import Table

    from shards_spec.cli import print_table

    ck = results["checkpoint"]
    digest = results["manifest_digest"]
    console.print(f"{ck['path']}: {ck['model']} epoch {ck['epoch']}, channels {','.join(ck['channels'])}, target "
                  f"{ck['target']}; split {results['split']} of {results['shards']} "
                  f"({'the shards it was trained on' if digest['match'] else 'OTHER shards than it was trained on'})",
                  highlight=False)
    sl = results["slice_level"]
    table = Table(title=f"slice level: TP/FP/FN summed over {sl['slices']} slices (as in training), shard grid")
    table.add_column("channel")
    for m in count_metric_names():
        table.add_column(m, justify="right")
    for name in sl["channels"]:
        table.add_row(name, *(_fmt(sl[m][name]) for m in count_metric_names()))
    table.add_row("mean", _fmt(sl["mean_dice"]), *[""] * (len(count_metric_names()) - 1), end_section=True)
    print_table(console, table)
    if sl["undefined"]:
        console.print(f"{', '.join(sl['undefined'])}: no voxel in prediction or truth: NaN, left out of the mean")
    grid = results["shard_grid"]
    print_table(console, _patient_table(grid, count_metric_names(), f"patient level, shard grid: mean ± std (median) over "
                                                f"{grid['patients']} patients"))
    native = results.get("native_grid")
    if native:
        print_table(console, _patient_table(native, native_metric_names(), f"patient level, native grid (--src, headline): "
                                                             f"mean ± std (median) over {native['patients']} patients",
                                     native.get("lesion_wise")))
        if native.get("lesion_wise"):
            console.print("lesion-wise (BraTS 2023+, brats-evaluation's glioma rule): mean Dice / HD95 over matched "
                          f"lesions, {LESION_MAX_HD95:g} mm when none matched; lesions matched/FP/FN summed over "
                          "patients; patients with no lesion in either left out", highlight=False)
        cases = [f"{k} {c['both_empty']}/{c['truth_empty_pred_not']}/{c['pred_empty_truth_not']}"
                 for k, c in native["empty_cases"].items()
                 if c["both_empty"] or c["truth_empty_pred_not"] or c["pred_empty_truth_not"]]
        if cases:
            console.print("empty cases (both empty -> Dice 1, HD95 0 / truth empty, prediction not -> Dice 0, HD95 "
                          f"{BRATS_MAX_HD95} / prediction empty, truth not -> Dice 0, HD95 {BRATS_MAX_HD95}): "
                          + "; ".join(cases), highlight=False)
    console.print(results["headline"], highlight=False)


def headline(results: dict) -> str:
    """One line: the mean Dice over the BraTS regions WT, TC, ET, per patient then averaged, on the
    native grid when `--src` was given (the number comparable with published results), else on the
    shard grid, and said which; a `--src` that is not the shards' source (`check_source`) is named."""
    block = results.get("native_grid") or results["shard_grid"]
    grid = "native grid" if results.get("native_grid") else "shard grid (no --src)"
    if (block.get("source") or {}).get("match") is False:
        grid += " of a --src that is NOT the source the shards were built from"
    dice = {k: block["summary"][k]["dice"]["mean"] for k in ("WT", "TC", "ET")}
    mean = float(np.mean(list(dice.values())))
    inference = results.get("inference") or {}
    used = [f"{inference['models']} models" if inference.get("models", 1) > 1 else "",
            "mirroring TTA" if inference.get("tta") else "",
            f"ET below {inference['min_et_voxels']} voxels -> NEC/NET" if inference.get("min_et_voxels") else ""]
    used = [u for u in used if u]
    return (f"mean Dice over WT/TC/ET: {mean:.3f} (WT {dice['WT']:.3f}, TC {dice['TC']:.3f}, ET {dice['ET']:.3f}; "
            f"per patient on the {grid}, mean over {block['patients']} patients"
            + (f"; {', '.join(used)}" if used else "") + ")")


def _patient_table(block: dict, metrics: Iterable[str], title: str, lesion_wise: dict | None = None) -> Any:
    from rich.table import Table

    metrics = list(metrics)
    table = Table(title=title)
    table.add_column("class / region")
    for m in metrics:
        table.add_column(m + (" (mm)" if m == "hd95" else ""), justify="right")
    if lesion_wise:
        for name in ("lesion dice", "lesion hd95 (mm)", "lesions TP/FP/FN"):
            table.add_column(name, justify="right")
    for key in PATIENT_KEYS:
        row = []
        for m in metrics:
            s = block["summary"][key][m]
            row.append(f"{_fmt(s['mean'])} ± {_fmt(s['std'])} ({_fmt(s['median'])})")
        if lesion_wise:
            row += _lesion_cells(lesion_wise, key)
        table.add_row(key, *row)
    return table


def _lesion_cells(lesion_wise: dict, key: str) -> list[str]:
    """Lesion-wise Dice, HD95 and lesion counts of a region (blank for the classes)."""
    if key not in lesion_wise["summary"]:
        return ["", "", ""]
    s, n = lesion_wise["summary"][key], lesion_wise["lesions"][key]
    cells = [f"{_fmt(s[m]['mean'])} ± {_fmt(s[m]['std'])} ({_fmt(s[m]['median'])})" for m in ("dice", "hd95")]
    return cells + [f"{n['tp']}/{n['fp']}/{n['fn']}"]


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def patients_csv(results: dict) -> str:
    """One row per patient and grid: dice_K, precision_K, recall_K, hd95_K (native only), voxels."""
    keys = list(PATIENT_KEYS)
    columns = ["patient", "grid"]
    for m in native_metric_names():
        columns += [f"{m}_{k}" for k in keys]
    columns += [f"truth_voxels_{k}" for k in keys] + [f"pred_voxels_{k}" for k in keys]
    native = results.get("native_grid") or {}
    lesion_columns = [(m, r) for m in LESION_METRICS for r in (native.get("lesion_wise") or {}).get("summary", {})]
    columns += [f"lesion_{m}_{r}" for m, r in lesion_columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for grid_name, block in (("shard", results["shard_grid"]), ("native", results.get("native_grid"))):
        if not block:
            continue
        for p in block["per_patient"]:
            row: list[Any] = [p["patient"], grid_name]
            for m in native_metric_names():
                row += [_cell(p["scores"][k].get(m)) for k in keys]
            row += [p["voxels"][k]["truth"] for k in keys] + [p["voxels"][k]["pred"] for k in keys]
            lesions = p.get("lesion_wise")
            row += [_cell(float(lesions[r][m])) if lesions else "" for m, r in lesion_columns]
            writer.writerow(row)
    return buffer.getvalue()


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else repr(float(value))


def _clean(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is strict."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write(path: Path, text: str) -> None:
    """Write one output atomically (`write_atomic`); a refused write is one line naming it."""
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise EvaluateError(f"cannot write ({exc.strerror or exc})", path) from None


__all__ = ["EvaluateError", "ShardPatient", "check_outputs", "check_source", "main", "native_grid", "shard_grid",
           "shard_grid_patients", "slice_level"]
