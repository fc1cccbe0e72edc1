"""`etl export-nnunet` and `etl build-shards --split-file`: nnU-Net v2's raw dataset and splits_final.json.

nnunetv2 is not a dev dependency (installing it replaces torch 2.13 by 2.14 with CUDA wheels), so the
dataset is checked here by hand against nnU-Net's documented format and the rules of its own
`verify_dataset_integrity` (required dataset.json keys, numTraining equal to the cases found by
stripping `_XXXX.nii.gz`, one file per channel, a label file per case, consecutive labels,
images and labels on one grid), and the labels and regions against its BraTS conversion script
`Dataset137_BraTS21.py`, whose values are written out by hand below. Image voxels are compared
with the source files read by nibabel directly. The split round trip compares the manifests of
build-shards run with --folds/--split and with the splits_final.json the export wrote.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from etl.synth import synthesize
from etl.synth.anatomy import draw_patient, render
from tests.helpers.etl_runs import NullCapsys, run_etl

SHAPE = (48, 48, 24)
NNUNET_OF_BRATS2020 = {0: 0, 1: 2, 2: 1, 4: 3}
"""Dataset137_BraTS21.py's copy_BraTS_segmentation_and_convert_labels_to_nnUNet: 4 -> 3, 2 -> 1, 1 -> 2."""
DATASET137_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
DATASET137_CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
BRATS2020_FILE = {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"}  # Dataset137's _0000.._0003 sources
NAME = "Dataset137_BraTS"


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats2020")
    synthesize(root, patients=6, layout="brats2020", shape=SHAPE, seed=0)
    return root


@pytest.fixture(scope="module")
def exported(brats, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / NAME
    code, _, err = run_etl(["export-nnunet", "--src", brats, "--out", out, "--folds", "3", "--seed", "2"], NullCapsys())
    assert code == 0, err
    return out


def patient_folder(src: Path, pid: str) -> Path:
    return src / "MICCAI_BraTS2020_TrainingData" / pid


def identifiers(folder: Path, channels: int) -> dict[str, list[str]]:
    """nnU-Net's case identifiers of an images folder (its file names minus `_XXXX.nii.gz`)."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        match = re.fullmatch(r"(.+)_([0-9]{4})\.nii\.gz", path.name)
        assert match, f"not an nnU-Net image name: {path.name}"
        found.setdefault(match.group(1), []).append(match.group(2))
    for case, numbers in found.items():
        assert numbers == [f"{k:04d}" for k in range(channels)], (case, numbers)
    return found


# ---------------------------------------------------------------------------------- the dataset


@pytest.mark.slow
def test_the_raw_dataset_follows_nnunets_format(exported, brats):
    description = json.loads((exported / "dataset.json").read_text())
    for key in ("labels", "channel_names", "numTraining", "file_ending"):  # verify_dataset_integrity's required keys
        assert key in description
    assert description["channel_names"] == DATASET137_CHANNELS
    assert description["labels"] == DATASET137_LABELS
    assert description["regions_class_order"] == [1, 2, 3]
    assert description["file_ending"] == ".nii.gz"
    cases = identifiers(exported / "imagesTr", channels=4)
    assert description["numTraining"] == len(cases) == 6
    assert sorted(cases) == [f"BraTS20_Training_{i:03d}" for i in range(1, 7)]
    assert sorted(p.name for p in (exported / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in cases)
    assert not (exported / "imagesTs").exists()
    all_labels = sorted({v for value in description["labels"].values() for v in np.atleast_1d(value)})
    assert all_labels == list(range(len(all_labels)))  # nnU-Net: consecutive labels from 0
    for case in cases:
        label = nib.load(str(exported / "labelsTr" / f"{case}.nii.gz"))
        assert set(np.unique(np.asarray(label.dataobj))) <= set(all_labels)
        for k in range(4):
            image = nib.load(str(exported / "imagesTr" / f"{case}_{k:04d}.nii.gz"))
            assert image.shape == label.shape == SHAPE
            np.testing.assert_allclose(image.header.get_zooms(), label.header.get_zooms())
            np.testing.assert_allclose(image.affine, label.affine)


def test_images_are_the_source_channels_and_labels_nnunets_brats_values(exported, brats):
    for case in ("BraTS20_Training_001", "BraTS20_Training_004"):
        folder = patient_folder(brats, case)
        for k, modality in BRATS2020_FILE.items():
            source = nib.load(str(folder / f"{case}_{modality}.nii"))
            written = nib.load(str(exported / "imagesTr" / f"{case}_{int(k):04d}.nii.gz"))
            assert written.get_data_dtype() == source.get_data_dtype() == np.int16
            np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(source.dataobj))
            np.testing.assert_allclose(written.affine, source.affine)
        seg = np.asarray(nib.load(str(folder / f"{case}_seg.nii")).dataobj)
        label = nib.load(str(exported / "labelsTr" / f"{case}.nii.gz"))
        expected = np.zeros_like(seg)
        for brats_value, nnunet_value in NNUNET_OF_BRATS2020.items():
            expected[seg == brats_value] = nnunet_value
        assert label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(label.dataobj), expected)


def test_the_export_is_byte_reproducible_and_a_rerun_keeps_it(exported, brats, tmp_path, capsys):
    again = tmp_path / NAME
    code, out, err = run_etl(["export-nnunet", "--src", brats, "--out", again, "--folds", "3", "--seed", "2"], capsys)
    assert code == 0, err
    files = sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (exported / rel).read_bytes() == (again / rel).read_bytes(), rel
    before = {rel: (again / rel).stat().st_mtime_ns for rel in files}
    code, out, err = run_etl(["export-nnunet", "--src", brats, "--out", again, "--folds", "3", "--seed", "2"], capsys)
    assert code == 0, err
    assert "(0 written, 6 kept from an earlier run)" in out
    assert all((again / rel).stat().st_mtime_ns == before[rel] for rel in files if rel.parts[0].startswith("images"))


def test_an_interrupted_export_is_finished_by_the_same_command(exported, brats, tmp_path, capsys):
    out = tmp_path / NAME
    shutil.copytree(exported, out)
    (out / "dataset.json").unlink()  # as if killed before the end
    (out / "imagesTr" / "BraTS20_Training_003_0002.nii.gz").unlink()
    (out / "imagesTr" / ".BraTS20_Training_003_0002.nii.gz.123-abcd.partial").write_bytes(b"half")
    code, text, err = run_etl(["export-nnunet", "--src", brats, "--out", out, "--folds", "3", "--seed", "2"], capsys)
    assert code == 0, err
    assert "(1 written, 5 kept from an earlier run)" in text
    for path in exported.rglob("*"):
        if path.is_file():
            assert (out / path.relative_to(exported)).read_bytes() == path.read_bytes()
    assert not list(out.rglob("*.partial"))


# ---------------------------------------------------------------------------------- splits


def _splits(shards: Path) -> dict[str, list[str]]:
    content = json.loads((shards / "manifest.json").read_text())["content"]
    return {name: split["patients"] for name, split in content["splits"].items()}


def test_splits_final_holds_our_folds_and_build_shards_reads_them_back(exported, brats, tmp_path, capsys):
    folds = json.loads((exported / "splits_final.json").read_text())
    code, _, err = run_etl(["build-shards", "--src", brats, "--out", tmp_path / "ours", "--size", "16",
                            "--workers", "0", "--folds", "3", "--seed", "2"], capsys)
    assert code == 0, err
    ours = _splits(tmp_path / "ours")
    everyone = sorted(p for members in ours.values() for p in members)
    assert len(folds) == 3
    for k, fold in enumerate(folds):
        assert fold["val"] == ours[f"fold{k}"]
        assert fold["train"] == sorted(set(everyone) - set(ours[f"fold{k}"]))
    code, _, err = run_etl(["build-shards", "--src", brats, "--out", tmp_path / "from-file", "--size", "16",
                            "--workers", "0", "--split-file", exported / "splits_final.json"], capsys)
    assert code == 0, err
    assert _splits(tmp_path / "from-file") == ours
    split = json.loads((tmp_path / "from-file" / "manifest.json").read_text())["content"]["split"]
    assert split["method"] == "file" and split["file"] == "splits_final.json" and split["folds"] == 3


@pytest.mark.slow
def test_a_test_share_is_held_out_and_comes_back_as_test(brats, tmp_path, capsys):
    out = tmp_path / NAME
    args = ["--split", "train=0.5,val=0.25,test=0.25", "--seed", "3"]
    code, _, err = run_etl(["export-nnunet", "--src", brats, "--out", out, *args], capsys)
    assert code == 0, err
    code, _, err = run_etl(["build-shards", "--src", brats, "--out", tmp_path / "ours", "--size", "16",
                            "--workers", "0", *args], capsys)
    assert code == 0, err
    ours = _splits(tmp_path / "ours")
    assert ours["test"], "the seed should give the test share a patient"
    folds = json.loads((out / "splits_final.json").read_text())
    assert folds == [{"train": ours["train"], "val": ours["val"]}]
    assert sorted(identifiers(out / "imagesTs", 4)) == ours["test"]
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == [f"{p}.nii.gz" for p in ours["test"]]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == len(ours["train"]) + len(ours["val"])
    code, _, err = run_etl(["build-shards", "--src", brats, "--out", tmp_path / "back", "--size", "16",
                            "--workers", "0", "--split-file", out / "splits_final.json"], capsys)
    assert code == 0, err
    assert _splits(tmp_path / "back") == ours
    assert "patient(s) that splits_final.json does not list are in the split test" in err


def test_a_hand_written_nnunet_split_file_is_read_as_given(brats, tmp_path, capsys):
    ids = [f"BraTS20_Training_{i:03d}" for i in range(1, 7)]
    split_file = tmp_path / "splits_final.json"
    split_file.write_text(json.dumps([{"train": ids[2:5], "val": ids[:2]}, {"train": ids[:2], "val": ids[2:5]}]))
    code, _, err = run_etl(["build-shards", "--src", brats, "--out", tmp_path / "s", "--size", "16", "--workers", "0",
                            "--split-file", split_file], capsys)
    assert code == 0, err
    assert _splits(tmp_path / "s") == {"fold0": ids[:2], "fold1": ids[2:5], "test": ids[5:]}


@pytest.mark.parametrize("folds,message", [
    ({"train": [], "val": []}, "must be a non-empty list of"),
    ([{"train": ["BraTS20_Training_001"], "val": ["BraTS20_Training_001"]}], "fold 0: BraTS20_Training_001 is in both"),
    ([{"train": ["BraTS20_Training_002"], "val": ["BraTS20_Training_001"]},
      {"train": ["BraTS20_Training_002"], "val": ["BraTS20_Training_001"]}], "is validated in folds 0 and 1"),
    ([{"train": ["BraTS20_Training_002", "BraTS20_Training_003"], "val": ["BraTS20_Training_001"]},
      {"train": ["BraTS20_Training_001"], "val": ["BraTS20_Training_002"]}], "fold 0 trains on a different set"),
    ([{"train": ["BraTS20_Training_001"], "val": ["BraTS21_Training_999"]}], "lists 1 case(s) the source does not hold"),
    ([{"train": ["BraTS20_Training_001"], "val": 3}], '"val" must be a list of case ids'),
])
def test_a_split_file_that_does_not_fit_is_refused_in_one_line(brats, tmp_path, capsys, folds, message):
    split_file = tmp_path / "splits_final.json"
    split_file.write_text(json.dumps(folds))
    code, _, err = run_etl(["build-shards", "--src", brats, "--out", tmp_path / "s", "--workers", "0",
                            "--split-file", split_file], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {split_file}: ") and message in line, err
    assert not (tmp_path / "s").exists()


def test_split_options_are_exclusive(brats, tmp_path, capsys):
    (tmp_path / "f.json").write_text("[]")
    code, _, err = run_etl(["build-shards", "--src", brats, "--out", tmp_path / "s", "--folds", "3",
                            "--split-file", tmp_path / "f.json"], capsys)
    assert code == 2 and "give one of --split, --folds and --split-file" in err


# ---------------------------------------------------------------------------------- other layouts, refusals


def test_an_msd_source_exports_its_4d_images_as_channel_files(tmp_path, capsys):
    synthesize(tmp_path / "msd", patients=4, layout="msd", shape=SHAPE, seed=0)
    out = tmp_path / "raw" / "Dataset001_BrainTumour"
    code, _, err = run_etl(["export-nnunet", "--src", tmp_path / "msd", "--out", out, "--split",
                            "train=0.5,val=0.5"], capsys)
    assert code == 0, err
    truth = render(draw_patient(np.random.default_rng([0, 0])), SHAPE)  # BRATS_001
    for k, modality in BRATS2020_FILE.items():
        written = nib.load(str(out / "imagesTr" / f"BRATS_001_{int(k):04d}.nii.gz"))
        assert written.shape == SHAPE and written.get_data_dtype() == np.float32
        np.testing.assert_array_equal(np.asarray(written.dataobj), truth.images[modality].astype(np.float32))
    label = np.asarray(nib.load(str(out / "labelsTr" / "BRATS_001.nii.gz")).dataobj)
    expected = np.zeros_like(truth.seg)
    for brats_value, nnunet_value in NNUNET_OF_BRATS2020.items():
        expected[truth.seg == brats_value] = nnunet_value
    np.testing.assert_array_equal(label, expected)
    assert sorted(identifiers(out / "imagesTs", 4)) == ["BRATS_004"]  # the MSD's unlabelled case
    assert not (out / "labelsTs").exists()
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 3


@pytest.mark.slow
def test_a_kaggle_source_exports_with_its_channel_order(tmp_path, capsys):
    from etl.sources import load_patient, scan_source

    order = ("t1", "t1ce", "t2", "flair")
    synthesize(tmp_path / "kaggle", patients=3, layout="kaggle-h5", shape=SHAPE, seed=0, kaggle_channel_order=order)
    out = tmp_path / "Dataset002_Kaggle"
    code, _, err = run_etl(["export-nnunet", "--src", tmp_path / "kaggle", "--out", out, "--split",
                            "train=0.5,val=0.5", "--kaggle-channel-order", ",".join(order)], capsys)
    assert code == 0, err
    ref = scan_source(tmp_path / "kaggle").patients[0]
    volume = load_patient(ref, kaggle_channel_order=order)
    for k in range(4):
        written = np.asarray(nib.load(str(out / "imagesTr" / f"{ref.id}_{k:04d}.nii.gz")).dataobj)
        np.testing.assert_array_equal(written, volume.volume[k])


def test_refusals_leave_the_out_folder_untouched(brats, tmp_path, capsys):
    foreign = tmp_path / "Dataset003_Mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run_etl(["export-nnunet", "--src", brats, "--out", foreign], capsys)
    assert code == 2 and f"error: {foreign}: is not empty (notes.txt) and was not written by etl export-nnunet" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    code, _, err = run_etl(["export-nnunet", "--src", brats, "--out", tmp_path / "BraTS"], capsys)
    assert code == 2 and "must be named DatasetNNN_Name" in err and not (tmp_path / "BraTS").exists()
    done = tmp_path / "Dataset004_X"
    assert run_etl(["export-nnunet", "--src", brats, "--out", done, "--folds", "2"], capsys)[0] == 0
    code, _, err = run_etl(["export-nnunet", "--src", brats, "--out", done, "--folds", "3"], capsys)
    assert code == 2 and "holds an nnU-Net export of other data or with other options" in err


def test_an_out_folder_that_cannot_be_made_is_one_line(brats, tmp_path, capsys):
    """A file where the folder (or its parent) should be: refused before the lock is taken."""
    (tmp_path / "a-file").write_text("mine")
    for out, problem in ((tmp_path / "a-file" / "Dataset005_X", "cannot be written (Not a directory)"),
                         (tmp_path / "Dataset006_X", "exists and is not a folder")):
        if out.name == "Dataset006_X":
            out.write_text("mine")
        code, _, err = run_etl(["export-nnunet", "--src", brats, "--out", out], capsys)
        assert code == 2 and err.strip() == f"error: {out}: {problem}" and "Traceback" not in err, err
    assert (tmp_path / "a-file").read_text() == "mine" and (tmp_path / "Dataset006_X").read_text() == "mine"


def test_a_data_problem_leaves_no_new_folder(brats, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(brats, src)
    seg = patient_folder(src, "BraTS20_Training_002") / "BraTS20_Training_002_seg.nii"
    img = nib.load(str(seg))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 3  # not a BraTS 2020 label: found while loading, not by the scan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(seg))
    out = tmp_path / "Dataset005_Bad"
    code, _, err = run_etl(["export-nnunet", "--src", src, "--out", out], capsys)
    assert code == 2 and "label(s) [3] outside [0, 1, 2, 4]" in err
    assert not out.exists()
    code, text, err = run_etl(["export-nnunet", "--src", src, "--out", out, "--skip-bad"], capsys)
    assert code == 0, err
    assert "skipped BraTS20_Training_002" in text
    assert "BraTS20_Training_002" not in json.dumps(json.loads((out / "splits_final.json").read_text()))
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == len(identifiers(out / "imagesTr", 4)) == 5


@pytest.mark.slow
def test_dask_workers_write_the_same_bytes(exported, brats, tmp_path, capsys):
    out = tmp_path / NAME
    code, _, err = run_etl(["export-nnunet", "--src", brats, "--out", out, "--folds", "3", "--seed", "2",
                            "--workers", "2"], capsys)
    assert code == 0, err
    files = sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert all((out / rel).read_bytes() == (exported / rel).read_bytes() for rel in files)
