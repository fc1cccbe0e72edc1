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
Zarr builds, when Zarr shards began to explain themselves (issue 14 item 7), which changed their
`zarr.json` files and content digest but not one chunk file (compare the chunk digests with those
of commit 98490e6). Every WebDataset build keeps the digests of that commit.

The test runs whatever the installed versions: the manifest's content is compared with the numpy
and torch versions it names taken as the recorded ones, and a file that differs is reported with
the libraries its bytes depend on (`reference_builds.libraries_of`), naming any whose installed
version is not the recorded one, so a library update is told apart from a code change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from . import reference_builds

RECORDED = json.loads((Path(__file__).with_name("reference_digests.json")).read_text())


def differences(name: str, got: dict, want: dict, recorded: dict, installed: dict) -> list[str]:
    """One line per file (or the content) of build `name` that differs, saying which of the
    libraries it depends on are not at the recorded version, or that none is."""
    def state(path: str) -> str:
        return "is new" if path not in want["files"] else "is no longer written" if path not in got["files"] else "differs"

    files = [(path, state(path)) for path in sorted(set(got["files"]) | set(want["files"]))
             if got["files"].get(path) != want["files"].get(path)]
    if got["content"] != want["content"]:
        files.append(("", "differs"))
    lines = []
    for path, what in files:
        libraries = reference_builds.libraries_of(name, path)
        changed = [f"{lib} {installed[lib]} (recorded {recorded[lib]})" for lib in libraries
                   if installed[lib] != recorded[lib]]
        cause = (f"installed {', '.join(changed)}: if only the library changed, check the values and record anew "
                 f"(tests/etl/reference_builds.py)" if changed else
                 f"its libraries ({', '.join(libraries)}) are at the recorded versions, so the code changed it")
        lines.append(f"{name}: {path or 'the manifest content'} {what}; {cause}")
    return lines


def test_every_build_has_recorded_digests():
    assert sorted(RECORDED["builds"]) == sorted(reference_builds.BUILDS)
    assert set(RECORDED["versions"]) == {*reference_builds.VERSIONED, "zlib"}


@pytest.mark.parametrize("name", sorted(reference_builds.BUILDS))
def test_build_is_byte_identical_to_the_recording(name, tmp_path):
    got = reference_builds.digests(name, tmp_path, recorded_versions=RECORDED["versions"])
    problems = differences(name, got, RECORDED["builds"][name], RECORDED["versions"], reference_builds.versions())
    assert not problems, "\n".join(problems)


def test_a_difference_names_the_library_version_that_changed_or_blames_the_code():
    """The message on a fresh install: a Zarr chunk that differs under another numcodecs names it;
    the same difference with every version as recorded blames the code; plan.json of a Kaggle
    build depends on h5py, not on torch."""
    recorded = RECORDED["versions"]
    want = RECORDED["builds"]["kaggle-zarr-2-per-shard"]
    chunk = next(path for path in want["files"] if "/image/c/" in path)
    got = {"content": want["content"], "files": {**want["files"], chunk: "0" * 64, "plan.json": "1" * 64}}
    newer = {**recorded, "numcodecs": "9.9.9", "torch": "9.9.9"}
    lines = differences("kaggle-zarr-2-per-shard", got, want, recorded, newer)
    assert len(lines) == 2, lines
    (chunk_line,) = [line for line in lines if chunk in line]
    assert f"numcodecs 9.9.9 (recorded {recorded['numcodecs']})" in chunk_line and "torch 9.9.9" in chunk_line
    (plan_line,) = [line for line in lines if "plan.json" in line]
    assert "(h5py) are at the recorded versions, so the code changed it" in plan_line and "torch" not in plan_line
    same = differences("kaggle-zarr-2-per-shard", got, want, recorded, dict(recorded))
    assert all("so the code changed it" in line for line in same)
    assert differences("kaggle-zarr-2-per-shard", want, want, recorded, newer) == []  # the control
