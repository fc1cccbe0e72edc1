"""The MSD `Task01_BrainTumour` layout: synth, scan, dataset.json read (never assumed), build, predict.

Independent references: the synthetic phantom itself (`etl.synth.anatomy.render`: the images
and the BraTS 2020 labels 0/1/2/4 before any layout wrote them), the MSD's documented label
meaning written out here by hand, and the same phantoms built from the `brats2021` layout (synth
patient i is the same whatever the layout), whose shards the MSD build must equal record for
record. A dataset.json with a permuted modality order and permuted label values, built here by
hand, checks that the order and the values are read rather than assumed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from etl.sources import label_convention, load_patient, scan_source
from etl.synth import synthesize
from etl.synth.anatomy import draw_patient, render
from shards_spec.errors import SourceError
from shards_spec.read import ShardStore
from tests.helpers.etl_runs import run_etl

SHAPE = (48, 48, 24)
TASK = "Task01_BrainTumour"
MSD_OF_BRATS2020 = {0: 0, 1: 2, 2: 1, 4: 3}
"""BraTS 2020 value -> the MSD's (1 NCR/NET -> 2 non-enhancing, 2 edema -> 1, 4 ET -> 3): the MSD's
published label meaning, written by hand."""
MSD_ORDER = ("flair", "t1", "t1ce", "t2")  # the release's "modality" map: FLAIR, T1w, t1gd, T2w


def phantom(index: int, seed: int = 0):
    return render(draw_patient(np.random.default_rng([seed, index])), SHAPE)


def remap(values: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.zeros_like(values)
    for a, b in table.items():
        out[values == a] = b
    return out


@pytest.fixture(scope="module")
def msd_src(tmp_path_factory) -> Path:
    """Five synthetic cases: BRATS_001..003 and 005 in imagesTr, BRATS_004 in imagesTs."""
    root = tmp_path_factory.mktemp("msd")
    synthesize(root, patients=5, layout="msd", shape=SHAPE, seed=0)
    return root


def cli(args, capsys) -> tuple[int, str, str]:
    return run_etl(args, capsys)


def copy_task(src: Path, dest: Path) -> Path:
    shutil.copytree(src / TASK, dest / TASK)
    return dest / TASK


# ---------------------------------------------------------------------------------- synth


def test_synth_writes_the_release_layout_with_msd_values(msd_src):
    task = msd_src / TASK
    assert sorted(p.name for p in (task / "imagesTr").iterdir()) == [f"BRATS_00{i}.nii.gz" for i in (1, 2, 3, 5)]
    assert [p.name for p in (task / "imagesTs").iterdir()] == ["BRATS_004.nii.gz"]
    assert sorted(p.name for p in (task / "labelsTr").iterdir()) == [f"BRATS_00{i}.nii.gz" for i in (1, 2, 3, 5)]
    description = json.loads((task / "dataset.json").read_text())
    assert description["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert description["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                                     "3": "enhancing tumour"}
    assert description["tensorImageSize"] == "4D"
    assert (description["numTraining"], description["numTest"]) == (4, 1)
    assert description["training"][0] == {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
    assert description["test"] == ["./imagesTs/BRATS_004.nii.gz"]
    truth = phantom(0)
    image = nib.load(str(task / "imagesTr" / "BRATS_001.nii.gz"))
    assert image.shape == (*SHAPE, 4) and image.get_data_dtype() == np.float32
    data = np.asarray(image.dataobj)
    for k, modality in enumerate(MSD_ORDER):
        np.testing.assert_array_equal(data[..., k], truth.images[modality].astype(np.float32))
    labels = np.asarray(nib.load(str(task / "labelsTr" / "BRATS_001.nii.gz")).dataobj)
    assert labels.shape == SHAPE and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, remap(truth.seg, MSD_OF_BRATS2020))
    assert set(np.unique(labels)) == {0, 1, 2, 3}


# ---------------------------------------------------------------------------------- scan and load


def test_scan_detects_the_layout_and_keeps_imagesTs_apart(msd_src):
    scan = scan_source(msd_src)
    assert scan.layout == "msd"
    assert [p.id for p in scan.patients] == ["BRATS_001", "BRATS_002", "BRATS_003", "BRATS_005"]
    assert [Path(u).name for u in scan.unlabelled] == ["BRATS_004.nii.gz"]
    assert scan.problems == []
    ref = scan.patients[0]
    assert ref.meta["channel_index"] == {"t1": 1, "t1ce": 2, "t2": 3, "flair": 0}
    assert label_convention(ref) == {0: 0, 1: 2, 2: 1, 3: 3}
    everything = scan_source(msd_src, require_labels=False)
    assert [p.id for p in everything.patients] == ["BRATS_001", "BRATS_002", "BRATS_003", "BRATS_004", "BRATS_005"]
    assert "seg" not in everything.patients[3].files


def test_load_gives_our_channel_order_and_labels(msd_src):
    ref = scan_source(msd_src).patients[1]  # BRATS_002: phantom index 1
    truth = phantom(1)
    volume = load_patient(ref, channels=["t1", "t1ce", "t2", "flair"])
    for i, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        np.testing.assert_array_equal(volume.volume[i], truth.images[modality].astype(np.float32))
    np.testing.assert_array_equal(volume.labels, remap(truth.seg, {0: 0, 1: 1, 2: 2, 4: 3}))
    np.testing.assert_array_equal(volume.brain, np.any([truth.images[m] != 0 for m in MSD_ORDER], axis=0))
    two = load_patient(ref, channels=["flair", "t1ce"])
    np.testing.assert_array_equal(two.volume[0], truth.images["flair"].astype(np.float32))
    np.testing.assert_array_equal(two.brain, volume.brain)  # the mask of all four modalities
    np.testing.assert_allclose(volume.affine, nib.load(ref.files["t1"]).affine)


PERMUTED_MODALITY = {"0": "T2w", "1": "t1gd", "2": "FLAIR", "3": "T1w"}
PERMUTED_LABELS = {"0": "background", "1": "enhancing tumour", "2": "edema", "3": "non-enhancing tumour"}
OURS_TO_PERMUTED = {0: 0, 1: 3, 2: 2, 3: 1}  # ours (1 NEC/NET, 2 ED, 3 ET) -> PERMUTED_LABELS' values


def permuted_task(msd_src: Path, dest: Path) -> Path:
    """The synthetic task rewritten with another modality order and other label values, by hand."""
    task = copy_task(msd_src, dest)
    position = {"t2": 0, "t1ce": 1, "flair": 2, "t1": 3}
    for image_path in sorted(task.glob("images*/*.nii.gz")):
        img = nib.load(str(image_path))
        data = np.asarray(img.dataobj)
        permuted = np.empty_like(data)
        for k, modality in enumerate(MSD_ORDER):
            permuted[..., position[modality]] = data[..., k]
        nib.save(nib.Nifti1Image(permuted, img.affine, img.header), str(image_path))
    for label_path in sorted((task / "labelsTr").glob("*.nii.gz")):
        img = nib.load(str(label_path))
        msd = np.asarray(img.dataobj)
        ours = remap(msd, {0: 0, 1: 2, 2: 1, 3: 3})
        nib.save(nib.Nifti1Image(remap(ours, OURS_TO_PERMUTED), img.affine, img.header), str(label_path))
    description = json.loads((task / "dataset.json").read_text())
    description["modality"], description["labels"] = PERMUTED_MODALITY, PERMUTED_LABELS
    (task / "dataset.json").write_text(json.dumps(description))
    return task


def test_a_permuted_dataset_json_is_read_not_assumed(msd_src, tmp_path):
    permuted_task(msd_src, tmp_path)
    ref = scan_source(tmp_path).patients[0]
    assert ref.meta["channel_index"] == {"t1": 3, "t1ce": 1, "t2": 0, "flair": 2}
    truth = phantom(0)
    volume = load_patient(ref)
    for i, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        np.testing.assert_array_equal(volume.volume[i], truth.images[modality].astype(np.float32))
    np.testing.assert_array_equal(volume.labels, remap(truth.seg, {0: 0, 1: 1, 2: 2, 4: 3}))
    assert label_convention(ref) == {0: 0, 1: 3, 2: 2, 3: 1}


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("modality"), 'has no "modality" map'),
    (lambda d: d.pop("labels"), 'has no "labels" map'),
    (lambda d: d.update(modality={"0": "FLAIR", "1": "T1w", "2": "ADC", "3": "T2w"}), "2 is 'ADC', which is none of"),
    (lambda d: d.update(modality={"0": "FLAIR", "1": "T1w", "2": "T1", "3": "T2w"}), "t1 is named twice"),
    (lambda d: d.update(modality={"1": "FLAIR", "2": "T1w"}), "keys must be the indices 0..1"),
    (lambda d: d.update(labels={"0": "background", "1": "edema", "2": "cyst", "3": "enhancing tumour"}),
     "label 2 is named 'cyst'"),
    (lambda d: d.update(labels={"0": "background", "1": "edema", "3": "enhancing tumour"}),
     "no label is named for NEC/NET"),
    (lambda d: d.update(labels={"0": "edema", "1": "background", "2": "non-enhancing tumor", "3": "enhancing tumor"}),
     "label 0 must be the background"),
    (lambda d: (d.pop("modality"), d.update(channel_names={"0": "T1"})), "an nnU-Net v2 dataset.json"),
])
def test_a_dataset_json_without_usable_maps_is_refused_in_one_line(msd_src, tmp_path, capsys, edit, message):
    task = copy_task(msd_src, tmp_path / "src")
    description = json.loads((task / "dataset.json").read_text())
    edit(description)
    (task / "dataset.json").write_text(json.dumps(description))
    code, out, err = cli(["build-shards", "--src", tmp_path / "src", "--out", tmp_path / "out", "--workers", "0"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {task / 'dataset.json'}: ") and message in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_bad_cases_are_problems_naming_their_file(msd_src, tmp_path):
    task = copy_task(msd_src, tmp_path)
    three_d = task / "imagesTr" / "BRATS_002.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), str(three_d))
    wrong = task / "labelsTr" / "BRATS_003.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((48, 48, 20), np.uint8), np.eye(4)), str(wrong))
    shutil.copy(task / "labelsTr" / "BRATS_001.nii.gz", task / "labelsTr" / "BRATS_009.nii.gz")
    (task / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    scan = scan_source(tmp_path)
    assert [p.id for p in scan.patients] == ["BRATS_001", "BRATS_005"]
    problems = {Path(p.path).name: p.problem for p in scan.problems}
    assert "expected 4D with the 4 modalities" in problems["BRATS_002.nii.gz"]
    assert "label shape 48x48x20 differs from the image's 48x48x24" in problems["BRATS_003.nii.gz"]
    assert "has no image in imagesTr/" in problems["BRATS_009.nii.gz"]
    assert any("skipped 1 macOS '._' resource-fork file(s)" in n for n in scan.notes)


def test_a_label_value_dataset_json_does_not_name_is_refused_when_loading(msd_src, tmp_path):
    task = copy_task(msd_src, tmp_path)
    label = task / "labelsTr" / "BRATS_001.nii.gz"
    img = nib.load(str(label))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 4  # BraTS's ET value: not an MSD label
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(label))
    with pytest.raises(SourceError, match=r"label\(s\) \[4\] outside \[0, 1, 2, 3\]") as info:
        load_patient(scan_source(tmp_path).patients[0])
    assert info.value.path == str(label)


# ---------------------------------------------------------------------------------- build-shards


def _records(shards: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[int]]]:
    store = ShardStore(shards)
    return {r.patient: (r.image, r.mask, r.slice_index) for s in store.manifest.content["shards"]
            for r in store.records(s)}


@pytest.mark.slow
def test_build_shards_equals_the_same_phantoms_from_the_brats2021_layout(msd_src, tmp_path, capsys):
    """Same phantoms, two layouts (4D float32 + MSD values vs 3D int16 + BraTS values): the shards'
    images and masks must be equal, so the modality order and the labels were mapped right."""
    brats = tmp_path / "brats2021"
    synthesize(brats, patients=5, layout="brats2021", shape=SHAPE, seed=0)
    for name, src in (("msd", msd_src), ("brats", brats)):
        code, _, err = cli(["build-shards", "--src", src, "--out", tmp_path / name, "--size", "24", "--workers", "0",
                            "--split", "train=0.5,val=0.5"], capsys)
        assert code == 0, err
    msd, other = _records(tmp_path / "msd"), _records(tmp_path / "brats")
    pairs = {"BRATS_001": "BraTS2021_00000", "BRATS_002": "BraTS2021_00002", "BRATS_003": "BraTS2021_00003",
             "BRATS_005": "BraTS2021_00006"}  # synth index 0, 1, 2, 4 in each layout's numbering
    assert sorted(msd) == sorted(pairs)
    for case, twin in pairs.items():
        np.testing.assert_array_equal(msd[case][0], other[twin][0])
        np.testing.assert_array_equal(msd[case][1], other[twin][1])
        assert msd[case][2] == other[twin][2]
    assert set(np.unique(np.concatenate([m.ravel() for _, m, _ in msd.values()]))) == {0, 1, 2, 3}
    content = ShardStore(tmp_path / "msd").manifest.content
    assert content["source"] == {"layout": "msd", "label_convention": "msd"}
    meta = content["patients"]["BRATS_001"]["meta"]
    assert meta["labels"] == {"0": 0, "1": 2, "2": 1, "3": 3} and meta["folder"] == f"{TASK}/imagesTr"
    code, _, err = cli(["verify", tmp_path / "msd"], capsys)
    assert code == 0, err


def test_the_fingerprint_covers_dataset_json(msd_src, tmp_path):
    from etl.sources import source_fingerprint

    task = copy_task(msd_src, tmp_path)
    before = source_fingerprint(scan_source(tmp_path))
    (task / "dataset.json").write_text((task / "dataset.json").read_text() + " ")
    assert source_fingerprint(scan_source(tmp_path)) != before


# ---------------------------------------------------------------------------------- predict round trip


@pytest.mark.slow
def test_predict_writes_labels_back_in_the_dataset_json_values(msd_src, tmp_path, oracle_registered):
    """The oracle of tests/helpers/predict.py on MSD input: predictions in the source's own
    values (the release's, and a permuted dataset.json's), 3D in the 4D image's geometry."""
    from tests.helpers.predict import make_shards, manifest_of, oracle_checkpoint
    from train.apply import predict
    from train.metrics import patient_scores

    for name, src, ours_to_source in (("release", msd_src, {0: 0, 1: 2, 2: 1, 3: 3}),
                                      ("permuted", tmp_path / "permuted", OURS_TO_PERMUTED)):
        if name == "permuted":
            permuted_task(msd_src, src)
        shards = make_shards(src, tmp_path / f"shards-{name}", size=96)  # 2 x 48: resizing there and back is exact
        checkpoint = oracle_checkpoint(tmp_path / f"{name}.pt", src, manifest_of(shards), target="regions")
        out = tmp_path / f"pred-{name}"
        written = predict.main(checkpoint=checkpoint, inputs=[src], out=out, device="cpu", batch_size=8)
        assert sorted(w.patient for w in written) == [f"BRATS_00{i}" for i in range(1, 6)]  # imagesTs too
        for ref in scan_source(src).patients:
            image = nib.load(ref.files["flair"])
            predicted = nib.load(str(out / f"{ref.id}.nii.gz"))
            assert predicted.shape == SHAPE and predicted.get_data_dtype() == np.uint8
            np.testing.assert_allclose(predicted.affine, image.affine)
            stored = np.asarray(predicted.dataobj)
            source = np.asarray(nib.load(ref.files["seg"]).dataobj)
            assert set(np.unique(stored)) <= {0, 1, 2, 3}
            truth_ours = remap(source, {v: k for k, v in ours_to_source.items()})
            scores = patient_scores(remap(stored, {v: k for k, v in ours_to_source.items()}), truth_ours, (1.0,) * 3)
            for region in ("WT", "TC", "ET"):
                assert scores[region]["dice"] > 0.999, (name, ref.id, region, scores[region])
            assert np.mean(stored[source > 0] == source[source > 0]) > 0.999


# ---------------------------------------------------------------------------------- label names


def test_label_names_are_read_in_the_spellings_datasets_use():
    from shards_spec.labels import convention_from_names, decode_labels, encode_labels

    release = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert convention_from_names(release) == {0: 0, 1: 2, 2: 1, 3: 3}
    brats2017 = {"0": "Background", "1": "Necrotic_core", "2": "Peritumoral Oedema", "3": "NET",
                 "4": "Enhancing-Tumour"}
    mapping = convention_from_names(brats2017)
    assert mapping == {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}
    seg = np.array([0, 1, 2, 3, 4])
    assert encode_labels(seg, mapping).tolist() == [0, 1, 2, 1, 3]
    assert decode_labels(np.array([0, 1, 2, 3]), mapping).tolist() == [0, 1, 2, 4]  # NEC/NET written as the lower 1
    with pytest.raises(ValueError, match="label value 'x' is not a whole number"):
        convention_from_names({"0": "background", "x": "edema"})
