"""Writing and reading a checkpoint file: the only `torch.save` and `torch.load` of one.

`save` refuses any value `torch.load(weights_only=True)` would not read back, then writes to a
temporary name in the same folder and moves it into place (`os.replace`), so a crash leaves
either the old or the new checkpoint, never half of one. `load` checks the file before
`torch.load(weights_only=True)` reads it, and everything a model is built from after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checks import check_description, check_fields, check_file, check_weights
from .format import FORMAT, REQUIRED, CheckpointError


def check_plain(value: Any, where: str = "checkpoint") -> None:
    """Refuse anything `torch.load(weights_only=True)` would not load back (a str subclass such
    as `torch.__version__`, a dataclass, a numpy scalar ...), naming where it sits."""
    import collections

    import torch

    if value is None or type(value) in (str, int, float, bool) or isinstance(value, torch.Tensor):
        return
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not a str or int")
            check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(value).__module__}.{type(value).__qualname__} would not load with weights_only=True")


def save(payload: dict[str, Any], path: str | Path) -> Path:
    """Write `payload` atomically (`shards_spec.fileio.atomic_path`: temporary file in the same
    folder, fsync, rename) after checking that every value is a tensor or a plain type (`check_plain`)."""
    import torch

    from shards_spec.fileio import atomic_path

    check_plain(payload)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                torch.save(payload, fh)
    except (OSError, RuntimeError) as exc:  # torch's zip writer turns a refused write into a RuntimeError
        refused = exc
        while refused is not None and not isinstance(refused, OSError):
            refused = refused.__context__
        if refused is None:
            raise
        import errno

        code = errno.errorcode.get(refused.errno or 0, "")
        raise CheckpointError(f"cannot be written ({refused.strerror or refused}{f' [{code}]' if code else ''}); "
                              "the previous checkpoint of that name is unchanged", path) from None
    return path


def load(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` after checking the file, then check everything
    a model is built from (the package docstring's steps 1-4); anything else is one `CheckpointError`."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    check_file(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError,
            KeyError, TypeError, AttributeError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.split(". ")[0].rstrip(".")  # torch appends paragraphs of advice
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise CheckpointError(f"not a readable checkpoint (a zip archive, but truncated, corrupt or not from "
                              f"this tool: {reason})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"not a {FORMAT} checkpoint (format {found!r})", path)
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing}", path)
    check_fields(payload, path)
    check_description(payload, path)
    check_weights(payload, path)
    return payload
