"""Lesion-wise BraTS metrics (`train.metrics.lesionwise`) against hand computation and against the
official evaluation itself: `brats_evaluation` (its glioma config) running `panoptica`, on
hand-built and random label maps, agreeing within 0.01.

The official pipeline is run as its README shows: `evaluate_single_exam` on NIfTI files, then
`parse_seg_results` (the leaderboard columns) and `parse_mets_results` with every lesion counted
as large (the penalised average); the random cases call panoptica's evaluator on arrays with an
anisotropic spacing.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from train.metrics import lesionwise
from train.metrics.lesionwise import LESION_MAX_HD95, lesionwise_scores

REGIONS = {"WT": "wt", "TC": "tc", "ET": "et"}
TOLERANCE = 0.01


def cube(labels: np.ndarray, low, high, value: int) -> None:
    labels[tuple(slice(a, b) for a, b in zip(low, high))] = value


def hand_built() -> tuple[np.ndarray, np.ndarray]:
    """Truth: ET cube A (4^3) and an edema cube B (5^3) with a NEC core; prediction: A shifted by
    one voxel, B missing its last plane and its core, one stray ET cube C (2^3)."""
    truth = np.zeros((20, 20, 20), np.uint8)
    cube(truth, (2, 2, 2), (6, 6, 6), 3)
    cube(truth, (10, 10, 10), (15, 15, 15), 2)
    cube(truth, (11, 11, 11), (13, 13, 13), 1)
    pred = np.zeros_like(truth)
    cube(pred, (3, 2, 2), (7, 6, 6), 3)
    cube(pred, (10, 10, 10), (14, 15, 15), 2)
    cube(pred, (16, 16, 16), (18, 18, 18), 3)
    return pred, truth


def test_hand_built_case_by_hand():
    pred, truth = hand_built()
    scores = lesionwise_scores(pred, truth)
    dice_a = 2 * 48 / (64 + 64)  # 4x4x4 cubes overlapping in 3x4x4
    dice_b = 2 * 100 / (125 + 100)  # B (with its core) vs B without its last 5x5 plane
    # ET: A matched, C a false positive
    et = scores["ET"]
    assert (et["tp"], et["fp"], et["fn"]) == (1, 1, 0)
    assert et["dice"] == pytest.approx(dice_a) and et["dice_penalised"] == pytest.approx(dice_a / 2)
    assert et["hd95"] == pytest.approx(1.0)  # the shifted faces are 1 voxel apart, the rest 0: p95 of pooled = 1
    assert et["hd95_penalised"] == pytest.approx((1.0 + LESION_MAX_HD95) / 2)
    assert et["f1"] == pytest.approx(1 / (1 + 0.5))
    # TC = NEC core (missed) + ET A (matched) + C (false positive)
    tc = scores["TC"]
    assert (tc["tp"], tc["fp"], tc["fn"]) == (1, 1, 1)
    assert tc["dice"] == pytest.approx(dice_a) and tc["dice_penalised"] == pytest.approx(dice_a / 3)
    # WT: A and B matched, C a false positive
    wt = scores["WT"]
    assert (wt["tp"], wt["fp"], wt["fn"]) == (2, 1, 0)
    assert wt["dice"] == pytest.approx((dice_a + dice_b) / 2)
    assert wt["dice_penalised"] == pytest.approx((dice_a + dice_b) / 3)


def test_empty_cases():
    empty = np.zeros((8, 8, 8), np.uint8)
    one = empty.copy()
    cube(one, (2, 2, 2), (4, 4, 4), 3)
    both_empty = lesionwise_scores(empty, empty)
    assert all(math.isnan(both_empty[r][k]) for r in REGIONS for k in ("dice", "hd95", "dice_penalised"))
    assert both_empty["WT"]["tp"] == both_empty["WT"]["fp"] == both_empty["WT"]["fn"] == 0
    missed = lesionwise_scores(empty, one)["ET"]
    assert (missed["dice"], missed["hd95"], missed["fn"]) == (0.0, LESION_MAX_HD95, 1)
    stray = lesionwise_scores(one, empty)["ET"]
    assert (stray["dice"], stray["hd95"], stray["fp"]) == (0.0, LESION_MAX_HD95, 1)
    assert (stray["dice_penalised"], stray["hd95_penalised"]) == (0.0, LESION_MAX_HD95)  # an FP is still penalised


def test_connectivity_and_one_to_one_matching():
    truth = np.zeros((12, 12, 12), np.uint8)
    cube(truth, (1, 1, 1), (3, 3, 3), 3)
    cube(truth, (3, 3, 3), (5, 5, 5), 3)  # touches the first only at a corner: one lesion (26-connected)
    cube(truth, (7, 1, 1), (11, 9, 9), 3)  # one large lesion ...
    pred = np.zeros_like(truth)
    cube(pred, (7, 1, 1), (11, 4, 9), 3)  # ... predicted in two pieces (96 and 128 voxels): one matches,
    cube(pred, (7, 5, 1), (11, 9, 9), 3)  # one is an FP; the corner-touching pair is missed (FN)
    scores = lesionwise_scores(pred, truth)["ET"]
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 1, 1)
    # the 4x8x8 lesion (256 voxels) takes the larger piece (4x4x8 = 128 voxels), the best Dice
    assert scores["dice"] == pytest.approx(2 * 128 / (256 + 128))


def test_spacing_and_shape_checks():
    pred, truth = hand_built()
    with pytest.raises(ValueError, match="spacing"):
        lesionwise_scores(pred, truth, (1.0, 1.0))
    with pytest.raises(ValueError, match="differ in shape"):
        lesionwise_scores(pred[:-1], truth)
    # a spacing along the shift axis scales the ET HD95 (1 voxel apart = 2.5 mm)
    assert lesionwise_scores(pred, truth, (2.5, 1.0, 1.0))["ET"]["hd95"] == pytest.approx(2.5)


# ---------------------------------------------------------------- against the official package


@pytest.fixture(scope="module")
def evaluator():
    pytest.importorskip("panoptica")
    brats_evaluation = pytest.importorskip("brats_evaluation")
    from panoptica import Panoptica_Evaluator

    with contextlib.redirect_stdout(io.StringIO()):
        return Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path("gli")))


def official(evaluator, pred: np.ndarray, truth: np.ndarray, spacing, tmp_path: Path) -> tuple[dict, dict]:
    """The package's leaderboard row (`seg`) and penalised row (`mets`, every lesion large)."""
    from brats_evaluation import evaluate_single_exam, parse_mets_results, parse_seg_results

    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(truth, affine), str(tmp_path / "ref.nii.gz"))
    nib.save(nib.Nifti1Image(pred, affine), str(tmp_path / "pred.nii.gz"))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        result = evaluate_single_exam(str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "00001-000",
                                      evaluator)
        assert "error" not in result, result
        # numpy integers in panoptica's dict: the package's own json.dump stumbles on them
        (tmp_path / "summary.json").write_text(json.dumps({"metrics": [result], "missings": []},
                                                          default=lambda o: o.item()))
        parse_seg_results(str(tmp_path / "summary.json"), str(tmp_path / "seg.csv"))
        parse_mets_results(str(tmp_path / "summary.json"), 0.0, 0.0, str(tmp_path / "mets.csv"))
    rows = []
    for name in ("seg.csv", "mets.csv"):
        with open(tmp_path / name) as handle:
            rows.append(next(csv.DictReader(handle)))  # the subject's row (mean/std/median follow)
    return rows[0], rows[1]


