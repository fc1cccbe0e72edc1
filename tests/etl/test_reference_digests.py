"""The shard bytes are pinned: today's code rebuilds the recorded builds byte for byte.

`reference_digests.json` was produced by the code of commit 3f3fb694eeaab45763a74bb4c867d9b8d0453e0a
(before `etl/build.py` was split into options / task / runner / manifest modules and the writer and
source-layout registries were introduced), by running `tests/etl/reference_builds.py` against an
export of that commit. Those digests are therefore an independent record of what the tool wrote
before the restructuring; a refactoring that changes one byte of a shard, of `plan.json` or of the
manifest's content fails here. The builds cover both formats, gzip tars, folds, per-volume
normalisation, the Kaggle layout with another channel order and a non-zero background, several
patients per shard, --keep-empty, a tiny odd shape and a --skip-bad build with a broken file.

The bytes depend on the versions of numpy, torch (resize), zarr/numcodecs (zstd) and zlib (gzip),
so the comparison is only meaningful with the versions recorded beside the digests; with others
the test is skipped, saying which differ (re-record with the command in reference_builds.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from . import reference_builds

RECORDED = json.loads((Path(__file__).with_name("reference_digests.json")).read_text())


def test_the_recorded_builds_are_the_full_set():
    assert sorted(RECORDED["builds"]) == sorted(reference_builds.BUILDS)
    assert RECORDED["commit"] == "3f3fb694eeaab45763a74bb4c867d9b8d0453e0a"


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
