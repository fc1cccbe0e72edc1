"""The `etl` command line: synth, build-shards, export-nnunet, verify, inspect.

    etl synth --out data/synth --patients 10
    etl build-shards --src data/MICCAI_BraTS2020_TrainingData --out shards/ --workers 4
    etl build-shards --src data/BraTS2021 --out shards-zarr/ --format zarr --folds 5
    DASK_SCHEDULER_ADDRESS=tcp://10.0.0.5:8786 etl build-shards --src /shared/brats --out /shared/shards
    etl export-nnunet --src data/BraTS2021 --out nnUNet_raw/Dataset137_BraTS2021 --folds 5
    etl verify shards/
    etl inspect https://lab.example.org/shards/

Heavy modules (numpy, torch, dask, zarr) are imported inside the commands, so `--help` is instant.
Bad input ends with one line naming the file and the problem and a non-zero exit (add `--debug`
for the traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from shards_spec.cli import make_app


# Help shared by build-shards and export-nnunet (literals: naming etl.sources would load numpy for --help).
SOURCE_LAYOUT_HELP = "Source layout: brats2020 | brats2021 | brats2023 | kaggle-h5 | msd (default: detected)."
KAGGLE_ORDER_HELP = "Channel order of the Kaggle .h5 images (default: the Kaggle layout's, see README)."
MAX_PATIENT_MEMORY_HELP = ("Refuse a patient whose declared volume size needs more memory than this to load (about 28 "
                           "bytes per voxel; BraTS needs 0.25 GiB), e.g. 8GiB or 500MiB.")
app = make_app(
    "etl",
    help="BraTS MRI -> 2D slice shards (WebDataset or Zarr), in parallel with Dask.\n\n"
         "Add --debug to any command for the traceback of an error.",
    libraries=("numpy", "dask", "zarr", "webdataset", "nibabel"),
)


def _err_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _csv(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _shape(text: str) -> tuple[int, int, int]:
    from shards_spec.errors import ToolError

    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ToolError(f"--shape must be H,W,D (e.g. 240,240,155), got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ToolError(f"--shape must be three positive integers H,W,D, got {text!r}")
    return shape  # type: ignore[return-value]


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tib": 1 << 40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def _bytes(flag: str, text: str) -> int:
    """`4GiB`, `500MiB`, `2.5G`, `1000000` -> bytes."""
    import re

    from shards_spec.errors import ToolError

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ToolError(f"{flag} must be a size like 4GiB, 500MiB or 1000000 (bytes), got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def _command_line(ctx: typer.Context) -> tuple[str, ...]:
    """The running command as `etl <command> --option value ...` (options left at their default omitted)."""
    words = ["etl", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or not param.opts:
            continue
        if getattr(param, "param_type_name", "") != "option":
            words.append(str(value))
        elif getattr(param, "is_flag", False):
            words.append(param.opts[0])
        else:
            words += [param.opts[0], str(value)]
    return tuple(words)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to create the synthetic dataset in."),
    patients: int = typer.Option(10, "--patients", help="Number of patients."),
    layout: str = typer.Option("brats2020", "--layout", help="brats2020 | brats2021 | brats2023 | kaggle-h5 | msd"),
    shape: str = typer.Option("240,240,155", "--shape", help="Volume shape H,W,D."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    profile: str = typer.Option("default", "--profile", help="Ranges patients are drawn from: default, or shifted "
                                "(more LGG and multifocal tumours, wider sizes, noisier; a second data set for "
                                "bench/quality.py)."),
) -> None:
    """Write a synthetic BraTS-like dataset in one of the source layouts.

    \b
    Example:
      etl synth --out data/synth --patients 6 --layout brats2021 --shape 48,48,24
    """
    from .api import synth as run_synth

    made = run_synth(out, patients=patients, layout=layout, shape=_shape(shape), seed=seed, profile=profile,
                     progress=True)
    if not made.added:
        typer.echo(f"{out} already holds {made.patients} synthetic patient(s) with these options; nothing to add")
        return
    added = f"added {made.added} patient(s) ({made.patients} in all)" if made.added < made.patients \
        else f"wrote {made.patients} patient(s)"
    typer.echo(f"{added} in the {layout} layout, shape {made.shape}, to {out} in {made.seconds:.1f} s")


def _progress(title: str, total: int | None, console=None):
    """The project's one progress bar (`shards_spec.progress`), on stderr, left on screen when done."""
    from shards_spec.progress import Progress

    return Progress(console or _err_console(), title, total, transient=False)


