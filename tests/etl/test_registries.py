"""The ETL's plug-in points: a source layout and a shard format are each one class plus one
registry line, and every name list has one definition.

A toy layout (one `.npz` per patient) and a toy format (one `.npz` per shard, with a reader
registered on the reading side, `shards_spec.formats`) are registered at run time and run end to
end: `etl build-shards` -> `ShardStore` reads them back. The toy format's records are compared
with the WebDataset build of the same source (itself pinned by test_reference_digests.py and
checked against an independent recipe in tests/helpers/etl_recipe.py); the toy layout's shards are compared
with that independent recipe (`expected_slice`) computed from the arrays the toy files hold.
Builds run in this process (`--workers 0`): a run-time registration lives in this process only.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from etl import sources, writers
from etl.sources.base import PatientRef, PatientVolume, Scan, SourceLayout
from etl.writers.base import ShardOutput, Writer
from etl.writers.files import file_entry, write_atomic
from shards_spec import formats
from shards_spec.codec import build_record
from shards_spec.read import ShardStore
from tests.helpers.etl_recipe import expected_slice
from tests.helpers.etl_runs import SIZE, run_etl

# ---------------------------------------------------------------------------------------------
# one definition of every name list


def test_format_names_are_one_list_and_every_reader_has_a_writer():
    assert tuple(writers.WRITERS) == formats.FORMATS
    for name, writer in writers.WRITERS.items():
        assert writer.name == name and writer.shard_path("train", 3, "none").startswith("train/")
    writers.check_registries()


def test_a_reader_without_a_writer_is_caught(monkeypatch):
    monkeypatch.setitem(formats.READERS, "orphan", formats.READERS["webdataset"])
    monkeypatch.setattr(writers, "FORMATS", tuple(formats.READERS))
    with pytest.raises(RuntimeError, match="'orphan'.*no writer"):
        writers.check_registries()


def test_layout_names_are_the_registry_and_synth_writes_them_all():
    from etl import synth
    from shards_spec.labels import CONVENTIONS

    assert sources.LAYOUTS == tuple(sources.SOURCES) == synth.LAYOUTS
    for name, layout in sources.SOURCES.items():
        assert layout.name == name and layout.label_convention in CONVENTIONS and layout.brain_mask_rule
    assert set(synth.MAX_PATIENTS) == set(sources.LAYOUTS)


def test_the_kaggle_channel_order_is_defined_once():
    """The literal appears in exactly one module of etl (and nowhere else outside tests)."""
    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"""\(\s*["']flair["'],\s*["']t1["'],\s*["']t1ce["'],\s*["']t2["']\s*\)|["']flair,t1,t1ce,t2["']""")
    holders = sorted(str(p.relative_to(root)) for folder in ("etl", "shards_spec") for p in (root / folder).rglob("*.py")
                     if pattern.search(p.read_text()))
    assert holders == ["etl/sources/kaggle_order.py"]
    assert sources.KAGGLE_CHANNEL_ORDER == ("flair", "t1", "t1ce", "t2")


def test_cli_help_names_exactly_the_registered_choices():
    """The CLI cannot import the registries (--help stays instant), so its help texts are checked here."""
    import click
    import typer.main

    from etl.cli import app
    from shards_spec.preprocess import NORMS

    command = typer.main.get_command(app)
    ctx = click.Context(command)
    helps = {(name, p.name): p.help for name, sub in command.commands.items() for p in sub.params}
    assert helps[("build-shards", "format")] == " | ".join(writers.WRITERS)
    assert helps[("build-shards", "compress")].startswith(" | ".join(writers.compressions()) + " ")
    assert helps[("build-shards", "norm")] == "z-score per " + " | ".join(NORMS) + "."
    assert helps[("synth", "layout")] == " | ".join(sources.LAYOUTS)
    assert helps[("build-shards", "layout")] == f"Source layout: {' | '.join(sources.LAYOUTS)} (default: detected)."
    assert ctx  # the app builds


# ---------------------------------------------------------------------------------------------
# a toy source layout: one `<id>.toy.npz` per patient holding image (4, H, W, D) and labels (H, W, D)


class ToyLayout(SourceLayout):
    name = "toy"
    label_convention = "brats2023"
    brain_mask_rule = "any modality non-zero"
    expected = "toy patients named toy_<id>.npz"
    options = {"toy_reverse": False}
    files = re.compile(r"^toy_([A-Za-z0-9]+)\.npz$")

    def is_data_file(self, name: str) -> bool:
        return bool(self.files.match(name))

    def scan(self, root, folders, *, require_labels, check_headers, max_patient_bytes) -> Scan:
        (folder,) = folders
        patients = [PatientRef(id=f"toy{self.files.match(p.name).group(1)}", layout=self.name, files={"npz": str(p)})
                    for p in sorted(folder.iterdir()) if self.is_data_file(p.name)]
        return Scan(layout=self.name, root=root, patients=patients, unlabelled=[], problems=[], notes=[],
                    inputs=[(Path(r.files["npz"]).name, Path(r.files["npz"]).stat().st_size) for r in patients])

    def load(self, ref, channels, *, require_labels, max_patient_bytes, toy_reverse=False) -> PatientVolume:
        with np.load(ref.files["npz"]) as data:
            image, labels = data["image"].astype(np.float32), data["labels"]
        if toy_reverse:
            image, labels = image[..., ::-1], labels[..., ::-1]
        order = [sources.CHANNELS.index(c) for c in channels]
        return PatientVolume(volume=image[order], brain=np.any(image != 0, axis=0), labels=labels,
                             affine=np.eye(4), spacing=(1.0, 1.0, 1.0), shape=labels.shape, warnings=[],
                             source_dtype="float32")

    def resolve_options(self, given: dict) -> dict:
        return {"toy_reverse": bool(given.get("toy_reverse") or False)}

    def recorded_options(self, resolved: dict) -> dict:
        return dict(resolved)


def _toy_source(root: Path, patients: int = 4, shape=(20, 18, 6)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from .fixtures import phantom

    folder = root / "data"
    folder.mkdir(parents=True)
    made = {}
    for i in range(patients):
        images, labels = phantom(shape, seed=i)
        image = np.stack([images[m] for m in sources.CHANNELS])
        np.savez(folder / f"toy_{i:02d}.npz", image=image, labels=labels)
        made[f"toy{i:02d}"] = (image.astype(np.float64), labels)
    return made


def test_a_toy_layout_registered_in_one_line_builds_end_to_end(tmp_path, monkeypatch, capsys):
    from etl.build import BuildOptions, build_shards

    made = _toy_source(tmp_path / "src")
    monkeypatch.setitem(sources.SOURCES, "toy", ToyLayout())  # the one registry line
    out = tmp_path / "shards"
    summary = build_shards(BuildOptions(src=tmp_path / "src", out=out, size=SIZE, split="train=0.5,val=0.5", seed=6,
                                        workers=0, source_options={"toy_reverse": True}))
    content = summary.content
    assert content["source"] == {"layout": "toy", "label_convention": "brats2023", "toy_reverse": True}
    assert content["preprocessing"]["brain_mask"] == "any modality non-zero"
    assert json.loads((out / "plan.json").read_text())["options"]["toy_reverse"] is True
    assert sorted(content["patients"]) == sorted(made)

    store = ShardStore(out)
    checked = 0
    for shard in store.manifest.content["shards"]:
        for record in store.records(shard):
            volume, labels = made[record.patient]
            volume, labels = volume[..., ::-1], labels[..., ::-1]  # toy_reverse reached the loader
            depth = labels.shape[-1]
            assert record.slice_index == [z for z in range(depth) if np.any(volume[..., z] != 0)]
            for k, z in enumerate(record.slice_index):
                want_image, want_mask = expected_slice(volume, labels, z, SIZE)
                np.testing.assert_allclose(record.image[k].astype(np.float32), want_image.astype(np.float32),
                                           atol=2e-2, rtol=2e-3)
                np.testing.assert_array_equal(record.mask[k], want_mask)
            checked += 1
    assert checked == len(made)
    code, _, err = run_etl(["verify", out], capsys)
    assert code == 0, err


def test_an_unregistered_layout_option_is_refused(tmp_path):
    from etl.build import BuildOptions, build_shards
    from shards_spec.errors import ToolError

    _toy_source(tmp_path / "src", patients=2)
    with pytest.raises(ToolError, match="toy_reverse"):
        build_shards(BuildOptions(src=tmp_path / "src", out=tmp_path / "o", workers=0, source_options={"toy_reverse": 1}))


# ---------------------------------------------------------------------------------------------
# a toy shard format: one `.npz` per shard, `<key>.<array>` members (writer here, reader registered too)

ARRAYS = ("image", "mask", "slice_index", "class_voxels", "brain_voxels")


class _NpzOutput(ShardOutput):
    def __init__(self, root: Path, path: str) -> None:
        self.root, self.path, self.arrays = root, path, {}

    def add(self, key, patient, slices) -> None:
        for name in ARRAYS:
            self.arrays[f"{key}.{name}"] = np.asarray(getattr(slices, name))

    def finish(self) -> list[dict]:
        if not self.arrays:
            return []
        buffer = io.BytesIO()
        np.savez(buffer, **self.arrays)
        write_atomic(self.root / self.path, buffer.getvalue())
        return [file_entry(self.root, self.root / self.path)]


class NpzWriter(Writer):
    name = "toy"

    def shard_path(self, split, index, compression):
        return f"{split}/{split}-{index:06d}.npz"

    def open_shard(self, root, path, split, compression):
        return _NpzOutput(root, path)


class NpzReader:
    """The reading side of the toy format (test data: np.load without pickle)."""

    @staticmethod
    def records(store, shard, expected, name):
        arrays = np.load(io.BytesIO(store.read_file(shard["files"][0])), allow_pickle=False)
        for key, pid in expected.items():
            meta = {"patient": pid, **{a: arrays[f"{key}.{a}"].tolist() for a in ARRAYS[2:]}}
            yield build_record(key, arrays[f"{key}.image"], arrays[f"{key}.mask"], meta,
                               channels=store.manifest.content["channels"].__len__(), size=store.manifest.size)


def _records(root: Path) -> dict:
    store = ShardStore(root)
    return {r.patient: r for s in store.manifest.content["shards"] for r in store.records(s)}


def test_a_toy_format_registered_in_one_line_each_side_builds_end_to_end(tmp_path, monkeypatch, capsys):
    from etl.synth import synthesize

    src = tmp_path / "src"
    synthesize(src, patients=4, layout="brats2021", shape=(24, 24, 10), seed=0)
    args = ["--src", src, "--workers", "0", "--size", "16", "--split", "train=0.5,val=0.5"]
    code, _, err = run_etl(["build-shards", "--format", "toy", "--out", tmp_path / "refused", *args], capsys)
    assert code == 2 and "--format must be one of webdataset, zarr, got 'toy'" in err

    monkeypatch.setitem(writers.WRITERS, "toy", NpzWriter())  # the writer's registry line
    monkeypatch.setitem(formats.READERS, "toy", NpzReader)  # the reader's registry line
    code, _, err = run_etl(["build-shards", "--format", "toy", "--out", tmp_path / "toy", *args], capsys)
    assert code == 0, err
    code, _, err = run_etl(["build-shards", "--out", tmp_path / "wds", *args], capsys)
    assert code == 0, err

    toy, wds = json.loads((tmp_path / "toy" / "manifest.json").read_text())["content"], \
        json.loads((tmp_path / "wds" / "manifest.json").read_text())["content"]
    assert toy["format"] == "toy" and [s["path"] for s in toy["shards"]] == \
        [s["path"].replace(".tar", ".npz") for s in wds["shards"]]
    assert {p: {k: v for k, v in i.items() if k != "shard"} for p, i in toy["patients"].items()} == \
        {p: {k: v for k, v in i.items() if k != "shard"} for p, i in wds["patients"].items()}
    got, want = _records(tmp_path / "toy"), _records(tmp_path / "wds")
    assert sorted(got) == sorted(want) == sorted(wds["patients"])
    for pid, record in got.items():
        assert np.array_equal(record.image, want[pid].image) and np.array_equal(record.mask, want[pid].mask)
        assert record.slice_index == want[pid].slice_index and record.class_voxels == want[pid].class_voxels
    code, _, err = run_etl(["verify", tmp_path / "toy"], capsys)
    assert code == 0, err
