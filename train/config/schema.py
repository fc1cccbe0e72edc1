"""The options of `train run`, each declared once: type, default, help text and checks.

As Lightning's `LightningCLI` builds its command line from the signatures it configures, `train run`
is built from the fields of `Config`. Each field is one `option(...)`:

    epochs: int = option(50, f"Epochs in total (also when resuming), at most {MAX_EPOCHS}.",
                         range=Range(1, MAX_EPOCHS))

- the field's type and default are the option's (no default: required, or given by the preset);
- `help`: the `train run --help` text, to which `default_text` adds its `[default: ...]`: the
  value, or "the preset's" (`PRESETS`), or "16 on CPU, 32 on CUDA" (`DEVICE_DEFAULTS`), or `shown`;
- the checks: `range` (every int and float option; `NUMBERS` gathers them), `choices` (fixed
  words), `registry` (the plug-in registry whose names are the choices: models, losses,
  augmentations, schedules; `train.config.options` looks it up when a value is checked, so a
  registered name is accepted), `check` (any other rule), and on/off for a bool.

From that one declaration come the typer options of `train run` (`train.cli`), the checks of a
value from the command line, a `--config` file or a saved run (`option_problem`;
`train.config.options.check_option`, which `train evaluate` and `train predict` use too for the
options they share) and the help's defaults. The field order is the order of `--help`.

This module imports no torch (the registries do), so that `train run --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from shards_spec.checked_io import cut, shown
from shards_spec.errors import ToolError
from shards_spec.labels import CHANNELS, TARGETS

from ..runtime.cpu_share import INTERVAL_S, threads_problem
from ..runtime.devices import DeviceError, check
from .durations import parse_duration

MAX_CONTEXT = 3
"""`--context`: at most this many neighbouring slices on each side as 2.5D input."""


def stacked_channels(channels: int, context: int) -> int:
    """The model's input channels with 2.5D input: each channel of the slice and of its `context`
    neighbours on each side (`train.data.slices.stack_context` stacks them in this number)."""
    return channels * (2 * context + 1)


INT64_MAX = 2**63 - 1
"""Integers reach torch and numpy as int64 (the seed: `torch.manual_seed`, `torch.Generator`)."""
MAX_EPOCHS = 100_000
MAX_STEPS = 1_000_000_000
MAX_OVERSAMPLE = 100


@dataclass(frozen=True)
class Range:
    """The values a numeric option may take: `low` to `high`, each end included unless `open_low`
    / `open_high`. A float option must also be finite: nan passes every comparison's negation
    (`nan < 0` is False) and inf trains to NaN."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False
    hint: str = ""

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def text(self, integer: bool) -> str:
        if integer:
            span = f"{self.low}..{self.high}"
        else:
            span = f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        return f"{span} ({self.hint})" if self.hint else span


class ConfigError(ToolError):
    """A bad option value or combination; the message starts with the option's name."""


def option_name(field_name: str) -> str:
    """The command-line spelling of a `Config` field (`batch_size` -> `--batch-size`)."""
    return "--" + field_name.replace("_", "-")


POLICIES = ("fail", "skip")
"""`--on-bad-shard`: stop at the first bad shard, or leave bad shards out and count them."""
AMP_DTYPES = ("auto", "float16", "bfloat16")
"""`--amp-dtype`: auto is fp16 on CUDA, bf16 on a CPU that computes it natively (`engine.autocast_dtype`)."""
HEAD_BIASES = ("prior", "zero")
VAL_SPLIT = re.compile(r"^(val|fold\d+)$")

PRESETS: dict[str, dict[str, Any]] = {
    "v1": {"model": "unet", "channels": ["t1ce", "flair"], "loss": "dice", "augment": "none"},
    "v2": {"model": "attention_unet", "channels": list(CHANNELS), "loss": "dice_bce", "augment": "light"},
}

DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"base": 32, "stem": 2, "batch_size": 16, "workers": 1},
    "cpu-fp32": {"base": 16, "stem": 2, "batch_size": 16, "workers": 1},
    "cuda": {"base": 32, "stem": 1, "batch_size": 32, "workers": 2},
}
"""Sizes that fit the device, under the preset and the options given. On a CUDA GPU (a T4) the
seed's U-Net (base 32, every level at full resolution, batch 32, fp16 autocast). On a CPU the same
width with a stride-2 first convolution (`--stem 2`: 4.96 instead of 18.5 GFLOP per 128² slice)
and batch 16, which reached the best validation patients' Dice in a fixed number of CPU minutes
of everything `bench/quality.py` tried (docs/quality.md); with bf16 autocast where the CPU computes bf16
natively (`engine.autocast_dtype`), which is not a size and so not in this table. A CPU without native
bf16 ("cpu-fp32", `devices.defaults_kind`) trains in float32, at half the steps: there half the width
(1.25 instead of 4.96 GFLOP a slice) made 2.4x the steps in 5 minutes and scored higher than the full
width and than the MONAI peer on the second data set, quiet (docs/quality.md, section `quality-shifted-b16`)."""
DEVICE_WORDS = {"cpu": "a CPU with native bf16", "cpu-fp32": "other CPUs", "cuda": "CUDA"}

DEVICE_HELP = ("auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda (GPU 0; under torchrun each "
               "rank's GPU LOCAL_RANK), cuda:N (GPU N) or mps (Apple silicon).")
"""`--device` of `train run`, `evaluate` and `predict` (`train.runtime.devices`)."""


# ---------------------------------------------------------------- the checks that are not a range or a choice


def parse_channels(value: Any) -> Any:
    """`--channels t1ce,flair` (a string) as a list of names; any other value as it is."""
    if isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    return value


def _channels_problem(value: Any) -> str | None:
    channels = list(parse_channels(value)) if isinstance(value, (str, list, tuple)) else value
    if (not isinstance(channels, list) or not channels or any(c not in CHANNELS for c in channels)
            or len(set(channels)) != len(channels)):
        return f"must be distinct names from {list(CHANNELS)}, got {shown(channels)}"
    return None


def _val_split_problem(value: Any) -> str | None:
    if not VAL_SPLIT.match(str(value)):
        return f"must be 'val' or 'foldK' (fold0, fold1, ...), got {shown(value)}"
    return None


def _device_problem(value: Any) -> str | None:
    """The spelling only (auto, cpu, cuda, cuda:N, mps; `train.runtime.devices`): whether the
    device is there is asked when the run starts."""
    try:
        check(value)
    except DeviceError as exc:
        return cut(str(exc), 200).removeprefix(option_name("device") + ": ")
    return None


def _duration_problem(value: Any) -> str | None:
    if value is None:
        return None
    try:
        parse_duration(value)
    except ValueError as exc:
        return cut(str(exc), 200)
    return None


def _trainer_problem(value: Any) -> str | None:
    """The spelling `package.module:ClassName`; `train.fit` imports it when the run starts."""
    if value is None:
        return None
    module, _, name = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not name or not name.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        return f"must be package.module:ClassName (a Trainer subclass to import), got {shown(value)}"
    return None


# ---------------------------------------------------------------- the declaration