@app.command("build-shards")
def build_shards(
    ctx: typer.Context,
    src: Path = typer.Option(..., "--src", help="BraTS source folder (NIfTI layouts or the Kaggle .h5 export)."),
    out: Path = typer.Option(..., "--out", help="Shard folder to write (new, empty, or a previous build to resume)."),
    format: str = typer.Option("webdataset", "--format", help="webdataset | zarr"),
    size: int = typer.Option(128, "--size", help="Slices are resized to size x size."),
    modalities: str = typer.Option("t1,t1ce,t2,flair", "--modalities", help="Channels to store, in this order."),
    split: Optional[str] = typer.Option(None, "--split", help="Shares per split, e.g. train=0.8,val=0.2 (default) or train=0.7,val=0.15,test=0.15."),
    folds: Optional[int] = typer.Option(None, "--folds", help="K cross-validation folds fold0..fold{K-1} instead of --split."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="nnU-Net's splits_final.json instead of --split: one fold gives train and val, K folds give fold0..fold{K-1}; patients it does not list go to test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split assignment."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Dask worker processes (default: one per core; 0: no Dask, in this process)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Run on an existing Dask cluster: its scheduler's address tcp://HOST:PORT (or set DASK_SCHEDULER_ADDRESS); --src and --out must be on a file system its workers share."),
    norm: str = typer.Option("slice", "--norm", help="z-score per slice | volume."),
    patients_per_shard: int = typer.Option(1, "--patients-per-shard", help="Patients (records) per shard."),
    layout: Optional[str] = typer.Option(None, "--layout", help=SOURCE_LAYOUT_HELP),
    kaggle_channel_order: Optional[str] = typer.Option(None, "--kaggle-channel-order", help=KAGGLE_ORDER_HELP),
    keep_empty: bool = typer.Option(False, "--keep-empty/--no-keep-empty", show_default=False, help="Keep slices without brain voxels.  [default: off]"),
    skip_bad: bool = typer.Option(False, "--skip-bad/--no-skip-bad", show_default=False, help="Build the readable patients and list the others in the manifest.  [default: off]"),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", show_default=False, help="Replace a shard folder built with other options.  [default: off]"),
    compress: str = typer.Option("none", "--compress", help="none | gz (WebDataset tars)."),
    max_patient_memory: str = typer.Option("4GiB", "--max-patient-memory", help=MAX_PATIENT_MEMORY_HELP),
) -> None:
    """Turn a BraTS source folder into slice shards and a manifest.

    One Dask task per output shard (one patient per shard by default). The same command run
    again after a crash keeps the complete shards and builds the rest.

    \b
    Examples:
      etl build-shards --src data/MICCAI_BraTS2020_TrainingData --out shards/
      etl build-shards --src data/BraTS2021 --out shards-zarr/ --format zarr \\
          --folds 5 --workers 8
      etl build-shards --src data/kaggle --out shards/ --size 240 \\
          --modalities t1ce,flair --skip-bad
      etl build-shards --src /shared/BraTS2021 --out /shared/shards \\
          --scheduler tcp://10.0.0.5:8786
    """
    from .api import ProgressReporter, build_shards as run_build

    try:
        summary = run_build(
            src, out, format=format, size=size, channels=_csv(modalities) or (), split=split, folds=folds,
            split_file=split_file, seed=seed, workers=workers, scheduler=scheduler, norm=norm,
            patients_per_shard=patients_per_shard, layout=layout,
            source_options={"kaggle_channel_order": _csv(kaggle_channel_order)}, keep_empty=keep_empty,
            skip_bad=skip_bad, overwrite=overwrite, compression=compress,
            max_patient_bytes=_bytes("--max-patient-memory", max_patient_memory), command=_command_line(ctx),
            progress=ProgressReporter(),
        )
    except KeyboardInterrupt:  # typer would exit 130 without a word
        from shards_spec.errors import ToolError

        kept = "the previous build is in place" if overwrite else \
            "its complete shards are kept; the same command finishes the build"
        error = ToolError(f"interrupted; {kept}", out)
        error.exit_code = 130
        raise error from None
    _print_build_summary(summary)


def _print_build_summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    from shards_spec.cli import print_table

    content = summary.content
    console = Console(soft_wrap=True)  # a summary line piped to a file is not wrapped mid-figure
    table = Table(title=f"{summary.out} ({content['format']}, {summary.action})", title_justify="left")
    for column in ("split", "patients", "shards", "slices", "tumour slices"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for name, split in content["splits"].items():
        table.add_row(name, str(split["records"]), str(split.get("shards", "")), str(split["slices"]),
                      str(split.get("tumour_slices", "")))
    print_table(console, table)
    total = sum(s["bytes"] for s in content["shards"])
    slices = sum(s["slices"] for s in content["shards"])
    console.print(f"{len(content['patients'])} patients, {slices} slices, {len(content['shards'])} shards "
                  f"({summary.shards_built} built, {summary.shards_kept} kept), {_size(total)}"
                  + (f", {total / slices / 1024:.1f} KiB/slice" if slices else "")
                  + f", {summary.seconds:.1f} s", highlight=False)
    console.print(f"content digest {summary.digest}", highlight=False)
    if content["skipped"]:
        console.print(f"skipped {len(content['skipped'])} patient(s): "
                      + ", ".join(s["patient"] for s in content["skipped"]), highlight=False)
    if summary.unlabelled:
        console.print(f"{len(summary.unlabelled)} folder(s) without labels were not used: "
                      + ", ".join(summary.unlabelled[:10]) + (" ..." if len(summary.unlabelled) > 10 else ""),
                      highlight=False)
    if summary.warnings:
        console.print(f"{len(summary.warnings)} warning(s), e.g. {summary.warnings[0]} (all are in the manifest)",
                      highlight=False)


@app.command("export-nnunet")
def export_nnunet(
    src: Path = typer.Option(..., "--src", help="BraTS source folder (any layout build-shards reads)."),
    out: Path = typer.Option(..., "--out", help="nnU-Net raw dataset folder to write, named DatasetNNN_Name (new, empty, or an interrupted export to finish)."),
    split: Optional[str] = typer.Option(None, "--split", help="Shares per split, as build-shards: train and val become nnU-Net's one fold, other splits (test) are held out in imagesTs/labelsTs."),
    folds: Optional[int] = typer.Option(None, "--folds", help="K folds, as build-shards --folds: nnU-Net's fold k validates on our foldk."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="An nnU-Net splits_final.json to keep (its unlisted patients are held out)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split assignment (the same as build-shards')."),
    layout: Optional[str] = typer.Option(None, "--layout", help=SOURCE_LAYOUT_HELP),
    kaggle_channel_order: Optional[str] = typer.Option(None, "--kaggle-channel-order", help=KAGGLE_ORDER_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad/--no-skip-bad", show_default=False, help="Export the readable patients and name the others.  [default: off]"),
    workers: int = typer.Option(0, "--workers", help="Dask worker processes (0: in this process)."),
    max_patient_memory: str = typer.Option("4GiB", "--max-patient-memory", help=MAX_PATIENT_MEMORY_HELP),
) -> None:
    """Write a source folder as an nnU-Net v2 raw dataset, with our split as its folds.

    imagesTr/<case>_0000..0003.nii.gz (T1, T1ce, T2, Flair), labelsTr/ in nnU-Net's BraTS labels
    (1 edema, 2 necrosis/non-enhancing, 3 enhancing), dataset.json with the BraTS regions, and
    splits_final.json, which nnU-Net's planner copies to nnUNet_preprocessed/: nnU-Net then trains
    on the folds `etl build-shards` makes with the same --split/--folds/--seed (or --split-file).

    \b
    Examples:
      etl export-nnunet --src data/BraTS2021 \\
          --out nnUNet_raw/Dataset137_BraTS2021 --folds 5
      etl export-nnunet --src data/Task01_BrainTumour \\
          --out nnUNet_raw/Dataset001_BrainTumour --split train=0.8,val=0.2
    """
    from .api import ProgressReporter
    from .export_nnunet import ExportOptions, export_nnunet as run_export

    options = ExportOptions(
        src=src, out=out, split=split, folds=folds, split_file=split_file, seed=seed, layout=layout,
        source_options={"kaggle_channel_order": _csv(kaggle_channel_order)}, skip_bad=skip_bad, workers=workers,
        max_patient_bytes=_bytes("--max-patient-memory", max_patient_memory),
    )
    summary = run_export(options, ProgressReporter("case"))
    kept = f", {summary.kept} kept from an earlier run" if summary.kept else ""
    typer.echo(f"{summary.out}: {summary.training} training case(s) in {summary.folds} fold(s), {summary.held_out} "
               f"held out and {summary.unlabelled} without labels in imagesTs ({summary.written} written{kept}), "
               f"{summary.seconds:.1f} s")
    for line in summary.skipped:
        typer.echo(f"skipped {line}")
    typer.echo(f"nnU-Net's planner (nnUNetv2_plan_and_preprocess, 2.8) copies {summary.out / 'splits_final.json'} "
               f"to nnUNet_preprocessed/{summary.out.name}/; with a version that does not, copy it there yourself")


STORAGE_OPTION_HELP = ("fsspec option for a URL, KEY=VALUE (repeatable; VALUE may be JSON), e.g. "
                       "endpoint_url=http://minio.lab:9000 or anon=true; credentials: AWS_* variables or ~/.aws/.")


@app.command()
def verify(
    shards: str = typer.Argument(..., help="Shard folder (path or URL: http(s)://, s3://, any fsspec URL)."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", metavar="<key=value>", help=STORAGE_OPTION_HELP),
) -> None:
    """Check a shard folder against its manifest: checksums, decoding, counts, spec.

    Exits non-zero naming every bad shard. A URL is streamed, nothing is kept on disk.

    \b
    Examples:
      etl verify shards/
      etl verify https://lab.example.org/brats-shards/
      etl verify s3://lab-bucket/brats-shards \\
          --storage-option endpoint_url=http://minio.lab:9000
    """
    from shards_spec.read import ShardStore, parse_storage_options

    from .verify import VerifyError, refuse_unfinished, verify as run_verify

    options = parse_storage_options(storage_option)
    refuse_unfinished(shards)
    total = len(ShardStore(shards, storage_options=options).manifest.content["shards"])
    with _progress("verifying", total) as advance:
        report = run_verify(shards, progress=lambda _shard: advance(), storage_options=options)
    if not report.ok:
        lines = report.problems
        head = f"{len(report.bad_shards)} bad shard(s): {', '.join(report.bad_shards)}" if report.bad_shards else \
            f"{len(lines)} problem(s)"
        raise VerifyError("\n".join([head] + lines), shards)
    typer.echo(f"ok: {shards}: {report.shards} shards, {report.files} files, {_size(report.bytes)}, "
               f"{report.records} records, {report.slices} slices ({report.format}); content digest {report.digest}")


@app.command()
def inspect(
    shards: str = typer.Argument(..., help="Shard folder (path or URL: http(s)://, s3://, any fsspec URL)."),
    storage_option: Optional[List[str]] = typer.Option(None, "--storage-option", metavar="<key=value>", help=STORAGE_OPTION_HELP),
) -> None:
    """Show what a shard folder holds: splits, patients, slices, class balance, provenance.

    Reads the manifest only.

    \b
    Examples:
      etl inspect shards/
      etl inspect https://lab.example.org/brats-shards/
    """
    from rich.console import Console

    from shards_spec.cli import print_table
    from shards_spec.read import parse_storage_options

    from .verify import describe

    info = describe(shards, storage_options=parse_storage_options(storage_option))
    console = Console(soft_wrap=True)  # a summary line piped to a file is not wrapped mid-figure
    console.print(f"[bold]{info['root']}[/bold]  {info['spec_version']}, {info['format']}, channels "
                  f"{','.join(info['channels'])}, size {info['preprocessing']['size']}, norm "
                  f"{info['preprocessing']['norm']}", highlight=False)
    print_table(console, _splits_table(info["splits"]))
    print_table(console, _balance_table(info["splits"]))
    for line in _inspect_lines(info):
        console.print(line, highlight=False)


def _split_columns_table(title: str, columns: tuple[str, ...]):
    """A rich table titled `title` whose first column (the split) is left-aligned, the figures right; cells never wrap."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column == "split" else "right", no_wrap=True)
    return table


def _splits_table(splits: dict):
    """`etl inspect`'s first table: patients, shards, slices and bytes of each split."""
    table = _split_columns_table("splits", ("split", "patients", "shards", "slices", "tumour", "size", "bytes/slice"))
    for name, split in splits.items():
        per_slice = split["bytes"] / split["slices"] if split["slices"] else 0
        table.add_row(name, str(split["patients"]), str(split["shards"]), str(split["slices"]),
                      str(split["tumour_slices"]), _size(split["bytes"]), _size(per_slice))
    return table


def _balance_table(splits: dict):
    """`etl inspect`'s class balance: % of the voxels, then % of the tumour voxels, per class and split."""
    table = _split_columns_table("class balance (% of voxels on the shard grid | % of tumour voxels)",
                                 ("split", "background", "NEC/NET", "ED", "ET", "| NEC/NET", "ED", "ET"))
    for name, split in splits.items():
        table.add_row(name, *(f"{100 * v:.2f}" for v in split["voxel_fraction"].values()),
                      *(f"{100 * v:.1f}" for v in split["tumour_fraction"].values()))
    return table


def _inspect_lines(info: dict) -> list[str]:
    """`etl inspect`'s lines under the tables: split rule, preprocessing, source, totals, skipped
    patients and warnings (when any), provenance, content digest."""
    pre = info["preprocessing"]
    lines = [_split_line(info["split"]),
             "preprocessing: " + ", ".join(f"{k}={pre[k]}" for k in sorted(pre)),
             f"source: {info['source']}",
             (f"total: {info['patients']} patients, {info['shards']} shards, {info['slices']} slices, "
              f"{_size(info['bytes'])}, {_size(info['bytes_per_slice'])} per slice")]
    if info["skipped"]:
        lines.append("skipped: " + "; ".join(f"{s['patient']} ({s['problem']})" for s in info["skipped"]))
    if info["warnings"]:
        lines.append(f"{info['warnings']} per-patient warning(s) in the manifest")
    prov = info["provenance"]
    versions = prov.get("versions") or {}
    source = prov.get("source") or {}
    lines.append(f"provenance: created {prov.get('created')}, command {prov.get('command')!r}, source "
                 f"{source.get('path')} ({source.get('layout')}), "
                 + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    lines.append(f"content digest {info['digest']}")
    return lines


def _split_line(split: dict) -> str:
    """How the patients were split: ratios, folds, or an nnU-Net splits file (named with its digest)."""
    how = f"folds {split.get('folds')}" if split.get("method") == "folds" else f"ratios {split.get('ratios')}"
    if split.get("method") == "file":
        how = f"{split.get('file')} (sha256 {str(split.get('sha256'))[:12]}...)"
    return f"split: {split.get('method')}, {how}, seed {split.get('seed')}, stratify {split.get('stratify')}"


def main() -> None:
    from shards_spec.errors import run_cli

    run_cli(app)


if __name__ == "__main__":
    main()
