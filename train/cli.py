"""`train`: run, evaluate, predict, report (typer; heavy imports happen inside the commands).

The commands are thin: they parse the options and call the Python API (`train.api.train` or
`resume`, `train.api.evaluate`) or `train.apply.predict.main(...)` (which predicts through
`train.api.Predictor`) and `train.reporting.report.main(run_dir)` with keyword arguments, so each
command's module holds all of its logic.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from shards_spec.cli import make_app
from shards_spec.errors import ToolError, run_cli

from .config.schema import DEVICE_HELP, FIELDS, default_text, kinds, option_name
from .runtime.bounded import TIMEOUT_ENV, TIMEOUT_LIMITS
from .runtime.distributed import end_rank, from_env

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


def _run_flags(
    config: Optional[Path] = typer.Option(None, "--config", metavar="<file>", help=CONFIG_HELP),
    resume: bool = typer.Option(False, "--resume/--no-resume", show_default=False, help=_default("Continue OUT from checkpoints/last.pt, exactly.", "off")),
    force: bool = typer.Option(False, "--force/--no-force", show_default=False, help=_default("Overwrite an existing run; on --resume accept other shards or options.", "off")),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", metavar="<key=value>", help=RUN_STORAGE_OPTION_HELP),
    logger: str = typer.Option("csv", help="Also log to tensorboard (RUN/tensorboard/) or mlflow (--tracking-uri); csv: metrics.csv only. Not saved with the run. " + TRACKING_BOUND_HELP),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default)."),
    log_images_every: int = typer.Option(5, help="With --logger: a validation overlay picture every N epochs and after the last (0: none)."),
) -> None:
    """The options of `train run` that are not `Config` fields (how to run, not what: not saved
    with the run, or read before the configuration is)."""


FLAGS_AFTER = {"config": "out", "resume": "out", "force": "out", "storage_option": "cache_dir"}
"""Where `--help` shows a `_run_flags` option: after this `Config` option (the others come last)."""
CLI_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "tuple[str, ...]": str}
"""The command-line type of a `Config` annotation (`--channels t1ce,flair` is one string)."""


def _config_option(name: str) -> inspect.Parameter:
    """The `train run` option of `Config` field `name`, from its declaration (`train.config.schema`):
    None unless given, so that --config and --resume can fill it; on/off for a bool."""
    field = FIELDS[name]
    kind = CLI_TYPES[kinds(name)[0]]
    shown = default_text(name)
    text = field.metadata["help"] if shown is None else _default(field.metadata["help"], shown)
    spelling = option_name(name)
    declared = [f"{spelling}/--no-{spelling[2:]}"] if kind is bool else []
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], typer.Option(*declared, help=text)])


def _run_parameters() -> list[inspect.Parameter]:
    """`train run`'s options in `--help` order: `Config`'s, in field order, with `_run_flags`' among them."""
    flags = inspect.signature(_run_flags, eval_str=True).parameters
    ordered = []
    for name in FIELDS:
        ordered.append(_config_option(name))
        ordered += [flag.replace(kind=inspect.Parameter.KEYWORD_ONLY) for flag_name, flag in flags.items()
                    if FLAGS_AFTER.get(flag_name) == name]
    ordered += [flag.replace(kind=inspect.Parameter.KEYWORD_ONLY) for flag_name, flag in flags.items()
                if flag_name not in FLAGS_AFTER]
    return ordered


def run_command(**params: Any) -> None:
    """`train run`: its signature (the options) is made below from `Config`'s declarations and `_run_flags`."""
    from . import api

    overrides = _run_options(params)
    common = dict(force=params["force"], storage_options=_storage_options(params["storage_option"]), console=True,
                  callbacks=_tracking_callbacks(params["logger"], params["tracking_uri"], params["log_images_every"]))
    if params["resume"]:
        result = api.resume(overrides.pop("out", None), **common, **overrides)
    else:
        result = api.train(overrides.pop("shards", None), overrides.pop("out", None), overrides.pop("variant", None),
                           **common, **overrides)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


_RUN_PARAMETERS = _run_parameters()
run_command.__signature__ = inspect.Signature(_RUN_PARAMETERS)  # type: ignore[attr-defined]
run_command.__annotations__ = {p.name: p.annotation for p in _RUN_PARAMETERS}  # typer reads the types here
app.command("run", help=RUN_HELP, no_args_is_help=True)(run_command)


def _run_options(params: dict) -> dict:
    """The `Config` options of a `train run`: those of `--config FILE` (if given), overridden by
    those given on the command line (the others are None)."""
    from .config.file import read_options

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
    """Console-script entry point: `ToolError` becomes one line and exit code 2. A torchrun rank
    leaves through `distributed.end_rank` (a finished DDP run could otherwise abort at exit)."""
    share_the_cpu()
    if not from_env().enabled:
        run_cli(app, argv)
        return
    try:
        run_cli(app, argv)
        code = 0
    except SystemExit as stop:
        code = exit_code(stop)
    end_rank(code)


def exit_code(stop: SystemExit) -> int:
    """The process exit code `sys.exit(stop.code)` would give (None is 0; a message prints and is 1)."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


__all__ = ["app", "main", "ToolError"]
