"""A manifest from anyone (issue 12 classes 10 and 13): every field validated before use, and no
patient or file in two shards or two splits, for every reader.

The field fuzz walks every leaf of real ETL manifests (both formats) and puts bad values in its
place: a value of another JSON type, a number too large for any count, null, NaN. Outside the
free-form `meta` of a patient (the source's CSV columns), a value of another type and a huge
number must be refused naming the manifest; null only where the spec allows it. Whatever is
accepted must then work in `inspect` and `verify`, and a random JSON value anywhere must give
`etl inspect`/`etl verify` an exit code of 0 or 2 with at most one error line, never a traceback.
"""

from __future__ import annotations

import fnmatch
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from .helpers import assert_one_line, load_manifest, run_cli_inprocess, save_manifest

FREE_FORM = ["content.patients.*.meta", "content.patients.*.meta.*"]
NULLABLE = ["content.patients.*.grade", "content.split.stratify", "content.skipped.*.file", "content.skipped.*.shard",
            "provenance.command", "provenance.created", "provenance.platform", "provenance.scheduler",
            "provenance.source.*", "provenance.versions.*"]
"""Fields the spec lets be null (SPEC.md section 8: `grade` null without a CSV; provenance of an
in-process build has no command line)."""


def leaves(obj, path: tuple = ()):
    """Paths of every scalar, empty list and empty object in a JSON tree."""
    if isinstance(obj, dict) and obj:
        for key, value in obj.items():
            yield from leaves(value, path + (key,))
    elif isinstance(obj, list) and obj:
        for i, value in enumerate(obj):
            yield from leaves(value, path + (i,))
    else:
        yield path


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def matches(path: tuple, patterns: list[str]) -> bool:
    text = dotted(path)
    return any(fnmatch.fnmatchcase(text, p) or fnmatch.fnmatchcase(text, p + ".*") for p in patterns)


def replaced(manifest: dict, path: tuple, value) -> bytes:
    data = json.loads(json.dumps(manifest))
    target = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return json.dumps(data, allow_nan=True).encode()


def kind(value) -> str:
    return "null" if value is None else type(value).__name__


COMPATIBLE = {"int": {"int"}, "float": {"float", "int"}}
BAD_VALUES = [None, True, "x", -1, 1.5, 2**70, [], {}, float("nan")]


def _manifests(built_shards) -> dict[str, dict]:
    return {fmt: json.loads((root / "manifest.json").read_text()) for fmt, root in built_shards.items()}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_every_leaf_with_a_bad_value_is_refused_or_harmless(built_shards, tmp_path, fmt):
    from etl.verify import describe, verify
    from shards_spec.errors import SpecError
    from shards_spec.manifest import parse

    manifest = _manifests(built_shards)[fmt]
    root = tmp_path / "shards"
    shutil.copytree(built_shards[fmt], root)
    paths = list(leaves(manifest))
    assert len(paths) > 150  # the walk reached the patients, shards, files and provenance
    accepted = []
    for path in paths:
        original = json.loads(json.dumps(manifest))
        for part in path:
            original = original[part]
        for value in BAD_VALUES:
            data = replaced(manifest, path, value)
            try:
                parse(data, "shards/manifest.json")
            except SpecError as exc:
                assert str(exc).startswith("shards/manifest.json: ") and "\n" not in str(exc), (path, value, exc)
                continue
            where = (dotted(path), value)
            assert value == value, where  # NaN: not JSON, always refused
            if matches(path, FREE_FORM) or original is None:
                accepted.append((path, data))
                continue
            assert kind(value) in COMPATIBLE.get(kind(original), {kind(original)}) or (
                value is None and matches(path, NULLABLE)), f"{where}: a {kind(value)} accepted for a {kind(original)}"
            assert not (isinstance(value, int) and value > 2**53), f"{where}: a huge number accepted"
            accepted.append((path, data))
    for path, data in accepted:  # what passes validation works in inspect and verify
        (root / "manifest.json").write_bytes(data)
        describe(root)
        verify(root)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@pytest.mark.slow
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=json_values)
def test_fuzz_a_random_leaf_through_inspect_and_verify(built_shards, tmp_path, capsys, data, value):
    manifest = _manifests(built_shards)["webdataset"]
    path = data.draw(st.sampled_from(sorted(leaves(manifest), key=dotted)))
    root = tmp_path / "fuzzed"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(built_shards["webdataset"], root)
    (root / "manifest.json").write_bytes(replaced(manifest, path, value))
    for command in ("inspect", "verify"):
        code, _, err = run_cli_inprocess("etl", [command, root], capsys)
        assert code in (0, 2) and "Traceback" not in err, (dotted(path), value, err)
        if code == 2 and command == "inspect":
            assert_one_line(code, err, "manifest.json")


