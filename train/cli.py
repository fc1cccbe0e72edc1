"""`train`: run, evaluate, predict, report (typer; heavy imports happen inside the commands).

The commands are thin: they parse the options and call the Python API (`train.api.train` or
`resume`, `train.api.evaluate`) or `train.apply.predict.main(...)` (which predicts through
`train.api.Predictor`) and `train.reporting.report.main(run_dir)` with keyword arguments, so each
command's module holds all of its logic.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from shards_spec.cli import make_app
from shards_spec.errors import ToolError, run_cli

from .runtime.bounded import TIMEOUT_ENV, TIMEOUT_LIMITS

app = make_app(
    "train",
    help="Train, evaluate and apply 2D U-Nets on BraTS slice shards (see `train COMMAND --help`).\n\n"
         "Add --debug to any command for the traceback of an error.",
    libraries=("torch", "numpy"),
)

RUN_HELP = """Train v1 (U-Net, t1ce+flair, Dice) or v2 (attention U-Net, 4 channels, Dice+BCE,
light augmentation) on slice shards, streaming them with bounded memory.

Writes OUT/config.json (resolved options + the shards' content digest), OUT/metrics.csv (one
row per epoch), OUT/checkpoints/last.pt (every epoch) and best.pt (best validation mean Dice).

Options not given come from --config FILE, then from the variant's preset (the defaults shown;
"on CPU" / "on CUDA": the device's sizes), or, with --resume, from the run itself.

\b
Examples:
  train run --shards shards/ --variant v1 --out runs/v1 --epochs 50 \\
      --time-budget 11h30m
  train run --out runs/v1 --resume --epochs 80
  train run --config run.toml --lr 3e-4
  train run --config runs/v1/config.json --out runs/v1-seed1 --seed 1
  train run --shards https://host/shards/ --variant v2 --val-split fold0 \\
      --cache-dir ~/.cache/brats
  train run --shards s3://lab-bucket/shards --variant v1 \\
      --storage-option endpoint_url=http://minio.lab:9000
  torchrun --standalone --nproc-per-node 2 --no-python \\
      train run --shards shards/ --variant v2 --out runs/v2-ddp