def option(default: Any = dataclasses.MISSING, help: str = "", *, range: Range | None = None,
           choices: tuple[str, ...] | None = None, registry: str | None = None,
           check: Callable[[Any], str | None] | None = None, shown: str | None = None) -> Any:
    """A `Config` field that is a `train run` option (module docstring)."""
    metadata = {"help": help, "range": range, "choices": choices, "registry": registry, "check": check,
                "shown": shown}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything that defines a run. Field names are the CLI options with '-' -> '_'."""

    shards: str = option(help="Shard folder or URL (holding manifest.json); required for a new run.")
    variant: str = option(help=f"Preset: {' or '.join(PRESETS)}; required for a new run.",
                          choices=tuple(sorted(PRESETS)))
    out: str = option(help="Run folder.", shown="runs/<variant>-<timestamp>")
    epochs: int = option(50, f"Epochs in total (also when resuming), at most {MAX_EPOCHS}.",
                         range=Range(1, MAX_EPOCHS))
    time_budget: str | None = option(
        None, "Wall-clock limit: 12h, 90m, 600s, 1h30m; holds within one step plus the final validation, and "
              "leaves a checkpoint that --resume continues.", check=_duration_problem)
    early_stop: int | None = option(
        None, "Stop when the validation mean Dice has not improved for N validations.", range=Range(1, MAX_EPOCHS),
        shown="off")
    # the upper bounds of the five sizes: train.runfiles.checkpoint.LIMITS (fit.check_sizes)
    batch_size: int = option(32, "Slices per batch (per rank under torchrun).", range=Range(1, INT64_MAX))
    lr: float = option(1e-3, "Adam learning rate, in (0, 1].",
                       range=Range(0, 1, open_low=True, hint="Adam's step size"))
    weight_decay: float = option(0.0, "Adam weight decay, in [0, 1].", range=Range(0, 1))
    schedule: str = option(
        "cosine", "Learning rate: cosine (warm-up then cosine decay per step), poly (nnU-Net's) or plateau "
                  "(ReduceLROnPlateau on validation Dice).", registry="schedules")
    warmup: int = option(100, "Linear warm-up steps of cosine/poly (at most a tenth of the schedule).",
                         range=Range(0, MAX_STEPS))
    plateau_factor: float = option(0.5, "--schedule plateau: factor the rate is cut by.",
                                   range=Range(0, 1, open_low=True, open_high=True))
    plateau_patience: int = option(5, "--schedule plateau: epochs without gain before a cut.",
                                   range=Range(0, MAX_EPOCHS))
    seed: int = option(0, "Seed of weights, data order and augmentation, 0 to 2^63-1.", range=Range(0, INT64_MAX))
    val_split: str = option("val", "val (train on 'train') or foldK (train on the other folds).",
                            check=_val_split_problem)
    target: str = option("regions", "classes (NEC/NET, ED, ET) or regions (WT, TC, ET).", choices=TARGETS)
    channels: tuple[str, ...] = option(help="Input channels, e.g. t1ce,flair.", check=_channels_problem)
    context: int = option(
        0, f"2.5D input: each slice with its N neighbours on each side as extra channels (0..{MAX_CONTEXT}). "
           "Off by default: measured without a gain (docs/quality.md).",
        range=Range(0, MAX_CONTEXT, hint="neighbouring slices on each side"))
    oversample_tumour: int = option(2, f"Repeat slices with tumour N times per epoch (1 to {MAX_OVERSAMPLE}).",
                                    range=Range(1, MAX_OVERSAMPLE))
    augment: str = option(help="Augmentation: none or light.", registry="augmentations")
    shuffle_buffer: int = option(2000, "Slices in the streaming shuffle buffer (host memory).",
                                 range=Range(1, INT64_MAX))
    workers: int = option(2, "DataLoader worker processes.", range=Range(0, INT64_MAX))
    threads: str = option(
        "auto", "Intra-op CPU threads: follow (as many as the cores other processes leave free, checked every "
                f"{INTERVAL_S:g} s), "
                "N (fixed) or auto (follow under --time-budget on the CPU, else torch's count; OMP_NUM_THREADS "
                "pins it). A run that follows does not repeat bit for bit.", check=threads_problem)
    model: str = option(help="unet or attention_unet.", registry="models")
    loss: str = option(help="dice or dice_bce.", registry="losses")
    base: int = option(32, "Channels of the first U-Net level.", range=Range(1, INT64_MAX))
    depth: int = option(4, "Down-sampling levels.", range=Range(1, INT64_MAX))
    stem: int = option(
        1, "1: none; 2: a stride-2 first convolution, every level at half resolution (~4x fewer FLOPs).",
        range=Range(1, 2, hint="1: none, 2: a stride-2 first convolution"))
    batch_norm: bool = option(True, "Batch norm after every convolution.")
    deep_supervision: bool = option(
        False, "Also train outputs at 1/2 and 1/4 resolution (nnU-Net's deep supervision). Off by default: "
               "measured without a gain (docs/quality.md).")
    head_bias: str = option("prior", "prior: start each output at its class frequency; zero: PyTorch's default.",
                            choices=HEAD_BIASES)
    trainer: str | None = option(
        None, "A Trainer subclass that overrides some of its steps, as package.module:ClassName (installed or "
              "on PYTHONPATH). Saved with the run; give it again with --resume (a class named by a checkpoint "
              "is never imported). Without it: the built-in train.training.trainer:Trainer.",
        check=_trainer_problem)
    device: str = option("auto", DEVICE_HELP, check=_device_problem)
    amp: bool = option(
        True, "Mixed precision: fp16 autocast + GradScaler on CUDA; bf16 autocast on a CPU that computes bf16 "
              "natively (AMX, AVX512-BF16), about twice the steps (docs/quality.md). --no-amp: float32.")
    amp_dtype: str = option(
        "auto", "auto (fp16 on CUDA; bf16 on a CPU with native bf16, AMX or AVX512-BF16, else off), float16 or "
                "bfloat16.", choices=AMP_DTYPES)
    cache_dir: str | None = option(
        None, "Keep fetched shard files here (remote shards), re-verified by sha256 on every use.")
    on_bad_shard: str = option(
        "fail", "fail: stop at the first bad shard; skip: leave bad shards out, count them and print the count "
                "after each epoch.", choices=POLICIES)
    report: bool = option(True, "Write the report at the end.")

    # ------------------------------------------------------------ derived values

    @property
    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"base": self.base, "depth": self.depth, "batch_norm": self.batch_norm}
        if self.stem != 1:  # only when used, so checkpoints of models without the options still load
            kwargs["stem"] = self.stem
        if self.deep_supervision:
            kwargs["deep_supervision"] = True
        return kwargs

    @property
    def in_channels(self) -> int:
        """The model's input channels: each channel of the slice and of its 2K neighbours (2.5D)."""
        return stacked_channels(len(self.channels), self.context)

    @property
    def time_budget_seconds(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["channels"] = list(self.channels)
        return out


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

NUMBERS: dict[str, Range] = {name: f.metadata["range"] for name, f in FIELDS.items() if f.metadata["range"]}
"""Every int and float option and the values it may take, gathered from the declarations (a test
checks that none is missing)."""


def kinds(name: str) -> list[str]:
    """The types of option `name` as its annotation spells them: `["int", "None"]` for `int | None`."""
    return [part.strip() for part in str(FIELDS[name].type).split("|")]


def device_default_text(name: str) -> str:
    """A size's default per device kind: "16 on CPU, 32 on CUDA" when both kinds of CPU agree."""
    values = {kind: sizes[name] for kind, sizes in DEVICE_DEFAULTS.items()}
    if len(set(values.values())) == 1:
        return str(values["cpu"])
    if values["cpu"] == values["cpu-fp32"]:
        return f"{values['cpu']} on CPU, {values['cuda']} on CUDA"
    return ", ".join(f"{value} on {DEVICE_WORDS[kind]}" for kind, value in values.items())


def default_text(name: str) -> str | None:
    """The `[default: ...]` of option `name` in `train run --help`, or None to show none (a
    required option, or one that is off unless given)."""
    field = FIELDS[name]
    if field.metadata["shown"] is not None:
        return field.metadata["shown"]
    if any(name in preset for preset in PRESETS.values()):
        return "the preset's"
    if name in DEVICE_DEFAULTS["cpu"]:
        return device_default_text(name)
    value = field.default
    if value is dataclasses.MISSING or value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def number_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for the numeric option `name` (its `Range`), or None (also for a
    non-numeric option, and for None where the option is optional)."""
    bounds = NUMBERS.get(name)
    if bounds is None:
        return None
    if value is None and "None" in kinds(name):
        return None
    integer = kinds(name)[0] == "int"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"must be {'an integer' if integer else 'a number'}, got {shown(value)}"
    if not integer:
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond any float
            finite = False
        if not finite:
            return f"must be a finite number in {bounds.text(False)}, got {shown(value)}"
    if value not in bounds:
        return f"must be in {bounds.text(integer)}, got {shown(value)}"
    return None


def option_problem(name: str, value: Any, choices: list[str] | tuple[str, ...] | None) -> str | None:
    """What is wrong with `value` for option `name` by its declaration, or None. `choices`: the
    allowed words (a registry's names, looked up by the caller; else the declared ones)."""
    metadata = FIELDS[name].metadata
    if choices is not None and value not in choices:
        return f"must be one of {list(choices)}, got {shown(value)}"
    if kinds(name) == ["bool"] and not isinstance(value, bool):
        return f"must be true or false, got {shown(value)}"
    problem = number_problem(name, value)
    if problem is None and metadata["check"] is not None:
        problem = metadata["check"](value)
    return problem
