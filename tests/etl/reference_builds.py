"""A fixed set of `etl build-shards` runs whose output digests were recorded once, to pin the bytes.

Each build synthesises a small source (`etl.synth`, seeded) and runs the `etl` command line on it
in this process (`--workers 0`; the worker count does not change the bytes, test_build.py shows
that). `digests(name, workdir)` returns what a build produced: the manifest's content digest and
the sha256 of every file but `manifest.json` (whose provenance holds a time).

Recording (run against the code whose bytes are to be pinned, e.g. an export of a commit):

    PYTHONPATH=/tmp/base .venv/bin/python tests/etl/reference_builds.py COMMIT tests/etl/reference_digests.json

Re-recording some builds only, after a deliberate change of their bytes (the others keep the
digests of COMMIT; the reason is stored beside the new digests):

    .venv/bin/python tests/etl/reference_builds.py --rerecord "REASON" tests/etl/reference_digests.json NAME...
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

SHAPE = (48, 48, 24)

# name -> (synth keyword arguments, build-shards options, source damage or None)
BUILDS: dict[str, tuple[dict, list[str], str | None]] = {
    "webdataset-brats2020": (dict(layout="brats2020", patients=6), ["--size", "16", "--seed", "1"], None),
    "webdataset-gz-brats2023": (dict(layout="brats2023", patients=3),
                                ["--size", "16", "--compress", "gz", "--split", "train=0.5,val=0.5"], None),
    "zarr-brats2021": (dict(layout="brats2021", patients=3),
                       ["--size", "16", "--format", "zarr", "--split", "train=0.5,val=0.5"], None),
    "folds-volume-norm": (dict(layout="brats2020", patients=5),
                          ["--size", "16", "--folds", "3", "--seed", "2", "--norm", "volume"], None),
    "kaggle-order-background": (dict(layout="kaggle-h5", patients=3, kaggle_channel_order=("t1", "t1ce", "t2", "flair"),
                                     kaggle_background=-0.7),
                                ["--size", "16", "--kaggle-channel-order", "t1,t1ce,t2,flair",
                                 "--modalities", "t1ce,flair", "--split", "train=0.5,val=0.5"], None),
    "kaggle-zarr-2-per-shard": (dict(layout="kaggle-h5", patients=3),
                                ["--size", "16", "--format", "zarr", "--patients-per-shard", "2",
                                 "--split", "train=0.5,val=0.5"], None),
    "2-per-shard-keep-empty": (dict(layout="brats2020", patients=4, quirk_355_at=2),
                               ["--size", "12", "--patients-per-shard", "2", "--keep-empty",
                                "--split", "train=0.5,val=0.5"], None),
    "tiny-shapes": (dict(layout="brats2021", patients=2, shape=(16, 18, 8)),
                    ["--size", "8", "--split", "train=0.5,val=0.5"], None),
    "skip-bad": (dict(layout="brats2020", patients=4),
                 ["--size", "16", "--skip-bad", "--split", "train=0.5,val=0.5", "--seed", "2"],
                 "truncate BraTS20_Training_003_t2"),
}

VERSIONED = ("numpy", "torch", "zarr", "numcodecs", "nibabel", "h5py")
"""Libraries whose versions the bytes depend on (resize kernels, codecs, readers)."""


def versions() -> dict[str, str]:
    import importlib.metadata as md
    import zlib

    found = {name: md.version(name) for name in VERSIONED}
    found["torch"] = found["torch"].split("+")[0]
    found["zlib"] = zlib.ZLIB_RUNTIME_VERSION
    return found


def _damage(src: Path, what: str) -> None:
    action, stem = what.split(" ", 1)
    assert action == "truncate"
    (path,) = [p for p in src.rglob(f"{stem}.nii*")]
    path.write_bytes(path.read_bytes()[:1000])  # a whole header, short data: "truncated file"


def run_build(name: str, workdir: Path) -> Path:
    """Synthesise the source of build `name` under `workdir` and build it; return the out folder."""
    from etl.cli import app
    from etl.synth import synthesize
    from shards_spec.errors import run_cli

    synth, options, damage = BUILDS[name]
    src, out = workdir / "src", workdir / "shards"
    synthesize(src, seed=0, **{"shape": SHAPE, **synth})
    if damage:
        _damage(src, damage)
    try:
        run_cli(app, ["build-shards", "--src", str(src), "--out", str(out), "--workers", "0", *options])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"build {name} exited {exc.code}") from None
    return out


def digests(name: str, workdir: Path) -> dict:
    """{"content": content digest, "files": {relative path: sha256}} of build `name`."""
    from shards_spec.manifest import content_digest

    out = run_build(name, workdir)
    manifest = json.loads((out / "manifest.json").read_text())
    files = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    return {"content": content_digest(manifest["content"]), "files": files}


def main(commit: str, target: str) -> None:
    recorded = {"commit": commit, "versions": versions(), "builds": {}}
    for name in BUILDS:
        with tempfile.TemporaryDirectory() as tmp:
            recorded["builds"][name] = digests(name, Path(tmp))
    Path(target).write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


def rerecord(reason: str, target: str, names: list[str]) -> None:
    """Replace the digests of builds `names` with today's, saying why; the versions must be the recorded ones."""
    recorded = json.loads(Path(target).read_text())
    if versions() != recorded["versions"]:
        raise SystemExit(f"library versions differ from the recorded ones: {versions()} vs {recorded['versions']}")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            recorded["builds"][name] = digests(name, Path(tmp))
        recorded.setdefault("rerecorded", {})[name] = reason
    Path(target).write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "--rerecord":
        rerecord(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main(*sys.argv[1:3])
