"""`train run --config FILE`: options kept in a file, under the command line's.

    # run.toml
    variant = "v2"
    shards = "shards/"
    epochs = 80
    batch-size = 16            # or batch_size
    channels = ["t1ce", "flair"]
    schedule = "plateau"

Keys are `train run`'s options (the `Config` fields, `-` or `_`), values of the option's type.
A run's own `config.json` is read too: its `config` block, less `out` (the folder of that run,
which a new run must not write into; give `--out`), so `--config runs/a/config.json --seed 1`
repeats run a with another seed. Options given on the command line override the file's; the
file's override the preset (or, with `--resume`, the run's saved options, with the same rules as
flags). An unknown key, a value of the wrong type or out of its range (both from the option's
declaration, `train.config.schema`), a key given twice, or a file nested deeper than any options
file is one line naming the file and the key; the other checks (choices, spellings) are the
configuration's, after the command line's options are applied, as for flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shards_spec.checked_io import read_json, read_toml, shown

from .schema import FIELDS, ConfigError, kinds, number_problem

_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "tuple[str, ...]": "a list of names", "None": "null"}
NOT_FROM_A_RUN = ("out",)
"""Keys of a saved run's config that a new run does not take from it."""
MAX_CONFIG_BYTES = 1 << 20


def read_options(path: str | Path) -> dict[str, Any]:
    """The options in `path` (TOML, or JSON such as a run's config.json), keyed by field name."""
    path = Path(path)
    table = _load(path)
    if path.suffix.lower() == ".json" and isinstance(table.get("config"), dict):  # a run's config.json
        table = {k: v for k, v in table["config"].items() if k not in NOT_FROM_A_RUN}
    options: dict[str, Any] = {}
    for key, value in table.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown key {shown(key)} (not an option of train run; see train run --help)", path)
        options[name] = _typed(path, key, value, kinds(name))
        problem = number_problem(name, options[name])
        if problem is not None:
            raise ConfigError(f"{key}: {problem}", path)
    return options


def _load(path: Path) -> dict[str, Any]:
    """The file's top-level table; one line for a missing, unreadable or malformed file."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError("--config: must be a .toml file or a .json file such as a run's config.json", path)
    note = "; a --config file holds a few options"
    if suffix == ".toml":
        table = read_toml(path, MAX_CONFIG_BYTES, ConfigError, note)
    else:
        table = read_json(path, MAX_CONFIG_BYTES, ConfigError, note)
    if not isinstance(table, dict):
        raise ConfigError(f"must hold a table of options, not {type(table).__name__}", path)
    return table


def _typed(path: Path, key: str, value: Any, kinds: list[str]) -> Any:
    """`value` if it has the field's type, `kinds` as its annotation spells them (an integer for a
    float field becomes a float)."""
    plain_int = isinstance(value, int) and not isinstance(value, bool)
    if value is None and "None" in kinds:
        return None
    if isinstance(value, bool) and "bool" in kinds:
        return value
    if plain_int and "int" in kinds:
        return value
    if (plain_int or isinstance(value, float)) and "float" in kinds:
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"{key}: must be a finite number, got {shown(value)}", path) from None
    if isinstance(value, str) and ("str" in kinds or kinds[0].startswith("tuple")):
        return value
    if isinstance(value, list) and kinds[0].startswith("tuple") and all(isinstance(v, str) for v in value):
        return list(value)
    wanted = " or ".join(_WORDS.get(kind, kind) for kind in kinds)
    raise ConfigError(f"{key}: must be {wanted}, got {shown(value)}", path)