Exit codes: 0 done (also when --time-budget stopped the run, with a checkpoint), 2 bad input
(one line), 130 / 143 stopped by SIGINT / SIGTERM (the partial epoch is lost, the last completed
epoch's checkpoint is kept; continue with --resume).
"""


STORAGE_OPTION_HELP = ("fsspec option for a shard URL, KEY=VALUE (repeatable; VALUE may be JSON), e.g. "
                       "endpoint_url=http://minio.lab:9000 or anon=true; credentials: AWS_* variables or ~/.aws/.")
RUN_STORAGE_OPTION_HELP = STORAGE_OPTION_HELP + " Not saved with the run: give it again on --resume."
TRACKING_BOUND_HELP = (f"Each tracker call may take {TIMEOUT_LIMITS['TRACKING_TIMEOUT']:g} s ({TIMEOUT_ENV}); a "
                       "failure or a stall is one warning and training goes on (before the start: one line).")
DEVICE_HELP = ("auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda (GPU 0; under torchrun each "
               "rank's GPU LOCAL_RANK), cuda:N (GPU N) or mps (Apple silicon).")
CONFIG_HELP = ("Options from a TOML file (epochs = 80, batch-size = 16, channels = [\"t1ce\", \"flair\"]) "
               "or a run's config.json (all but its out); options given here override the file's.")


def _storage_options(pairs: list[str] | None) -> dict:
    from shards_spec.read import parse_storage_options

    return parse_storage_options(pairs)


def _default(text: str, shown: object) -> str:
    """Help text ending with its default in click's words (`[default: 50]`): `train run`'s
    options default to None (= not given, so --config and --resume can fill them), and on/off
    options say on or off rather than typer's `no-NAME`."""
    return f"{text}  [default: {shown}]"


@app.command("run", help=RUN_HELP, no_args_is_help=True)
def run_command(
    shards: Optional[str] = typer.Option(None, help="Shard folder or URL (holding manifest.json); required for a new run."),
    variant: Optional[str] = typer.Option(None, help="Preset: v1 or v2; required for a new run."),
    out: Optional[str] = typer.Option(None, help=_default("Run folder.", "runs/<variant>-<timestamp>")),
    config: Optional[Path] = typer.Option(None, "--config", metavar="<file>", help=CONFIG_HELP),
    resume: bool = typer.Option(False, "--resume/--no-resume", show_default=False, help=_default("Continue OUT from checkpoints/last.pt, exactly.", "off")),
    force: bool = typer.Option(False, "--force/--no-force", show_default=False, help=_default("Overwrite an existing run; on --resume accept other shards or options.", "off")),
    epochs: Optional[int] = typer.Option(None, help=_default("Epochs in total (also when resuming), at most 100000.", 50)),
    time_budget: Optional[str] = typer.Option(None, help="Wall-clock limit: 12h, 90m, 600s, 1h30m; holds within one step plus the final validation, and leaves a checkpoint that --resume continues."),
    early_stop: Optional[int] = typer.Option(None, help="Stop when the validation mean Dice has not improved for N validations.  [default: off]"),
    batch_size: Optional[int] = typer.Option(None, help=_default("Slices per batch (per rank under torchrun).", "16 on CPU, 32 on CUDA")),
    lr: Optional[float] = typer.Option(None, help=_default("Adam learning rate, in (0, 1].", 0.001)),
    weight_decay: Optional[float] = typer.Option(None, help=_default("Adam weight decay, in [0, 1].", 0)),
    schedule: Optional[str] = typer.Option(None, help=_default("Learning rate: cosine (warm-up then cosine decay per step), poly (nnU-Net's) or plateau (ReduceLROnPlateau on validation Dice).", "cosine")),
    warmup: Optional[int] = typer.Option(None, help=_default("Linear warm-up steps of cosine/poly (at most a tenth of the schedule).", 100)),
    plateau_factor: Optional[float] = typer.Option(None, help=_default("--schedule plateau: factor the rate is cut by.", 0.5)),
    plateau_patience: Optional[int] = typer.Option(None, help=_default("--schedule plateau: epochs without gain before a cut.", 5)),
    seed: Optional[int] = typer.Option(None, help=_default("Seed of weights, data order and augmentation, 0 to 2^63-1.", 0)),
    val_split: Optional[str] = typer.Option(None, help=_default("val (train on 'train') or foldK (train on the other folds).", "val")),
    target: Optional[str] = typer.Option(None, help=_default("classes (NEC/NET, ED, ET) or regions (WT, TC, ET).", "regions")),
    channels: Optional[str] = typer.Option(None, help=_default("Input channels, e.g. t1ce,flair.", "the preset's")),
    context: Optional[int] = typer.Option(None, help=_default("2.5D input: each slice with its N neighbours on each side as extra channels (0..3). Off by default: measured without a gain (docs/quality.md).", 0)),
    oversample_tumour: Optional[int] = typer.Option(None, help=_default("Repeat slices with tumour N times per epoch (1 to 100).", 2)),
    augment: Optional[str] = typer.Option(None, help=_default("Augmentation: none or light.", "the preset's")),
    shuffle_buffer: Optional[int] = typer.Option(None, help=_default("Slices in the streaming shuffle buffer (host memory).", 2000)),
    workers: Optional[int] = typer.Option(None, help=_default("DataLoader worker processes.", "1 on CPU, 2 on CUDA")),
    model: Optional[str] = typer.Option(None, help=_default("unet or attention_unet.", "the preset's")),
    loss: Optional[str] = typer.Option(None, help=_default("dice or dice_bce.", "the preset's")),
    base: Optional[int] = typer.Option(None, help=_default("Channels of the first U-Net level.", 32)),
    depth: Optional[int] = typer.Option(None, help=_default("Down-sampling levels.", 4)),
    stem: Optional[int] = typer.Option(None, help=_default("1: none; 2: a stride-2 first convolution, every level at half resolution (~4x fewer FLOPs).", "2 on CPU, 1 on CUDA")),
    batch_norm: Optional[bool] = typer.Option(None, "--batch-norm/--no-batch-norm", help=_default("Batch norm after every convolution.", "on")),
    deep_supervision: Optional[bool] = typer.Option(None, "--deep-supervision/--no-deep-supervision", help=_default("Also train outputs at 1/2 and 1/4 resolution (nnU-Net's deep supervision). Off by default: measured without a gain (docs/quality.md).", "off")),
    head_bias: Optional[str] = typer.Option(None, help=_default("prior: start each output at its class frequency; zero: PyTorch's default.", "prior")),
    device: Optional[str] = typer.Option(None, help=_default(DEVICE_HELP, "auto")),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help=_default("Mixed precision: fp16 autocast + GradScaler on CUDA; bf16 autocast on a CPU that computes bf16 natively (AMX, AVX512-BF16), about twice the steps (docs/quality.md). --no-amp: float32.", "on")),
    amp_dtype: Optional[str] = typer.Option(None, help=_default("auto (fp16 on CUDA; bf16 on a CPU with native bf16, AMX or AVX512-BF16, else off), float16 or bfloat16.", "auto")),
    cache_dir: Optional[str] = typer.Option(None, help="Keep fetched shard files here (remote shards), re-verified by sha256 on every use."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", metavar="<key=value>", help=RUN_STORAGE_OPTION_HELP),
    on_bad_shard: Optional[str] = typer.Option(None, help=_default("fail: stop at the first bad shard; skip: leave bad shards out, count them and print the count after each epoch.", "fail")),
    report: Optional[bool] = typer.Option(None, "--report/--no-report", help=_default("Write the report at the end.", "on")),
    logger: str = typer.Option("csv", help="Also log to tensorboard (RUN/tensorboard/) or mlflow (--tracking-uri); csv: metrics.csv only. Not saved with the run. " + TRACKING_BOUND_HELP),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default)."),
    log_images_every: int = typer.Option(5, help="With --logger: a validation overlay picture every N epochs and after the last (0: none)."),
) -> None:
    from . import api

    overrides = _run_options(locals())
    common = dict(force=force, storage_options=_storage_options(storage_option), console=True,
                  callbacks=_tracking_callbacks(logger, tracking_uri, log_images_every))
    if resume:
        result = api.resume(overrides.pop("out", None), **common, **overrides)
    else:
        result = api.train(overrides.pop("shards", None), overrides.pop("out", None), overrides.pop("variant", None),
                           **common, **overrides)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _run_options(params: dict) -> dict:
    """The `Config` options of a `train run`: those of `--config FILE` (if given), overridden by
    those given on the command line (the others are None)."""
    from .config.file import read_options
    from .config.options import FIELDS

    given = {name: value for name, value in params.items() if name in FIELDS and value is not None}
    from_file = read_options(params["config"]) if params.get("config") is not None else {}
    return {**from_file, **given}


