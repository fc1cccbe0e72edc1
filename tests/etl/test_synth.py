"""Tests of the synthetic BraTS generator: layouts, file contents, determinism, realism."""

from __future__ import annotations

import gzip
import inspect
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from etl.synth import LAYOUTS, anatomy, layouts, synthesize
from etl.synth.anatomy import MODALITIES, draw_patient, render
from etl.synth.tissue import CSF, WM

SHAPE = (48, 48, 24)
N = 3
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
MODS_2020 = ("flair", "t1", "t1ce", "t2")
MODS_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """Every layout once: 3 patients of 48x48x24, seed 0 (brats2020 with the quirk at #2)."""
    out = {}
    for layout in LAYOUTS:
        root = tmp_path_factory.mktemp(layout.replace("-", "_"))
        kwargs = {"quirk_355_at": 2} if layout == "brats2020" else {}
        ids = synthesize(root, patients=N, layout=layout, shape=SHAPE, seed=0, **kwargs)
        out[layout] = (root, ids)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _nifti_paths(layout: str, root: Path, pid: str) -> dict[str, Path]:
    if layout == "brats2020":
        d = root / "MICCAI_BraTS2020_TrainingData" / pid
        return {m: d / f"{pid}_{m}.nii" for m in (*MODS_2020, "seg")}
    if layout == "brats2021":
        d = root / "BraTS2021_Training_Data" / pid
        return {m: d / f"{pid}_{m}.nii.gz" for m in (*MODS_2020, "seg")}
    d = root / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData" / pid
    paths = {m: d / f"{pid}-{MODS_2023[m]}.nii.gz" for m in MODS_2020}
    paths["seg"] = d / f"{pid}-seg.nii.gz"
    return paths


# ------------------------------------------------------------------------------ file layouts


@pytest.mark.slow
def test_brats2020_names_quirk_and_csvs(generated):
    root, ids = generated["brats2020"]
    assert ids == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]
    base = root / "MICCAI_BraTS2020_TrainingData"
    expected = {"MICCAI_BraTS2020_TrainingData/name_mapping.csv", "MICCAI_BraTS2020_TrainingData/survival_info.csv"}
    for pid in ids:
        seg = "W39_1998.09.19_Segm.nii" if pid.endswith("_002") else f"{pid}_seg.nii"
        expected |= {f"MICCAI_BraTS2020_TrainingData/{pid}/{pid}_{m}.nii" for m in MODS_2020}
        expected.add(f"MICCAI_BraTS2020_TrainingData/{pid}/{seg}")
    assert set(_files(root)) == expected

    mapping = (base / "name_mapping.csv").read_text().splitlines()
    assert mapping[0] == "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,BraTS_2020_subject_ID"
    rows = [line.split(",") for line in mapping[1:]]
    assert [r[-1] for r in rows] == ids
    assert all(len(r) == 6 and r[0] in ("HGG", "LGG") for r in rows)

    survival = (base / "survival_info.csv").read_text().splitlines()
    assert survival[0] == "Brats20ID,Age,Survival_days,Extent_of_Resection"
    hgg = {r[-1] for r in rows if r[0] == "HGG"}
    for line in survival[1:]:
        pid, age, days, resection = line.split(",")
        assert pid in hgg and 0 < float(age) < 100 and resection in ("GTR", "STR", "NA")
        assert days.isdigit() or (days.startswith("ALIVE (") and days.endswith(" days later)"))


@pytest.mark.slow
def test_real_quirk_applies_to_patient_355_only(tmp_path, monkeypatch):
    sig = inspect.signature(synthesize)
    assert sig.parameters["quirk_355_at"].default is None
    assert sig.parameters["shape"].default == (240, 240, 155)
    assert sig.parameters["layout"].default == "brats2020"
    with pytest.raises(ValueError, match="quirk_355_at"):
        synthesize(tmp_path, patients=3, quirk_355_at=4, shape=SHAPE)
    # 356 patients without rendering each one: every patient reuses one tiny rendering.
    tiny = render(draw_patient(np.random.default_rng([0, 0])), (16, 16, 8))
    monkeypatch.setattr("etl.synth.render", lambda params, shape: tiny)
    synthesize(tmp_path, patients=356, shape=(16, 16, 8))
    base = tmp_path / "MICCAI_BraTS2020_TrainingData"
    odd = sorted(p.relative_to(base).as_posix() for p in base.rglob("*.nii") if "_seg" not in p.name and p.stem.split("_")[-1] not in MODS_2020)
    assert odd == ["BraTS20_Training_355/W39_1998.09.19_Segm.nii"]
    assert (base / "BraTS20_Training_356" / "BraTS20_Training_356_seg.nii").exists()
    assert len((base / "name_mapping.csv").read_text().splitlines()) == 357


