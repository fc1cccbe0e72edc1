"""`train evaluate`: each level against an independent computation.

- patient-level aggregation (counts, BraTS empty rule, mean/median/std) vs plain numpy;
- slice level vs the trainer's own metrics.csv row for the checkpoint's epoch (a real `train run`);
- `--src` vs `train predict` + an independent scoring of the written NIfTI (numpy Dice, MONAI's
  HD95) against the segmentation file;
- an oracle checkpoint scores 1 everywhere, and empty cases are counted;
- other shards: a warning; shards without the model's channels: one line, exit 2.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from etl.sources import scan_source
from shards_spec.labels import encode_labels
from tests.helpers.predict import (
    make_shards,
    make_source,
    manifest_of,
    oracle_checkpoint,
    run_cli,
    unet_checkpoint,
)
from train import fit, metrics
from train.apply import evaluate, predict
from train.metrics import PATIENT_KEYS

torch.set_num_threads(1)


def quiet_console():
    from rich.console import Console

    return Console(quiet=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    src = make_source(root / "src", "brats2020", patients=3)
    shards = make_shards(src, root / "shards", size=32)
    return src, shards


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A real two-epoch `train run` (tiny U-Net) on the shards."""
    _, shards = data
    out = tmp_path_factory.mktemp("run") / "run"
    # the seed's zero output bias and plateau schedule: two tiny epochs that already predict some tumour
    fit.run(dict(shards=str(shards), variant="v1", target="classes", stem=1, out=str(out), epochs=2, batch_size=8, workers=0, base=4, depth=2,
                 lr=0.01, seed=1, report=False, head_bias="zero", schedule="plateau"),
            hooks=fit.Hooks(console=quiet_console()))
    return out


# ---------------------------------------------------------------- aggregation vs numpy


def numpy_masks(labels):
    return {"NEC/NET": labels == 1, "ED": labels == 2, "ET": labels == 3, "WT": labels > 0,
            "TC": (labels == 1) | (labels == 3)}


def test_patient_aggregation_matches_numpy():
    rng = np.random.default_rng(0)
    per_patient, expected = [], {k: [] for k in PATIENT_KEYS}
    for i in range(5):
        truth = rng.choice(4, size=(6, 8, 8), p=[0.7, 0.1, 0.1, 0.1]).astype(np.uint8)
        pred = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, 4, truth.shape)).astype(np.uint8)
        if i == 1:
            truth[truth == 3], pred[pred == 3] = 0, 0  # ET empty in both: Dice 1
        if i == 2:
            truth[truth == 1] = 0  # NEC/NET predicted, absent in truth: Dice 0
        counts = metrics.patient_counts(pred, truth)
        scores = {k: metrics.scores_of(c, metrics.BRATS) for k, c in counts.items()}
        per_patient.append({"patient": f"p{i}", "scores": scores})
        p, t = numpy_masks(pred), numpy_masks(truth)
        for k in PATIENT_KEYS:
            inter, total = np.logical_and(p[k], t[k]).sum(), p[k].sum() + t[k].sum()
            dice = 1.0 if total == 0 else 2 * inter / total
            expected[k].append(dice)
            assert scores[k]["dice"] == pytest.approx(dice, abs=1e-12)
            if p[k].sum():
                assert scores[k]["precision"] == pytest.approx(inter / p[k].sum())
            if t[k].sum():
                assert scores[k]["recall"] == pytest.approx(inter / t[k].sum())
    assert expected["ET"][1] == 1.0 and expected["NEC/NET"][2] == 0.0
    summary = metrics.summarize_patients(per_patient, ("dice",))
    for k in PATIENT_KEYS:
        values = np.asarray(expected[k])
        assert summary[k]["dice"]["mean"] == pytest.approx(values.mean())
        assert summary[k]["dice"]["median"] == pytest.approx(np.median(values))
        assert summary[k]["dice"]["std"] == pytest.approx(values.std(ddof=1))
        assert summary[k]["dice"]["n"] == 5


