"""The shard bytes are pinned: today's code rebuilds the recorded builds byte for byte.

`reference_digests.json` was produced by the code of commit 3f3fb694eeaab45763a74bb4c867d9b8d0453e0a
(before `etl/build.py` was split into options / task / runner / manifest modules and the writer and
source-layout registries were introduced), by running `tests/etl/reference_builds.py` against an
export of that commit. Those digests are therefore an independent record of what the tool wrote
before the restructuring; a refactoring that changes one byte of a shard, of `plan.json` or of the
manifest's content fails here. The builds cover both formats, gzip tars, folds, per-volume
normalisation, the Kaggle layout with another channel order and a non-zero background, several
patients per shard, --keep-empty, a tiny odd shape and a --skip-bad build with a broken file.

Re-recorded since, on purpose (the reason is stored beside them, under "rerecorded"): the two
Zarr builds, when Zarr shards began to explain themselves (issue 14 item 7: arrays carry
`dimension_names` and attributes, patient and root `zarr.json` hold consolidated metadata, and
the manifest's storage text says "chunks of 16 slices" instead of the wrong "one chunk per
slice"), which changes their `zarr.json` files and content digest but not one chunk: the
re-recorded chunk files are checked here to equal the pre-restructuring ones. Every WebDataset
build keeps the digests of that commit.

The bytes depend on the versions of numpy, torch (resize), zarr/numcodecs (zstd) and zlib (gzip),
so the comparison is only meaningful with the versions recorded beside the digests; with others
the test is skipped, saying which differ (re-record with the command in reference_builds.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from . import reference_builds

RECORDED = json.loads((Path(__file__).with_name("reference_digests.json")).read_text())


ZARR_BUILDS = sorted(name for name, (_, options, _) in reference_builds.BUILDS.items() if "zarr" in options)
ZARR_CHUNKS = {
    # (build, file) -> sha256 recorded at commit 3f3fb69, before the re-recording: chunk bytes must not change
    ("zarr-brats2021", "train/BraTS2021_00002/image/c/0/0/0/0"):
        "f0072495a9e2d09da4c226a8ecb4c7b2cb8ad58c6247d8b61451631c03115fab",
    ("zarr-brats2021", "val/BraTS2021_00000/mask/c/0/0/0"):
        "294dff4aab90896a4d0f302d63ef4e7fbc82d904b4851ac07d5e514fe499a62f",
    ("kaggle-zarr-2-per-shard", "train/volume_3/image/c/0/0/0/0"):
        "a00d5553d636a8d3ea42b75653aa9859232e4c43c3ab3ff592dea4dd40797f91",
    ("kaggle-zarr-2-per-shard", "val/volume_2/class_voxels/c/0/0"):
        "6ef583e94a652b488bb31eb338ad631be877e6a5a9ee642b9a2c873b799d56e8",
}


ZARR_CHUNK_SETS = {
    # build -> sha256 of json.dumps(sorted((path, sha256) of every chunk file, "/c/" in its path)),
    # computed from reference_digests.json as commit 98490e6 recorded it (before the re-recording)
    "kaggle-zarr-2-per-shard": "faee1222846a141a7cfeab89af886b884b4d81d1c595f0b99aa65ede85cef358",
    "zarr-brats2021": "e20faae5e62845bd31b7011a8a229f1e1ad57782ff3fbcc02a0db8691c86d7fd",
}


def test_the_recorded_builds_are_the_full_set():
    assert sorted(RECORDED["builds"]) == sorted(reference_builds.BUILDS)
    assert RECORDED["commit"] == "3f3fb694eeaab45763a74bb4c867d9b8d0453e0a"
    assert sorted(RECORDED["rerecorded"]) == ZARR_BUILDS == ["kaggle-zarr-2-per-shard", "zarr-brats2021"]


def test_rerecorded_zarr_builds_kept_their_chunks():
    for (name, path), digest in ZARR_CHUNKS.items():
        assert RECORDED["builds"][name]["files"][path] == digest, (name, path)
    for name, digest in ZARR_CHUNK_SETS.items():  # every chunk, not only the four above
        chunks = sorted((k, v) for k, v in RECORDED["builds"][name]["files"].items() if "/c/" in k)
        assert len(chunks) == 15 and hashlib.sha256(json.dumps(chunks).encode()).hexdigest() == digest, name


@pytest.mark.parametrize("name", sorted(reference_builds.BUILDS))
def test_build_is_byte_identical_to_the_pre_restructuring_code(name, tmp_path, capsys):
    differ = {k: (v, RECORDED["versions"].get(k)) for k, v in reference_builds.versions().items()
              if RECORDED["versions"].get(k) != v}
    if differ:
        pytest.skip(f"digests were recorded with other library versions: {differ}")
    got = reference_builds.digests(name, tmp_path)
    want = RECORDED["builds"][name]
    assert got["files"] == want["files"]
    assert got["content"] == want["content"]