def test_brats2021_and_2023_names(generated):
    root, ids = generated["brats2021"]
    assert ids == ["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003"]
    assert set(_files(root)) == {
        f"BraTS2021_Training_Data/{pid}/{pid}_{m}.nii.gz" for pid in ids for m in (*MODS_2020, "seg")
    }
    root, ids = generated["brats2023"]
    assert ids == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000"]
    top = "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    assert set(_files(root)) == {
        f"{top}/{pid}/{pid}-{m}.nii.gz" for pid in ids for m in ("t1n", "t1c", "t2w", "t2f", "seg")
    }


def test_kaggle_names_and_meta(generated):
    root, ids = generated["kaggle-h5"]
    assert ids == ["volume_1", "volume_2", "volume_3"]
    data = "BraTS2020_training_data/content/data"
    expected = {f"{data}/volume_{v}_slice_{s}.h5" for v in (1, 2, 3) for s in range(SHAPE[2])}
    assert set(_files(root)) == expected | {f"{data}/meta_data.csv"}
    lines = (root / data / "meta_data.csv").read_text().splitlines()
    assert lines[0] == "slice_path,target,volume,slice,label0_pxl_cnt,label1_pxl_cnt,label2_pxl_cnt,background_ratio"
    assert len(lines) == 1 + N * SHAPE[2]
    for line in lines[1:]:
        path, target, volume, sl, c0, c1, c2, ratio = line.split(",")
        assert path == f"/content/data/volume_{volume}_slice_{sl}.h5"
        with h5py.File(root / data / Path(path).name) as f:
            mask = f["mask"][()]
        assert [int(c0), int(c1), int(c2)] == [int(mask[..., k].sum()) for k in range(3)]
        assert int(target) == int(mask.any())
        assert float(ratio) == pytest.approx(1.0 - mask.sum() / (SHAPE[0] * SHAPE[1]))
    assert any(line.split(",")[1] == "1" for line in lines[1:])


# ---------------------------------------------------------------------------- file contents


@pytest.mark.parametrize("layout", ["brats2020", "brats2021", "brats2023"])
def test_nifti_contents(generated, layout):
    root, ids = generated[layout]
    labels = {0, 1, 2, 4} if layout != "brats2023" else {0, 1, 2, 3}
    et = 4 if layout != "brats2023" else 3
    seen = set()
    for pid in ids:
        paths = _nifti_paths(layout, root, pid)
        if layout == "brats2020" and pid.endswith("_002"):
            paths["seg"] = paths["seg"].with_name("W39_1998.09.19_Segm.nii")
        imgs = {m: nib.load(p) for m, p in paths.items()}
        nonzero = []
        for m, img in imgs.items():
            assert img.shape == SHAPE
            assert img.header.get_zooms() == (1.0, 1.0, 1.0)
            assert img.header.get_xyzt_units() == ("mm", "sec")
            np.testing.assert_array_equal(img.affine, AFFINE)
            data = np.asarray(img.dataobj)
            if m == "seg":
                assert data.dtype == np.uint8
                assert set(np.unique(data)) <= labels
                seen |= set(np.unique(data).tolist())
            else:
                assert data.dtype == np.int16
                assert data.min() >= 0 and 0 < data.max() < 10000
                nonzero.append(data != 0)
        # Skull-stripped: the same brain mask in every modality, zero outside, labels inside.
        brain = nonzero[0]
        assert 0.05 < brain.mean() < 0.4
        for mask in nonzero[1:]:
            np.testing.assert_array_equal(mask, brain)
        seg = np.asarray(imgs["seg"].dataobj)
        assert not seg[~brain].any()
        assert seg.any(), "every BraTS training patient has a tumour"
    assert et in seen and {1, 2} <= seen


