"""`train evaluate`'s checks, all before any scoring (`train.apply.evaluate`): what an output may not
be (an input, a folder, the other output, an existing file without `--overwrite`), the shards
against the checkpoint (channels refused, other data or another grid warned about) and `--src`
against the source the shards were built from (a warning, not a refusal). Each refusal is an
`EvaluateError`, one line naming the option or the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shards_spec.errors import ToolError

from . import inference


class EvaluateError(ToolError):
    """Shards or a source that this checkpoint cannot be evaluated on."""


def warn(console: Any, line: str) -> None:
    """One warning line on `console` (its text printed as it is, never read as markup)."""
    from rich.markup import escape

    console.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False)


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


__all__ = ["EvaluateError", "check_outputs", "check_shards", "check_source", "evaluate_inputs", "scan_src", "warn"]
