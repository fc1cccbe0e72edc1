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

What the bytes depend on besides the code (`libraries_of`): the image values on numpy (synthesis,
z-score, float16 rounding, the .npy header) and torch (the resize kernels), so every shard file
and the manifest's content (which also names both versions; `digests` can count them as the
recorded ones); Zarr files on zarr and numcodecs (metadata layout, the zstd codec); a .gz file on
zlib; plan.json (not in the content) on the sizes of the synthetic source files (its fingerprint):
NIfTI headers by nibabel, .nii.gz streams by zlib and the voxel values, HDF5 files by h5py. Dask,
webdataset and the worker count change no byte; Python's tarfile and json are taken as stable.
After a library update that changes bytes, check the values (tests/etl/test_build.py compares
them with an independent recipe) and record every build anew with the COMMIT command above.
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
"""Libraries whose versions the bytes depend on (resize kernels, codecs, readers); zlib besides."""

IMAGE_LIBRARIES = ("numpy", "torch")
SOURCE_LIBRARIES = {"brats2020": ("nibabel",), "brats2021": ("nibabel", "zlib", "numpy"),
                    "brats2023": ("nibabel", "zlib", "numpy"), "kaggle-h5": ("h5py",)}
"""What the synthetic source's file sizes (plan.json's fingerprint) depend on, per layout: a .nii's
size is its header's plus the array's, a .nii.gz's follows its values, an .h5's HDF5's layout."""


def libraries_of(name: str, path: str) -> tuple[str, ...]:
    """The libraries whose versions can change file `path` of build `name` ("" is the manifest content)."""
    synth, options, _ = BUILDS[name]
    if path == "plan.json":
        return SOURCE_LIBRARIES[synth["layout"]]
    found = list(IMAGE_LIBRARIES)
    if "zarr" in options:
        found += ["zarr", "numcodecs"]
    if path.endswith(".gz") or (not path and "gz" in options):  # the content lists every shard's digest
        found.append("zlib")
    return tuple(found)


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


def digests(name: str, workdir: Path, recorded_versions: dict | None = None) -> dict:
    """{"content": content digest, "files": {relative path: sha256}} of build `name`.

    With `recorded_versions`, the numpy and torch versions the manifest's content names are taken
    as those, so the content digest compares what was built, not which versions built it."""
    from shards_spec.manifest import content_digest

    out = run_build(name, workdir)
    manifest = json.loads((out / "manifest.json").read_text())
    if recorded_versions:
        for lib in IMAGE_LIBRARIES:
            manifest["content"]["preprocessing"][f"{lib}_version"] = recorded_versions[lib]
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