def test_layouts_hold_the_same_patients(generated):
    """Patient i is the same in every layout; only names, compression and label codes differ."""
    r20, ids20 = generated["brats2020"]
    r21, ids21 = generated["brats2021"]
    r23, ids23 = generated["brats2023"]
    rk, _ = generated["kaggle-h5"]
    p20 = _nifti_paths("brats2020", r20, ids20[0])
    p21 = _nifti_paths("brats2021", r21, ids21[0])
    p23 = _nifti_paths("brats2023", r23, ids23[0])
    vol = {m: np.asarray(nib.load(p20[m]).dataobj) for m in p20}
    for m in MODS_2020:
        np.testing.assert_array_equal(np.asarray(nib.load(p21[m]).dataobj), vol[m])
        np.testing.assert_array_equal(np.asarray(nib.load(p23[m]).dataobj), vol[m])
    seg23 = np.asarray(nib.load(p23["seg"]).dataobj)
    np.testing.assert_array_equal(seg23, np.where(vol["seg"] == 4, 3, vol["seg"]))
    # Kaggle volume_1 = BraTS20_Training_001, default channel order FLAIR, T1, T1ce, T2.
    s = int(np.argmax((vol["seg"] > 0).sum(axis=(0, 1))))
    with h5py.File(rk / "BraTS2020_training_data/content/data" / f"volume_1_slice_{s}.h5") as f:
        image, mask = f["image"][()], f["mask"][()]
    for c, m in enumerate(("flair", "t1", "t1ce", "t2")):
        np.testing.assert_array_equal(image[..., c], vol[m][:, :, s].astype(np.float64))
    np.testing.assert_array_equal(mask[..., 2], vol["seg"][:, :, s] == 4)


def test_kaggle_h5_contents(generated):
    root, _ = generated["kaggle-h5"]
    data = root / "BraTS2020_training_data/content/data"
    ncr = ed = et = 0
    for path in sorted(data.glob("volume_1_slice_*.h5")):
        with h5py.File(path) as f:
            assert set(f.keys()) == {"image", "mask"}
            image, mask = f["image"][()], f["mask"][()]
        assert image.shape == (SHAPE[0], SHAPE[1], 4) and image.dtype == np.float64
        assert mask.shape == (SHAPE[0], SHAPE[1], 3) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        assert mask.sum(axis=-1).max() <= 1, "mask channels must not overlap"
        assert (image[mask.any(-1)] > 0).all()
        ncr, ed, et = ncr + mask[..., 0].sum(), ed + mask[..., 1].sum(), et + mask[..., 2].sum()
    assert ed > 0 and ncr + et > 0


def test_kaggle_channel_order_and_background(tmp_path):
    a = synthesize(tmp_path / "a", patients=1, layout="kaggle-h5", shape=SHAPE, seed=3)
    order = ("t1", "t1ce", "t2", "flair")
    synthesize(tmp_path / "b", patients=1, layout="kaggle-h5", shape=SHAPE, seed=3, kaggle_channel_order=order)
    synthesize(tmp_path / "c", patients=1, layout="kaggle-h5", shape=SHAPE, seed=3, kaggle_background=-0.5)
    assert a == ["volume_1"]
    rel = Path("BraTS2020_training_data/content/data")
    default = ("flair", "t1", "t1ce", "t2")
    volumes = {}
    for name in "abc":
        with_slices = []
        for s in range(SHAPE[2]):
            with h5py.File(tmp_path / name / rel / f"volume_1_slice_{s}.h5") as f:
                with_slices.append(f["image"][()])
        volumes[name] = np.stack(with_slices, axis=2)  # (H, W, D, 4)
    for c, m in enumerate(order):
        np.testing.assert_array_equal(volumes["b"][..., c], volumes["a"][..., default.index(m)])
    assert not np.array_equal(volumes["a"], volumes["b"])
    # Normalised copy: background is the constant, brain voxels z-scored per channel.
    brain = volumes["a"][..., 0] != 0
    for c in range(4):
        ch = volumes["c"][..., c]
        assert np.all(ch[~brain] == -0.5)
        assert ch[brain].mean() == pytest.approx(0.0, abs=1e-6)
        assert ch[brain].std() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, generated):
    for layout in ("brats2021", "kaggle-h5"):
        root, _ = generated[layout]
        again = tmp_path / f"again_{layout}"
        synthesize(again, patients=N, layout=layout, shape=SHAPE, seed=0)
        assert _files(again) == _files(root)
    first = next((generated["brats2021"][0] / "BraTS2021_Training_Data").rglob("*_t1.nii.gz")).read_bytes()
    assert first[4:8] == b"\0\0\0\0", "gzip header time must be 0"
    assert gzip.decompress(first)[:4] == (348).to_bytes(4, "little")
    other = tmp_path / "other"
    synthesize(other, patients=N, layout="brats2021", shape=SHAPE, seed=1)
    a, b = _files(generated["brats2021"][0]), _files(other)
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_patient_k_does_not_depend_on_patient_count(tmp_path, generated):
    root3, _ = generated["brats2020"]
    two = tmp_path / "two"
    synthesize(two, patients=2, shape=SHAPE, seed=0, quirk_355_at=2)
    files2, files3 = _files(two), _files(root3)
    patient_files = [k for k in files2 if not k.endswith(".csv")]
    assert len(patient_files) == 10
    for k in patient_files:
        assert files2[k] == files3[k], k
    csv = "MICCAI_BraTS2020_TrainingData/name_mapping.csv"
    assert files3[csv].decode().startswith(files2[csv].decode())


