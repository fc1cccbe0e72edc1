"""The Kaggle h5 export: volume reassembly, background, channel-order check, bad slices."""

from __future__ import annotations

import itertools
from pathlib import Path

import h5py
import numpy as np
import pytest

from etl.sources import (
    KAGGLE_ORDERS,
    SourceError,
    check_kaggle_channel_order,
    detect_layout,
    load_patient,
    scan_source,
)

from .fixtures import phantom, write_kaggle_volume

SHAPE = (32, 32, 16)
PUBLIC = ("flair", "t1", "t1ce", "t2")
OTHER = ("t1", "t1ce", "t2", "flair")


def data_dir(root: Path) -> Path:
    return root / "BraTS2020_training_data" / "content" / "data"


def test_volumes_are_reassembled_from_slices(make_brats):
    root = make_brats("kaggle-h5", patients=[1, 2, 10])
    for where in (root, data_dir(root), data_dir(root).parent):  # any ancestor of the data folder
        assert detect_layout(where) == "kaggle-h5"
    scan = scan_source(root)
    assert [p.id for p in scan.patients] == ["volume_1", "volume_10", "volume_2"]
    assert not scan.problems and scan.patients[0].grade is None
    assert "spacing assumed 1 mm" in scan.patients[0].meta["geometry"]

    vol = load_patient(scan.patients[2], ["t1", "t1ce", "t2", "flair"], kaggle_channel_order=PUBLIC)
    images, labels = phantom(SHAPE, seed=2)
    assert vol.volume.shape == (4, *SHAPE) and vol.volume.dtype == np.float32
    for i, channel in enumerate(["t1", "t1ce", "t2", "flair"]):  # slices stacked along axis 3, in S order
        np.testing.assert_allclose(vol.volume[i], images[channel], rtol=1e-6)
    np.testing.assert_array_equal(vol.labels, labels)
    np.testing.assert_array_equal(vol.brain, images["t1"] > 0)
    assert np.array_equal(vol.affine, np.eye(4)) and vol.spacing == (1.0, 1.0, 1.0)
    assert vol.source_dtype == "float64"
    assert not any("channel order" in w for w in vol.warnings)


@pytest.mark.parametrize("normalised", ["volume", "slice"])
def test_non_zero_background_is_found_and_zeroed(make_brats, normalised):
    root = make_brats("kaggle-h5", patients=1, kaggle_background=normalised)
    path = data_dir(root) / "volume_1_slice_8.h5"
    with h5py.File(path) as f:
        corner = f["image"][0, 0]
    assert np.all(corner != 0)  # the stored background is a non-zero constant per channel
    vol = load_patient(scan_source(root).patients[0], kaggle_channel_order=PUBLIC)
    images, _ = phantom(SHAPE, seed=1)
    brain = images["t1"] > 0
    np.testing.assert_array_equal(vol.brain, brain)
    assert np.all(vol.volume[:, ~brain] == 0)
    assert np.all(np.any(vol.volume[:, brain] != 0, axis=0))
    assert any("non-zero background" in n for n in vol.notes)
    assert not any("skull-stripped" in w or "channel order" in w for w in vol.warnings)


@pytest.mark.parametrize(
    "stored",
    [PUBLIC, OTHER, ("t2", "flair", "t1", "t1ce"), ("t1ce", "t2", "flair", "t1")],
)
def test_channel_order_contradiction_names_the_stored_order(make_brats, stored):
    root = make_brats("kaggle-h5", patients=1, kaggle_order=stored, kaggle_background=True)
    ref = scan_source(root).patients[0]
    assert load_patient(ref, kaggle_channel_order=stored).warnings == [
        "shape 32x32x16 is not BraTS's 240x240x155 (processed as stored)"
    ]
    for assumed in (PUBLIC, OTHER, stored[::-1]):
        if assumed == stored:
            continue
        warnings = [w for w in load_patient(ref, kaggle_channel_order=assumed).warnings if "channel order" in w]
        assert len(warnings) == 1
        assert f"order {','.join(assumed)} is contradicted" in warnings[0]
        assert f"the data suggest {','.join(stored)}" in warnings[0]


