"""NIfTI source readers: discovery, loading, the 2020 quirks, CSV metadata and every bad input."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from etl.sources import (
    LAYOUTS,
    PatientRef,
    SourceError,
    detect_layout,
    load_patient,
    patient_from_files,
    patient_from_folder,
    scan_source,
    source_fingerprint,
)

from .fixtures import FILE_SUFFIX, brats_id, phantom, write_nifti, write_nifti_patient

SHAPE = (32, 32, 16)


def miccai(root: Path) -> Path:
    return root / "MICCAI_BraTS2020_TrainingData"


def patient_dir(root: Path, layout: str, number: int = 1) -> Path:
    base = miccai(root) if layout == "brats2020" else root
    return base / brats_id(layout, number)


def nifti_file(root: Path, layout: str, key: str, number: int = 1, ext: str | None = None) -> Path:
    ext = ext or (".nii" if layout == "brats2020" else ".nii.gz")
    pid = brats_id(layout, number)
    return patient_dir(root, layout, number) / f"{pid}{FILE_SUFFIX[layout][key]}{ext}"


def only_problem(scan, fragment: str, path_part: str):
    assert len(scan.problems) == 1, [str(p) for p in scan.problems]
    problem = scan.problems[0]
    assert isinstance(problem, SourceError)
    assert fragment in problem.problem
    assert path_part in str(problem.path)
    return problem


# ----------------------------------------------------------------------------- discovery, load


@pytest.mark.parametrize("layout", ["brats2020", "brats2021", "brats2023"])
def test_each_nifti_layout_is_detected_and_loaded(make_brats, layout):
    root = make_brats(layout, patients=2)
    assert detect_layout(root) == layout
    scan = scan_source(root)
    assert scan.layout == layout and not scan.problems
    assert [p.id for p in scan.patients] == [brats_id(layout, 1), brats_id(layout, 2)]

    ref = scan.patients[0]
    assert set(ref.files) == {"t1", "t1ce", "t2", "flair", "seg"}
    vol = load_patient(ref, ["flair", "t1", "t2", "t1ce"])
    images, labels = phantom(SHAPE, seed=1)
    assert vol.volume.shape == (4, *SHAPE) and vol.volume.dtype == np.float32
    for i, channel in enumerate(["flair", "t1", "t2", "t1ce"]):  # channel order as requested
        np.testing.assert_array_equal(vol.volume[i], np.round(images[channel] * 1000))
    assert vol.labels.dtype == np.uint8
    np.testing.assert_array_equal(vol.labels, labels)  # 2020/21 label 4 and 2023 label 3 -> 3
    assert set(np.unique(vol.labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(vol.brain, images["t1"] > 0)
    assert vol.shape == SHAPE and vol.spacing == (1.0, 1.0, 1.0)
    assert vol.affine.dtype == np.float64 and np.allclose(vol.affine, np.eye(4))
    assert vol.source_dtype == "int16"
    assert any("240x240x155" in w for w in vol.warnings)  # tiny shape: does not look like BraTS
    assert not any("spacing" in w or "skull" in w for w in vol.warnings)


def test_root_may_be_the_miccai_folder_or_its_parent(make_brats):
    root = make_brats("brats2020", patients=2)
    outer, inner = scan_source(root), scan_source(miccai(root))
    assert [p.id for p in outer.patients] == [p.id for p in inner.patients]
    assert source_fingerprint(outer) == source_fingerprint(inner)


def test_channel_subset_keeps_the_four_channel_brain_mask(make_brats):
    scan = scan_source(make_brats("brats2021", patients=1))
    full = load_patient(scan.patients[0])
    two = load_patient(scan.patients[0], ["t1ce", "flair"])
    np.testing.assert_array_equal(two.volume, full.volume[[1, 3]])
    np.testing.assert_array_equal(two.brain, full.brain)


def test_compressed_2020_copy_and_float_or_scaled_segmentations(make_brats):
    root = make_brats("brats2020", patients=1, ext=".nii.gz", csv=False)
    seg = nifti_file(root, "brats2020", "seg", ext=".nii.gz")
    source = np.asanyarray(nib.load(seg).dataobj)
    img = nib.Nifti1Image(source.astype(np.int16), np.eye(4))
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, seg)
    expected = load_patient(scan_source(root).patients[0]).labels
    nib.save(nib.Nifti1Image(source.astype(np.float64), np.eye(4)), seg)  # float seg, whole values
    np.testing.assert_array_equal(load_patient(scan_source(root).patients[0]).labels, expected)


def test_brats2020_patient_355_segmentation_is_found_with_a_note(make_brats):
    root = make_brats("brats2020", patients=1, quirk_355=True)
    scan = scan_source(root)
    assert [p.id for p in scan.patients] == ["BraTS20_Training_001", "BraTS20_Training_355"]
    ref = scan.patients[1]
    assert Path(ref.files["seg"]).name == "W39_1998.09.19_Segm.nii"
    assert any("BraTS20_Training_355" in n and "W39_1998.09.19_Segm.nii" in n for n in scan.notes)
    assert set(np.unique(load_patient(ref).labels)) == {0, 1, 2, 3}


def test_several_segmentation_candidates_are_a_problem(make_brats):
    root = make_brats("brats2020", patients=1, quirk_355=True)
    folder = patient_dir(root, "brats2020", 355)
    shutil.copy(folder / "W39_1998.09.19_Segm.nii", folder / "old_seg_v2.nii")
    scan = scan_source(root)
    only_problem(scan, "several candidate segmentations", "BraTS20_Training_355")
    assert [p.id for p in scan.patients] == ["BraTS20_Training_001"]


def test_folders_without_segmentation_are_reported_not_mixed_in(make_brats):
    root = make_brats("brats2020", patients=2, unlabelled=2)
    scan = scan_source(root)
    assert [p.id for p in scan.patients] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert scan.unlabelled == ["BraTS20_Validation_001", "BraTS20_Validation_002"]
    assert not scan.problems

    kept = scan_source(root, require_labels=False)
    assert len(kept.patients) == 4 and kept.unlabelled == []
    val = next(p for p in kept.patients if p.id == "BraTS20_Validation_001")
    assert "seg" not in val.files
    assert load_patient(val, require_labels=False).labels is None
    with pytest.raises(SourceError, match="no segmentation"):
        load_patient(val)


def test_csv_grade_age_and_survival(make_brats):
    root = make_brats("brats2020", patients=3)
    by_id = {p.id: p for p in scan_source(root).patients}
    first, second, third = (by_id[brats_id("brats2020", n)] for n in (1, 2, 3))
    assert (first.grade, second.grade, third.grade) == ("HGG", "LGG", "HGG")
    assert first.meta["age"] == 60.5
    assert first.meta["survival_days"] == 361 and first.meta["survival_censored"] is True  # ALIVE (361 days later)
    assert first.meta["extent_of_resection"] == "GTR"
    assert third.meta["survival_days"] == 103 and third.meta["survival_censored"] is False
    assert "extent_of_resection" not in third.meta  # NA
    assert first.meta["source_ids"]["TCGA_TCIA_subject_ID"] == "TCGA-XX-0001"
    assert "age" not in second.meta  # LGG: not in survival_info.csv


def test_missing_csvs_are_tolerated_and_malformed_ones_named(make_brats):
    root = make_brats("brats2020", patients=1, csv=False)
    assert scan_source(root).patients[0].grade is None
    bad = miccai(root) / "survival_info.csv"
    bad.write_text("Brats20ID,Age,Survival_days,Extent_of_Resection\nBraTS20_Training_001,sixty,100,GTR\n")
    with pytest.raises(SourceError, match="age 'sixty'") as info:
        scan_source(root)
    assert info.value.path == str(bad)
    bad.write_text("Brats20ID,Age,Survival_days,Extent_of_Resection\nBraTS20_Training_001,60,soon,GTR\n")
    with pytest.raises(SourceError, match="Survival_days 'soon'"):
        scan_source(root)
    bad.unlink()
    (miccai(root) / "name_mapping.csv").write_text("Grade,Something\nHGG,x\n")
    with pytest.raises(SourceError, match="BraTS_2020_subject_ID") as info:
        scan_source(root)
    assert info.value.path.endswith("name_mapping.csv")


def test_forced_and_mixed_layouts(make_brats, tmp_path):
    make_brats("brats2021", patients=1)
    make_brats("brats2023", patients=1)
    with pytest.raises(SourceError, match="more than one layout.*--layout"):
        detect_layout(tmp_path)
    assert scan_source(tmp_path, "brats2023").patients[0].id == "BraTS-GLI-00001-000"
    with pytest.raises(SourceError, match="no brats2020 data"):
        scan_source(tmp_path, "brats2020")
    with pytest.raises(SourceError, match="unknown layout"):
        scan_source(tmp_path, "brats1999")
    assert set(LAYOUTS) == {"brats2020", "brats2021", "brats2023", "kaggle-h5", "msd"}


def test_fingerprint_tracks_file_sizes(make_brats):
    root = make_brats("brats2021", patients=2)
    before = source_fingerprint(scan_source(root))
    assert before == source_fingerprint(scan_source(root))
    path = nifti_file(root, "brats2021", "t2", number=2)
    path.write_bytes(path.read_bytes() + b"\0")
    assert source_fingerprint(scan_source(root)) != before


# ---------------------------------------------------------------------- predict-side helpers


def test_patient_from_folder_and_from_files(make_brats, tmp_path):
    root = make_brats("brats2023", patients=1)
    folder = patient_dir(root, "brats2023")
    ref = patient_from_folder(folder)
    assert (ref.id, ref.layout) == ("BraTS-GLI-00001-000", "brats2023")
    assert set(np.unique(load_patient(ref).labels)) == {0, 1, 2, 3}

    renamed = tmp_path / "my patient"  # any folder name, files named <id>_<mod>.nii.gz
    write_nifti_patient(renamed, "case7", "brats2020", SHAPE, seg=False, ext=".nii.gz")
    ref = patient_from_folder(renamed)
    assert (ref.id, ref.layout, "seg" in ref.files) == ("case7", "brats2020", False)
    assert load_patient(ref, ["t1ce", "flair"], require_labels=False).labels is None

    files = {m: str(nifti_file(root, "brats2023", m)) for m in ("t1ce", "flair")}
    ref = patient_from_files(files)
    assert (ref.id, ref.layout) == ("BraTS-GLI-00001-000", "brats2023")
    assert load_patient(ref, ["flair", "t1ce"], require_labels=False).volume.shape == (2, *SHAPE)
    with pytest.raises(SourceError, match="no t1 image"):
        load_patient(ref, ["t1"], require_labels=False)
    with pytest.raises(SourceError, match="does not exist"):
        patient_from_files({"t1": str(tmp_path / "nope.nii.gz")})
    with pytest.raises(SourceError, match="is a file"):
        patient_from_folder(files["flair"])
    assert PatientRef.from_json(ref.to_json()) == ref


# ----------------------------------------------------------------------------------- bad input


def test_empty_folder_missing_root_and_file_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty folder") as info:
        scan_source(tmp_path / "empty")
    assert info.value.path == str(tmp_path / "empty")
    with pytest.raises(SourceError, match="does not exist"):
        detect_layout(tmp_path / "missing")
    (tmp_path / "file.nii").write_bytes(b"x")
    with pytest.raises(SourceError, match="is a file"):
        scan_source(tmp_path / "file.nii")
    (tmp_path / "other" / "stuff").mkdir(parents=True)
    with pytest.raises(SourceError, match="no BraTS data found"):
        detect_layout(tmp_path / "other")


def test_missing_modality(make_brats):
    root = make_brats("brats2020", patients=2)
    nifti_file(root, "brats2020", "t1ce", number=2).unlink()
    scan = scan_source(root)
    only_problem(scan, "no t1ce image", "BraTS20_Training_002")
    assert [p.id for p in scan.patients] == ["BraTS20_Training_001"]


def test_zero_byte_file(make_brats):
    root = make_brats("brats2021", patients=1)
    nifti_file(root, "brats2021", "flair").write_bytes(b"")
    only_problem(scan_source(root), "empty file (0 bytes)", "BraTS2021_00001_flair.nii.gz")


def test_non_nifti_behind_a_nii_name(make_brats):
    root = make_brats("brats2020", patients=1)
    nifti_file(root, "brats2020", "t2").write_text("this is not an image\n" * 40)
    scan = scan_source(root)
    only_problem(scan, "not a readable NIfTI file", "BraTS20_Training_001_t2.nii")
    assert scan.patients == []


def test_truncated_files(make_brats):
    root = make_brats("brats2020", patients=1)
    path = nifti_file(root, "brats2020", "t1")
    path.write_bytes(path.read_bytes()[:5000])
    only_problem(scan_source(root), "truncated file", "BraTS20_Training_001_t1.nii")

    root = make_brats("brats2021", patients=1)  # gzip: only reading the data finds it
    path = nifti_file(root, "brats2021", "t1")
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])
    scan = scan_source(root, check_headers=True)
    assert not scan.problems
    with pytest.raises(SourceError, match="truncated or corrupt") as info:
        load_patient(scan.patients[0])
    assert info.value.path.endswith("BraTS2021_00001_t1.nii.gz")


def test_4d_image(make_brats):
    root = make_brats("brats2023", patients=1)
    path = nifti_file(root, "brats2023", "t2")
    write_nifti(path, np.zeros((*SHAPE, 2), dtype=np.int16))
    only_problem(scan_source(root), "4D image", "BraTS-GLI-00001-000-t2w.nii.gz")


def test_shape_mismatch(make_brats):
    root = make_brats("brats2020", patients=1)
    write_nifti(nifti_file(root, "brats2020", "seg"), np.zeros((32, 32, 15), dtype=np.uint8))
    only_problem(scan_source(root), "differs from the t1 image's 32x32x16", "BraTS20_Training_001_seg.nii")


def test_duplicate_nii_and_nii_gz(make_brats):
    root = make_brats("brats2020", patients=1)
    path = nifti_file(root, "brats2020", "flair")
    shutil.copy(path, str(path) + ".gz")  # content does not matter: present twice is the problem
    problem = only_problem(scan_source(root), "present twice", "BraTS20_Training_001_flair.nii")
    assert ".nii and " in problem.problem


def test_nan_in_an_image(make_brats):
    root = make_brats("brats2021", patients=1)
    path = nifti_file(root, "brats2021", "t1ce")
    data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    data[3, 4, 5] = np.nan
    write_nifti(path, data)
    scan = scan_source(root)
    with pytest.raises(SourceError, match="non-finite") as info:
        load_patient(scan.patients[0])
    assert info.value.path.endswith("BraTS2021_00001_t1ce.nii.gz")


@pytest.mark.parametrize("layout, bad", [("brats2020", 3), ("brats2023", 4), ("brats2021", 7)])
def test_label_outside_the_release_set(make_brats, layout, bad):
    root = make_brats(layout, patients=1)
    path = nifti_file(root, layout, "seg")
    seg = np.asanyarray(nib.load(path).dataobj).copy()
    seg[10, 10, 8] = bad
    write_nifti(path, seg)
    with pytest.raises(SourceError, match=rf"label\(s\) \[{bad}\]") as info:
        load_patient(scan_source(root).patients[0])
    assert info.value.path == str(path)


def test_fractional_segmentation(make_brats):
    root = make_brats("brats2020", patients=1)
    path = nifti_file(root, "brats2020", "seg")
    write_nifti(path, np.asanyarray(nib.load(path).dataobj) * 0.5)
    with pytest.raises(SourceError, match="non-integer"):
        load_patient(scan_source(root).patients[0])


def test_does_not_look_like_brats_warnings(make_brats):
    root = make_brats("brats2021", patients=1)
    for key in ("t1", "t1ce", "t2", "flair", "seg"):
        path = nifti_file(root, "brats2021", key)
        data = np.asanyarray(nib.load(path).dataobj)
        if key != "seg":
            data = data + 50  # noise floor everywhere: not skull-stripped
        write_nifti(path, data.astype(np.int16), affine=np.diag([2.0, 2.0, 3.0, 1.0]), zooms=(2.0, 2.0, 3.0))
    vol = load_patient(scan_source(root).patients[0])
    assert any("spacing (2, 2, 3) mm" in w for w in vol.warnings)
    assert any("skull-stripped" in w for w in vol.warnings)
    assert vol.spacing == (2.0, 2.0, 3.0) and vol.affine[2, 2] == 3.0