def test_no_part_files_and_failed_write_leaves_nothing(tmp_path, generated):
    for root, _ in generated.values():
        assert not [p for p in root.rglob("*") if p.name.endswith((".part", ".partial"))]
    target = tmp_path / "x.nii"
    with pytest.raises(TypeError):
        layouts.write_atomic(target, None)  # fails inside the write
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_patients_done(tmp_path):
    seen = []
    synthesize(tmp_path, patients=2, layout="brats2021", shape=(16, 16, 8), progress=seen.append)
    assert seen == [1, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layout": "brats2019"}, "layout"),
        ({"patients": 0}, "patients"),
        ({"patients": True}, "patients"),
        ({"patients": 2.5}, "patients"),
        ({"shape": (48, 48)}, "shape"),
        ({"shape": (8, 48, 24)}, "shape H"),
        ({"shape": (48, 48, "24")}, "shape D"),
        ({"seed": -1}, "seed"),
        ({"layout": "brats2021", "quirk_355_at": 1}, "quirk_355_at"),
        ({"kaggle_channel_order": ("t1", "t1", "t2", "flair")}, "kaggle_channel_order"),
        ({"kaggle_background": float("nan")}, "kaggle_background"),
        ({"layout": "brats2020", "patients": 1000}, "patients"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"patients": 2, "shape": SHAPE} | kwargs
    with pytest.raises(ValueError, match=match):
        synthesize(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------- realism


@pytest.fixture(scope="module")
def phantoms():
    """A handful of rendered patients (no files) at a small grid, with their tissue maps."""
    params = [draw_patient(np.random.default_rng([0, k])) for k in range(8)]
    return [(p, render(p, (64, 64, 40))) for p in params]


def test_tissue_contrast_per_modality(phantoms):
    for params, r in phantoms:
        img = {m: r.images[m].astype(np.float64) for m in MODALITIES}
        wm = (r.tissue == WM) & (r.seg == 0)
        csf = (r.tissue == CSF) & (r.seg == 0)

        def rel(m, mask):
            return img[m][mask].mean() / img[m][wm].mean()

        # CSF: dark on T1 and FLAIR, bright on T2.
        assert rel("t2", csf) > 1.5 > 0.8 > rel("t1", csf)
        assert rel("flair", csf) < 0.8
        assert img["t2"][csf].mean() / img["t2"][wm].mean() > img["t1"][csf].mean() / img["t1"][wm].mean()
        # Edema: bright on FLAIR and T2 compared with normal white matter.
        ed = r.seg == 2
        assert rel("flair", ed) > 1.15 and rel("t2", ed) > 1.15
        # Enhancing tumour: brighter on T1ce than the edema around it and than white matter.
        et = r.seg == 4
        if et.sum() > 5:
            assert img["t1ce"][et].mean() > 1.1 * img["t1ce"][ed].mean()
            assert rel("t1ce", et) > 1.05
    grades = [p.grade for p, _ in phantoms]
    assert "HGG" in grades


def test_labels_nest(phantoms):
    """NCR/NET and ET sit inside the edema envelope: they almost never touch label 0."""
    core_total = touching = 0
    for _, r in phantoms:
        s = np.pad(r.seg, 1)
        core = (s == 1) | (s == 4)
        near_bg = np.zeros_like(core)
        for axis in range(3):
            for d in (-1, 1):
                near_bg |= np.roll(s, d, axis) == 0
        core_total += core.sum()
        touching += (core & near_bg).sum()
    assert core_total > 0
    assert touching / core_total < 0.05


def test_patients_vary_and_scale_with_the_grid(phantoms):
    # Intensity scales differ between patients (per-patient normalisation matters).
    wm_t1 = [r.images["t1"][(r.tissue == WM) & (r.seg == 0)].mean() for _, r in phantoms]
    assert max(wm_t1) / min(wm_t1) > 1.3
    # The same patient on a finer grid: similar brain and tumour fractions.
    params, coarse = phantoms[0]
    fine = render(params, (96, 96, 60))
    assert fine.brain.mean() == pytest.approx(coarse.brain.mean(), rel=0.1)
    assert (fine.seg > 0).mean() == pytest.approx((coarse.seg > 0).mean(), rel=0.3)


def test_module_constants_match_layouts():
    assert LAYOUTS == ("brats2020", "brats2021", "brats2023", "kaggle-h5", "msd")
    assert anatomy.REF_SHAPE == (240, 240, 155)