def as_number(text: str) -> float:
    value = float(text) if text not in ("", None) else math.nan
    return LESION_MAX_HD95 if math.isinf(value) else value


def agree(ours: float, theirs: float) -> bool:
    if math.isnan(theirs):
        return math.isnan(ours)
    return abs(ours - theirs) <= TOLERANCE


def test_hand_built_case_agrees_with_the_official_pipeline(evaluator, tmp_path):
    pred, truth = hand_built()
    spacing = (1.0, 1.5, 2.0)
    seg, mets = official(evaluator, pred, truth, spacing, tmp_path)
    ours = lesionwise_scores(pred, truth, spacing)
    for region, key in REGIONS.items():
        pairs = [("dice", seg[f"lesionwise_dsc_mean_{key}"]), ("hd95", seg[f"lesionwise_hd95_mean_{key}"]),
                 ("tp", seg[f"all_instance_tp_{key}"]), ("fp", seg[f"all_instance_fp_{key}"]),
                 ("fn", seg[f"all_instance_fn_{key}"]), ("f1", seg[f"all_instance_f1_{key}"]),
                 ("dice_penalised", mets[f"lesionwise_dsc_mean_{key}"]),
                 ("hd95_penalised", mets[f"lesionwise_hd95_mean_{key}"])]
        for name, theirs in pairs:
            assert agree(ours[region][name], as_number(theirs)), (region, name, ours[region][name], theirs)