def _tracking_callbacks(logger: str, tracking_uri: str | None, images_every: int) -> list:
    """The trainer callbacks of `--logger`: its tracker (none for plain metrics.csv)."""
    from .reporting.tracking import make_tracker

    tracker = make_tracker(logger, tracking_uri, images_every)
    return [] if tracker is None else [tracker]


ENSEMBLE_HELP = ("A checkpoint (runs/NAME/checkpoints/best.pt, or the run folder runs/NAME for it); repeat it to "
                 "ensemble several (their probabilities averaged), e.g. the folds of --val-split foldK.")
# What --tta and --min-et-voxels gain is measured in docs/quality.md and said only there.
TTA_HELP = ("Average the predictions of each slice and its three mirror images (4x the inference time); "
            "what it gains: docs/quality.md.")
MIN_ET_HELP = ("BraTS post-processing: a patient whose predicted ET has fewer native voxels than this gets it "
               "relabelled NEC/NET (0: off); choose N on your own validation data (what it gains: docs/quality.md).")


@app.command("evaluate", no_args_is_help=True)
def evaluate_command(
    checkpoint: List[Path] = typer.Option(..., metavar="<path>", help=ENSEMBLE_HELP),
    shards: str = typer.Option(..., help="Shard folder or URL."),
    split: str = typer.Option("val", help="Split to evaluate."),
    src: Optional[Path] = typer.Option(None, help="BraTS source folder: also score on the native grid (the headline number); a warning when it is not the source the shards were built from."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write all scores to this JSON file (and the per-patient CSV beside it, NAME_patients.csv, unless --csv)."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write the per-patient scores to this CSV file."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", show_default=False, help=_default("Replace --json/--csv files that exist already (an input never: a checkpoint, shard or source file).", "off")),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    batch_size: int = typer.Option(32, help="Slices per batch."),
    workers: int = typer.Option(2, help="DataLoader worker processes (at most BRATS_SHARDS_MAX_WORKERS, like train run)."),
    cache_dir: Optional[str] = typer.Option(None, help="Keep fetched shard files here, re-verified by sha256 on every use."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", metavar="<key=value>", help=STORAGE_OPTION_HELP),
    lesion_wise: bool = typer.Option(False, "--lesion-wise/--no-lesion-wise", show_default=False, help=_default("With --src: also the official BraTS lesion-wise Dice and HD95 per region (WT, TC, ET).", "off")),
    tta: bool = typer.Option(False, "--tta/--no-tta", show_default=False, help=_default(TTA_HELP, "off")),
    min_et_voxels: int = typer.Option(0, help=MIN_ET_HELP),
) -> None:
    """Slice-level and patient-level (3D) Dice, precision, recall and HD95 of a checkpoint.

    \b
    Examples:
      train evaluate --checkpoint runs/v1/checkpoints/best.pt --shards shards/ \\
          --json runs/v1/eval.json
      train evaluate --checkpoint runs/v1/checkpoints/best.pt --shards shards/ \\
          --src data/MICCAI_BraTS2020_TrainingData --lesion-wise --tta
      train evaluate --checkpoint best.pt --cache-dir ~/.cache/brats \\
          --shards https://lab.example.org/brats-shards/
    """
    from . import api

    api.evaluate(list(checkpoint), shards, split, src, console=True, json_path=json_path, csv_path=csv_path,
                 device=device, batch_size=batch_size, workers=workers, cache_dir=cache_dir,
                 storage_options=_storage_options(storage_option), lesion_wise=lesion_wise, tta=tta,
                 min_et_voxels=min_et_voxels, overwrite=overwrite)


@app.command("predict", no_args_is_help=True)
def predict_command(
    checkpoint: List[Path] = typer.Option(..., metavar="<path>", help=ENSEMBLE_HELP + " An .onnx from `train export` runs under onnxruntime."),
    input: List[str] = typer.Option(..., "--input", metavar="<path>", help="A patient folder, a folder of patients, or one NAME=PATH per modality (repeat --input)."),
    out: Path = typer.Option(..., help="Segmentation to write (SEG.nii.gz; a folder for a folder of patients), in the input's geometry and labels."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    batch_size: int = typer.Option(32, help="Slices per batch."),
    probabilities: bool = typer.Option(False, "--probabilities/--no-probabilities", show_default=False, help=_default("Also write the three sigmoid channels beside each segmentation.", "off")),
    tta: bool = typer.Option(False, "--tta/--no-tta", show_default=False, help=_default(TTA_HELP, "off")),
    min_et_voxels: int = typer.Option(0, help=MIN_ET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", show_default=False, help=_default("Replace outputs that exist already (only those files; an input never).", "off")),
) -> None:
    """Segment NIfTI volumes with a checkpoint.

    \b
    Examples:
      train predict --checkpoint runs/v1/checkpoints/best.pt \\
          --input BraTS20_Training_001/ --out 001_seg.nii.gz
      train predict --checkpoint best.pt --input t1ce=a_t1ce.nii.gz \\
          --input flair=a_flair.nii.gz --out a_seg.nii.gz
      train predict --checkpoint fold0.pt --checkpoint fold1.pt --tta \\
          --input patients/ --out segs/ --device cuda:1
    """
    from .apply import predict

    predict.main(checkpoint=list(checkpoint), inputs=list(input), out=out, device=device, batch_size=batch_size,
                 probabilities=probabilities, tta=tta, min_et_voxels=min_et_voxels, overwrite=overwrite)


@app.command("report", no_args_is_help=True)
def report_command(
    run_dir: Path = typer.Argument(..., help="A run folder (runs/NAME)."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", metavar="<key=value>", help=STORAGE_OPTION_HELP),
) -> None:
    """Curves and overlay pictures of a run, into RUN_DIR/report/.

    \b
    Example:
      train report runs/v1
    """
    from .reporting import report

    report.main(run_dir, storage_options=_storage_options(storage_option))


# ---------------------------------------------------------------- export (issue 14)


@app.command("export", no_args_is_help=True)
def export_command(
    checkpoint: Path = typer.Option(..., help="A checkpoint (runs/NAME/checkpoints/best.pt)."),
    out: Path = typer.Option(..., help="Folder to write NAME.onnx, NAME.pt2, NAME.safetensors and NAME.json into."),
    format: Optional[List[str]] = typer.Option(None, "--format", metavar="<str>", help="onnx, pt2 or safetensors (repeatable).  [default: all three]"),
    name: str = typer.Option("model", help="Base name of the written files."),
    opset: int = typer.Option(18, help="ONNX opset (>= 17)."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", show_default=False, help=_default("Replace outputs that exist already (only those files; the checkpoint never).", "off")),
) -> None:
    """Export a checkpoint to ONNX, a torch.export program and safetensors, with its config as JSON.

    \b
    ONNX and safetensors need the optional extra:
      pip install 'brats-shards[export]'

    \b
    Examples:
      train export --checkpoint runs/v1/checkpoints/best.pt --out exp/
      train predict --checkpoint exp/model.onnx --input P001/ --out seg.nii.gz
    """
    from .runfiles import export

    export.main(checkpoint=checkpoint, out=out, formats=list(format or export.FORMATS), name=name, opset=opset,
                overwrite=overwrite)


def overrides_from_argv(argv: list[str]) -> dict:
    """The `Config` overrides that `train run ARGV` would train with, `--config FILE` included
    (for tools that start runs in-process: the quality harness)."""
    import typer.main

    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    context = command.make_context("run", list(argv))
    return _run_options(context.params)


SHARED_CPU_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""OpenMP's setting for a CPU that other work shares (bench/shared_cpu.py, docs/commands.md `train run`):
a thread that reaches the end of a parallel region first sleeps instead of spinning, so the
thread it waits for, descheduled by another process, gets the core back. With the default
spinning, one busy process beside a 2-thread CPU run cut v2's steps/s to a tenth. Set before torch
is imported (OpenMP reads it once); a value already in the environment wins."""


def share_the_cpu() -> None:
    """`SHARED_CPU_ENV` for this process and its loader workers, unless torch is loaded already."""
    if "torch" not in sys.modules:
        for name, value in SHARED_CPU_ENV.items():
            os.environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: `ToolError` becomes one line and exit code 2."""
    share_the_cpu()
    run_cli(app, argv)


__all__ = ["app", "main", "ToolError"]