@pytest.mark.slow
def test_channel_order_check_without_labels_and_on_every_permutation():
    images, labels = phantom(SHAPE, seed=5)
    for stored in itertools.permutations(PUBLIC):
        volume = np.stack([images[m] for m in stored])
        assert check_kaggle_channel_order(volume, labels, stored) is None
        swapped = list(stored)
        a, b = swapped.index("t2"), swapped.index("flair")
        swapped[a], swapped[b] = swapped[b], swapped[a]
        assert "suggest " + ",".join(stored) in check_kaggle_channel_order(volume, labels, swapped)
        # Without labels CSF still separates T2 from FLAIR, but T1 and T1ce cannot be told apart.
        assert "CSF" in check_kaggle_channel_order(volume, None, swapped)
        swapped = list(stored)
        a, b = swapped.index("t1"), swapped.index("t1ce")
        swapped[a], swapped[b] = swapped[b], swapped[a]
        assert "enhancing tumour" in check_kaggle_channel_order(volume, labels, swapped)
        assert check_kaggle_channel_order(volume, None, swapped) is None
    scaled = np.stack([images[m] * 1000 - 7 for m in PUBLIC])  # brain-relative ranks: scale-free
    assert check_kaggle_channel_order(scaled, labels, PUBLIC, brain=images["t1"] > 0) is None


def test_channel_order_option_is_validated(make_brats):
    ref = scan_source(make_brats("kaggle-h5", patients=1)).patients[0]
    assert {",".join(PUBLIC), ",".join(OTHER)} == KAGGLE_ORDERS
    assert load_patient(ref, ["flair"], kaggle_channel_order="flair,t1,t1ce,t2").volume.shape == (1, *SHAPE)
    with pytest.raises(SourceError, match="channel order must name each"):
        load_patient(ref, kaggle_channel_order=("flair", "t1", "t1", "t2"))
    with pytest.raises(SourceError, match="unknown modality 'pd'"):
        load_patient(ref, ["t1", "pd"])


def test_missing_and_empty_slices_are_problems_naming_the_volume(make_brats):
    root = make_brats("kaggle-h5", patients=3)
    (data_dir(root) / "volume_2_slice_7.h5").unlink()
    (data_dir(root) / "volume_3_slice_0.h5").write_bytes(b"")
    scan = scan_source(root)
    assert [p.id for p in scan.patients] == ["volume_1"]
    missing, empty = scan.problems
    assert "volume_2 is missing slice(s) 7" in missing.problem and missing.path.endswith("volume_2_slice_7.h5")
    assert "empty file" in empty.problem and empty.path.endswith("volume_3_slice_0.h5")


def test_bad_slice_files(make_brats):
    root = make_brats("kaggle-h5", patients=2)
    (data_dir(root) / "volume_1_slice_0.h5").write_text("not hdf5")
    with h5py.File(data_dir(root) / "volume_2_slice_0.h5", "w") as f:
        f["img"] = np.zeros((32, 32, 4))
    scan = scan_source(root)
    assert scan.patients == []
    assert "not a readable HDF5 file" in scan.problems[0].problem
    assert "has no 'image' or 'mask' dataset" in scan.problems[1].problem


def test_bad_slice_data_is_raised_by_load(make_brats):
    root = make_brats("kaggle-h5", patients=1)
    path = data_dir(root) / "volume_1_slice_5.h5"
    with h5py.File(path, "r+") as f:
        image = f["image"][()]
        image[3, 3, 1] = np.nan
        f["image"][...] = image
    ref = scan_source(root).patients[0]
    with pytest.raises(SourceError, match="non-finite") as info:
        load_patient(ref)
    assert info.value.path == str(path)
    with h5py.File(path, "r+") as f:
        f["image"][...] = np.nan_to_num(image)
        mask = f["mask"][()]
        mask[16, 16] = 1  # a voxel in all three classes
        f["mask"][...] = mask
    with pytest.raises(SourceError, match="overlap") as info:
        load_patient(ref)
    assert info.value.path == str(path)


def test_metadata_csv_is_checked(make_brats):
    root = make_brats("kaggle-h5", patients=1)
    csv = root / "BraTS2020_training_data" / "content" / "BraTS20 Training Metadata.csv"
    csv.write_text("slice_path,target,volume,slice\n/content/data/volume_1_slice_0.h5,0,1,0\n")
    assert any("lists 1 slices" in n for n in scan_source(root).notes)
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(SourceError, match="metadata CSV") as info:
        scan_source(root)
    assert info.value.path == str(csv)


def test_several_slice_folders_are_refused(make_brats, tmp_path):
    make_brats("kaggle-h5", patients=1)
    copy = tmp_path / "copy"
    copy.mkdir()
    write_kaggle_volume(copy, 1, SHAPE, slices=[0])
    with pytest.raises(SourceError, match="several folders"):
        scan_source(tmp_path)