# ---------------------------------------------------------------- against the trainer and predict


def test_slice_level_equals_the_trainers_log(data, trained, tmp_path):
    _, shards = data
    results = evaluate.main(checkpoint=trained / "checkpoints" / "last.pt", shards=str(shards), split="val",
                            device="cpu", batch_size=5, workers=0, console=quiet_console())
    with open(trained / "metrics.csv", newline="") as fh:
        row = list(csv.DictReader(fh))[-1]
    sl = results["slice_level"]
    assert sl["loss"] == pytest.approx(float(row["val_loss"]), rel=1e-6)
    for name in ("NEC/NET", "ED", "ET"):
        for metric, column in (("dice", "dice"), ("precision", "prec"), ("recall", "recall")):
            logged = float(row[f"{column}_{name}"])
            got = sl[metric][name]
            assert (math.isnan(got) and math.isnan(logged)) or got == pytest.approx(logged, abs=1e-12), (name, metric)
    assert results["manifest_digest"]["match"] is True and results["warnings"] == []


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_src_agrees_with_predict_and_independent_scoring(data, trained, tmp_path):
    from monai.metrics import compute_hausdorff_distance

    src, shards = data
    checkpoint = trained / "checkpoints" / "best.pt"
    json_path = tmp_path / "eval.json"
    evaluate.main(checkpoint=checkpoint, shards=str(shards), split="val", src=src, json_path=json_path,
                  device="cpu", batch_size=6, workers=0, console=quiet_console())
    results = json.loads(json_path.read_text())
    native = results["native_grid"]
    val = manifest_of(shards).patients_of("val")
    assert native["patients"] == len(val) and [p["patient"] for p in native["per_patient"]] == val
    assert "mean/median/sample std over patients" in native["average"]
    assert "summed over every slice" in results["slice_level"]["average"]
    refs = {r.id: r for r in scan_source(src).patients}
    hd95_compared = 0
    for entry in native["per_patient"]:
        ref = refs[entry["patient"]]
        out = tmp_path / f"{ref.id}.nii.gz"
        predict.main(checkpoint=checkpoint, inputs=[Path(ref.meta["folder"])], out=out, device="cpu",
                     console=quiet_console())
        pred = encode_labels(np.asarray(nib.load(str(out)).dataobj), "brats2020")
        truth = encode_labels(np.asarray(nib.load(ref.files["seg"]).dataobj), "brats2020")
        p_masks, t_masks = numpy_masks(pred), numpy_masks(truth)
        for k in PATIENT_KEYS:
            p, t = p_masks[k], t_masks[k]
            dice = 1.0 if not (p.any() or t.any()) else 2 * (p & t).sum() / (p.sum() + t.sum())
            assert entry["scores"][k]["dice"] == pytest.approx(dice, abs=1e-12), k
            if p.any() and t.any():
                hd = compute_hausdorff_distance(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None],
                                                percentile=95).item()
                assert entry["scores"][k]["hd95"] == pytest.approx(hd, abs=1e-4), k
                hd95_compared += 1
            assert entry["voxels"][k] == {"truth": int(t.sum()), "pred": int(p.sum())}
    assert hd95_compared >= 2
    # the per-patient CSV beside the JSON: a shard row and a native row per patient
    with open(tmp_path / "eval_patients.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["patient"], r["grid"]) for r in rows) == sorted((p, g) for p in val for g in ("shard", "native"))
    native_row = next(r for r in rows if r["grid"] == "native")
    assert float(native_row["dice_WT"]) == pytest.approx(native["per_patient"][0]["scores"]["WT"]["dice"])
    assert native_row["hd95_WT"] != "" and next(r for r in rows if r["grid"] == "shard")["hd95_WT"] == ""


def test_oracle_scores_one_and_counts_empty_cases(tmp_path, oracle_registered):  # noqa: F811
    src = make_source(tmp_path / "src", "brats2020", patients=3)
    shards = make_shards(src, tmp_path / "shards", size=96)
    checkpoint = oracle_checkpoint(tmp_path / "oracle.pt", src, manifest_of(shards))
    results = evaluate.main(checkpoint=checkpoint, shards=str(shards), split="val", src=src, device="cpu",
                            batch_size=16, workers=0, console=quiet_console())
    sl = results["slice_level"]
    assert all(math.isnan(sl["dice"][n]) or sl["dice"][n] == 1.0 for n in sl["channels"])
    for block in (results["shard_grid"], results["native_grid"]):
        for entry in block["per_patient"]:
            assert all(entry["scores"][k]["dice"] == 1.0 for k in PATIENT_KEYS), entry
    native = results["native_grid"]
    assert all(entry["scores"][k]["hd95"] == 0.0 for entry in native["per_patient"] for k in PATIENT_KEYS)
    for k in PATIENT_KEYS:
        absent = sum(1 for e in native["per_patient"] if e["voxels"][k]["truth"] == 0)
        assert native["empty_cases"][k] == {"both_empty": absent, "truth_empty_pred_not": 0,
                                            "pred_empty_truth_not": 0}


# ---------------------------------------------------------------- other shards, missing channels


def test_other_shards_warn_and_missing_channels_fail_in_one_line(data, tmp_path, capsys):
    src, shards = data
    manifest = manifest_of(shards)
    other = unet_checkpoint(tmp_path / "other.pt", manifest)
    payload = torch.load(other, weights_only=True)
    payload["manifest_digest"] = "0" * 64
    torch.save(payload, other)
    json_path = tmp_path / "e.json"
    code, out, err = run_cli(["evaluate", "--checkpoint", other, "--shards", shards, "--json", json_path,
                              "--device", "cpu", "--workers", "0"], capsys)
    assert code == 0, err
    assert "not the ones the checkpoint was trained on" in out + err
    saved = json.loads(json_path.read_text())
    assert saved["manifest_digest"]["match"] is False and saved["warnings"]
    assert saved["native_grid"] is None

    two = make_shards(src, tmp_path / "t1t2", size=32, channels=("t1", "t2"))
    code, out, err = run_cli(["evaluate", "--checkpoint", other, "--shards", two, "--workers", "0"], capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "trained on t1ce,flair" in lines[0] and "no t1ce,flair" in lines[0]

    code, out, err = run_cli(["evaluate", "--checkpoint", other, "--shards", shards, "--split", "nope",
                              "--workers", "0"], capsys)
    assert code == 2 and "Traceback" not in err and "nope" in err


def test_headline_is_the_mean_of_the_three_regions_and_names_its_grid_and_options():
    def block(wt, tc, et, n):
        return {"patients": n, "summary": {"WT": {"dice": {"mean": wt}}, "TC": {"dice": {"mean": tc}},
                                           "ET": {"dice": {"mean": et}}}}

    results = {"shard_grid": block(0.9, 0.6, 0.3, 4), "native_grid": None,
               "inference": {"tta": False, "min_et_voxels": 0, "models": 1}}
    assert evaluate.headline(results) == ("mean Dice over WT/TC/ET: 0.600 (WT 0.900, TC 0.600, ET 0.300; per patient "
                                          "on the shard grid (no --src), mean over 4 patients)")
    results.update(native_grid=block(0.8, 0.7, 0.9, 3), inference={"tta": True, "min_et_voxels": 200, "models": 2})
    line = evaluate.headline(results)
    assert line.startswith("mean Dice over WT/TC/ET: 0.800 (WT 0.800, TC 0.700, ET 0.900; per patient on the native grid")
    assert line.endswith("mean over 3 patients; 2 models, mirroring TTA, ET below 200 voxels -> NEC/NET)")