# --------------------------------------------------------------------------- class 13: leakage


def _first(content: dict, split: str) -> tuple[dict, str]:
    shard = next(s for s in content["shards"] if s["split"] == split)
    return shard, shard["patients"][0]


def shard_split_edited(content):
    shard, _ = _first(content, "train")
    shard["split"] = "val"


def patient_in_two_splits(content):
    _, pid = _first(content, "train")
    content["splits"]["val"]["patients"].append(pid)


def patient_in_two_shards(content):
    _, pid = _first(content, "train")
    val, _ = _first(content, "val")
    val["patients"].append(pid)


def file_in_two_shards(content):
    train, _ = _first(content, "train")
    val, _ = _first(content, "val")
    val["files"] += [dict(f) for f in train["files"]]
    val["bytes"] = sum(f["bytes"] for f in val["files"])


def arrays_of_another_patient(content):
    _, train_pid = _first(content, "train")
    _, val_pid = _first(content, "val")
    content["patients"][val_pid]["arrays"] = dict(content["patients"][train_pid]["arrays"])


LEAKS = [("webdataset", shard_split_edited, "(a leak)"), ("zarr", shard_split_edited, "(a leak)"),
         ("webdataset", patient_in_two_splits, "(a leak)"), ("webdataset", patient_in_two_shards, "(a leak)"),
         ("zarr", file_in_two_shards, "is listed by shard train/train-000000 and shard val/val-000000 (a leak)"),
         ("zarr", arrays_of_another_patient, "its arrays are image, mask")]
READERS = ["etl verify", "etl inspect", "train run", "train evaluate"]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("fmt, leak, words", LEAKS, ids=[f"{f}-{c.__name__}" for f, c, _ in LEAKS])
def test_a_leaking_manifest_is_refused_by_every_reader(shards_copy, trained, tmp_path, capsys, fmt, leak, words,
                                                       reader):
    from .conftest import TRAIN_ARGS

    root = shards_copy(fmt)
    content, provenance = load_manifest(root)
    leak(content)
    save_manifest(root, content, provenance)  # checksums untouched: they still match every file
    args = {"etl verify": ("etl", ["verify", root]), "etl inspect": ("etl", ["inspect", root]),
            "train run": ("train", ["run", "--shards", root, "--out", tmp_path / "run", *TRAIN_ARGS]),
            "train evaluate": ("train", ["evaluate", "--checkpoint", trained / "checkpoints" / "best.pt", "--shards",
                                         root, "--split", "val", "--workers", "0", "--device", "cpu"])}[reader]
    code, _, err = run_cli_inprocess(*args, capsys)
    assert_one_line(code, err, "manifest.json", words)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_one_patients_data_under_two_names_is_found_by_verify(shards_copy, capsys):
    """A train patient's tar copied into val under a new name (key, JSON and manifest rewritten
    consistently): only the pixels tell, and verify compares them."""
    import hashlib
    import io
    import tarfile

    root = shards_copy("webdataset")
    content, provenance = load_manifest(root)
    shard, pid = _first(content, "train")
    with tarfile.open(root / shard["path"]) as archive:
        members = {info.name.split(".", 1)[1]: archive.extractfile(info).read() for info in archive.getmembers()}
    meta = json.loads(members["json"])
    meta["patient"] = "p9"
    members["json"] = json.dumps(meta).encode()
    copy = "val/val-000001.tar"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for suffix in ("image.npy", "mask.npy", "json"):
            info = tarfile.TarInfo(f"p9.{suffix}")
            info.size = len(members[suffix])
            archive.addfile(info, io.BytesIO(members[suffix]))
    (root / copy).write_bytes(buffer.getvalue())
    entry = {"path": copy, "bytes": len(buffer.getvalue()), "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    info = dict(content["patients"][pid], split="val", shard=copy, key="p9")
    content["patients"]["p9"] = info
    content["shards"].append({"path": copy, "split": "val", "patients": ["p9"], "records": 1,
                              "slices": info["slices"], "bytes": entry["bytes"], "files": [entry]})
    val = content["splits"]["val"]
    val["patients"].append("p9")
    val["records"] += 1
    val["slices"] += info["slices"]
    save_manifest(root, content, provenance)
    code, _, err = run_cli_inprocess("etl", ["verify", root], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert (f"{copy}: record p9 slice 0 (split val): holds the same image as patient {pid} slice 0 (split train): "
            "one patient's data under two names") in err, err