def panoptica_quietly(evaluator, pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """The official evaluator's results for one case, without its prints and warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return evaluator.evaluate(pred, truth, voxelspacing=spacing, verbose=False)


def random_labels(rng: np.random.Generator, shape, blobs: int) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    for _ in range(blobs):
        centre, radius = rng.integers(0, shape), rng.integers(1, 4, size=len(shape))
        labels[tuple(slice(max(c - r, 0), c + r + 1) for c, r in zip(centre, radius))] = rng.integers(1, 4)
    return labels


def test_random_label_maps_agree_with_panoptica(evaluator):
    rng = np.random.default_rng(14)
    compared = {"matched": 0, "fp": 0, "fn": 0}
    for case in range(24):
        shape = (24, 20, 16)
        truth = random_labels(rng, shape, int(rng.integers(0, 7)))
        pred = random_labels(rng, shape, int(rng.integers(0, 7)))
        if case % 2:  # mostly right: lesions overlap and get matched
            pred = np.where(rng.random(shape) < 0.9, truth, pred).astype(np.uint8)
        spacing = (1.0, 1.5, 2.0) if case % 3 else (1.0, 1.0, 1.0)
        ours = lesionwise_scores(pred, truth, spacing)
        theirs = panoptica_quietly(evaluator, pred, truth, spacing)
        for region, key in REGIONS.items():
            result = theirs[key].to_dict(True)
            for name, other in (("dice", "sq_dsc"), ("hd95", "sq_hd95"), ("tp", "tp"), ("fp", "fp"), ("fn", "fn"),
                                ("f1", "rq")):
                value = result.get(other)
                assert agree(ours[region][name], as_number(value)), (case, region, name, ours[region][name], value)
            compared["matched"] += ours[region]["tp"]
            compared["fp"] += ours[region]["fp"]
            compared["fn"] += ours[region]["fn"]
    assert min(compared.values()) >= 10, compared  # the cases exercised matches, FPs and FNs


# ---------------------------------------------------------------- speckled predictions: sparse matching


def speckle(shape, label: int, shift: int = 0) -> np.ndarray:
    """One-voxel lesions at every even (x, y, z), moved `shift` voxels along x: one per 2x2x2 cell."""
    labels = np.zeros(shape, np.uint8)
    labels[shift::2, ::2, ::2] = label
    return labels


def test_sparse_matching_finds_the_dense_optimum():
    """The sparse solve reaches the package's optimum (`linear_sum_assignment` on its dense matrix):
    same number of matches and total Dice, one to one, only overlapping pairs; ties included."""
    rng = np.random.default_rng(20)
    for _ in range(200):
        n_true, n_pred = (int(n) for n in rng.integers(1, 25, 2))
        flat = rng.choice(n_true * n_pred, int(rng.integers(1, n_true * n_pred + 1)), replace=False)
        rows, cols = np.divmod(flat, n_pred)
        rows, cols = rows + 1, cols + 1  # lesion labels start at 1
        order = np.argsort(rows * (n_pred + 1) + cols)
        rows, cols = rows[order], cols[order]
        dice = np.ceil(rng.random(len(rows)) * 5) / 5 if rng.random() < 0.5 else rng.uniform(0.01, 1, len(rows))
        dense = lesionwise._dense_matching(rows * (n_pred + 1) + cols, dice, rows, cols, n_true, n_pred)
        sparse = lesionwise._sparse_matching(rows, cols, dice)
        assert len(set(rows[sparse])) == len(set(cols[sparse])) == len(sparse) == len(dense)
        assert dice[sparse].sum() == pytest.approx(dice[dense].sum(), abs=1e-9)


@pytest.mark.slow
def test_speckled_prediction_agrees_with_panoptica(evaluator, monkeypatch):
    """A poor model's speckled prediction (864 one-voxel lesions) against a few solid lesions: every
    number equals the package's, the HD95 too although many speckles tie for each lesion (the dense
    solve breaks ties its way). Forced onto the sparse solve, as lesion counts past
    DENSE_MATCH_LIMIT are, speckle against speckle: the tie-free numbers still agree."""
    shape, spacing = (24, 24, 12), (1.0, 1.5, 2.0)
    truth = np.zeros(shape, np.uint8)
    cube(truth, (2, 3, 2), (9, 11, 8), 2)
    cube(truth, (4, 5, 3), (7, 8, 6), 3)
    cube(truth, (14, 12, 5), (20, 22, 10), 1)
    pred = speckle(shape, 3)

    def compare(pred, truth, names) -> int:
        ours = lesionwise_scores(pred, truth, spacing)
        theirs = panoptica_quietly(evaluator, pred, truth, spacing)
        for region, key in REGIONS.items():
            result = theirs[key].to_dict(True)
            for name, other in names:
                assert agree(ours[region][name], as_number(result.get(other))), (region, name, ours[region][name])
        return sum(ours[r]["tp"] for r in REGIONS)

    everything = (("dice", "sq_dsc"), ("hd95", "sq_hd95"), ("tp", "tp"), ("fp", "fp"), ("fn", "fn"), ("f1", "rq"))
    assert compare(pred, truth, everything) == 5  # each of the 5 region lesions matched one speckle
    monkeypatch.setattr(lesionwise, "DENSE_MATCH_LIMIT", 0)
    tie_free = [pair for pair in everything if pair[0] != "hd95"]
    rng = np.random.default_rng(7)
    matched = compare(pred, truth, tie_free)
    for _ in range(3):
        truth = ((rng.random(shape) < 0.1) * rng.integers(1, 4, shape)).astype(np.uint8)
        pred = np.where(rng.random(shape) < 0.5, truth, speckle(shape, int(rng.integers(1, 4)))).astype(np.uint8)
        matched += compare(pred, truth, tie_free)
    assert matched > 300  # hundreds of pairs went through the sparse solve


@pytest.mark.slow
def test_speckled_prediction_memory_stays_bounded():
    """16,384 one-voxel lesions on each side (64x64x32): the package's dense cost matrix alone would
    take 2 GiB; matched sparsely the whole evaluation stays under 16 MiB, with the exact counts."""
    import tracemalloc

    shape = (64, 64, 32)
    pred = speckle(shape, 2)  # edema: WT only
    truth = speckle(shape, 2, shift=1)  # touches no predicted lesion ...
    truth[:4] = pred[:4]  # ... except the first 1,024, which are the same voxels
    n = pred.size // 8
    assert n * n > lesionwise.DENSE_MATCH_LIMIT  # the sparse solve is the one measured
    tracemalloc.start()
    try:
        scores = lesionwise_scores(pred, truth)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    wt = scores["WT"]
    same = 2 * 32 * 16
    assert (wt["tp"], wt["fp"], wt["fn"]) == (same, n - same, n - same)
    assert (wt["dice"], wt["hd95"]) == (1.0, 0.0)
    assert wt["dice_penalised"] == pytest.approx(same / (same + 2 * (n - same)))
    assert wt["f1"] == pytest.approx(same / (same + (n - same)))
    assert math.isnan(scores["ET"]["dice"]) and scores["ET"]["tp"] == scores["ET"]["fp"] == 0
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"


# ---------------------------------------------------------------- train evaluate --lesion-wise, end to end


def test_evaluate_lesion_wise_end_to_end(tmp_path, capsys):
    """On a tiny synthetic dataset: the per-patient lesion-wise numbers of `train evaluate` equal the
    official pipeline's on what `train predict` writes for the same patient; JSON, CSV and table agree."""
    from rich.console import Console

    from etl.sources import load_patient, scan_source
    from tests.helpers.predict import make_shards, make_source, manifest_of, read_labels, run_cli, unet_checkpoint
    from train.apply import evaluate, predict

    src = make_source(tmp_path / "src", "brats2020", patients=3)
    shards = make_shards(src, tmp_path / "shards", size=32)
    checkpoint = unet_checkpoint(tmp_path / "best.pt", manifest_of(shards), seed=3)
    console = Console(file=io.StringIO(), width=250)
    results = evaluate.main(checkpoint=checkpoint, shards=str(shards), split="val", src=src, device="cpu",
                            batch_size=8, workers=0, json_path=tmp_path / "eval.json", console=console,
                            lesion_wise=True)
    native = results["native_grid"]
    assert native["patients"] >= 1 and native["lesion_wise"] is not None
    refs = {ref.id: ref for ref in scan_source(src).patients}
    for entry in native["per_patient"]:
        ref = refs[entry["patient"]]
        out = tmp_path / "pred" / f"{ref.id}.nii.gz"
        predict.main(checkpoint=checkpoint, inputs=[Path(ref.meta["folder"])], out=out, device="cpu")
        truth = load_patient(ref).labels
        independent = lesionwise_scores(read_labels(out, "brats2020"), truth, tuple(entry["spacing"]))
        assert entry["lesion_wise"] == independent
        assert sum(independent[r]["tp"] + independent[r]["fp"] + independent[r]["fn"] for r in REGIONS) > 0
        if importlib.util.find_spec("panoptica") and importlib.util.find_spec("brats_evaluation"):
            from brats_evaluation import config_path
            from panoptica import Panoptica_Evaluator

            with contextlib.redirect_stdout(io.StringIO()):
                evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
            seg, _ = official(evaluator, read_labels(out, "brats2020"), truth, tuple(entry["spacing"]), tmp_path)
            for region, key in REGIONS.items():
                assert agree(entry["lesion_wise"][region]["dice"], as_number(seg[f"lesionwise_dsc_mean_{key}"]))
                assert agree(entry["lesion_wise"][region]["hd95"], as_number(seg[f"lesionwise_hd95_mean_{key}"]))
    # the summary is the mean over patients with NaN left out; lesions are summed
    block = native["lesion_wise"]
    for region in REGIONS:
        values = [p["lesion_wise"][region]["dice"] for p in native["per_patient"]]
        expected = float(np.nanmean(values)) if not all(math.isnan(v) for v in values) else math.nan
        assert agree(block["summary"][region]["dice"]["mean"], expected)
        assert block["lesions"][region]["fp"] == sum(p["lesion_wise"][region]["fp"] for p in native["per_patient"])
    # JSON and CSV carry them, the table shows them beside the 2020 numbers
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["native_grid"]["lesion_wise"]["lesions"] == block["lesions"]
    with open(tmp_path / "eval_patients.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["grid"] == "native"]
    assert len(rows) == native["patients"]
    for row, entry in zip(rows, native["per_patient"]):
        for region in REGIONS:
            assert agree(float(row[f"lesion_dice_{region}"]), entry["lesion_wise"][region]["dice"])
            assert int(float(row[f"lesion_fp_{region}"])) == entry["lesion_wise"][region]["fp"]
    table = console.file.getvalue()
    assert "lesion dice" in table and "lesion hd95 (mm)" in table
    # --lesion-wise without --src: one line, exit 2
    capsys.readouterr()
    code, _, err = run_cli(["evaluate", "--checkpoint", checkpoint, "--shards", shards, "--lesion-wise",
                            "--device", "cpu"], capsys)
    assert code == 2 and "--lesion-wise" in err and "--src" in err and len(err.strip().splitlines()) == 1
