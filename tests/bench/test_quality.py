"""bench/quality.py end to end on a tiny dataset with a tiny budget: it runs and writes its table
(a measurement script: nothing here asserts a score)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_harness_trains_ours_and_the_peer_scores_both_and_writes_its_section(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    command = [sys.executable, str(ROOT / "bench" / "quality.py"), "--work", str(tmp_path / "work"),
               "--patients", "5", "--shape", "48,48,24", "--size", "32", "--budget", "6", "--label", "tiny",
               "--contender", "ours=--variant v2 --base 4 --depth 2 --batch-size 4 --stem 1", "--contender", "monai",
               "--score-variant", "tta=--tta", "--starvation-steps", "3", "--markdown", str(markdown), "--write",
               "--profile", "shifted", "--load", "1"]  # the second data set, beside one busy process
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    text = markdown.read_text()
    assert "kept" in text  # other sections untouched
    section = text.split("<!-- bench:quality-tiny -->")[1].split("<!-- /bench:quality-tiny -->")[0]
    main_table, patient_table = section.split("Per validation patient, mean class Dice")
    rows = [line for line in main_table.splitlines() if line.startswith("| ")]
    names = ["ours@load1", "monai@load1", "ours@load1 tta"]
    assert [r.split("|")[1].strip() for r in rows[1:]] == names
    busy = rows[0].split("|").index(" busy ")
    assert [r.split("|")[busy].strip() for r in rows[1:]] == ["1", "1", "1"]
    assert "profile shifted" in section and "ours@load1 − monai@load1: mean class Dice" in section
    marker = json.loads(next((tmp_path / "work").glob("*-shifted/source/.etl-synth.json")).read_text())
    assert marker["profile"] == "shifted"
    assert "Loader check (ours@load1's recipe" in section and "steps/s fed from the shards" in section
    assert "native grid" in section and "(tiny; equal budget: 6 s of training each)" in section
    assert (tmp_path / "quality-tiny.png").is_file()
    results = json.loads((tmp_path / "work" / "quality-tiny.json").read_text())
    assert [r["name"] for r in results] == names
    for r in results:
        assert set(r["scores"]["native_dice"]) == {"NEC/NET", "ED", "ET", "WT", "TC"}
        assert all(0.0 <= v <= 1.0 for v in r["scores"]["native_dice"].values())
        assert r["gflop"] > 0 and r["params"] > 0
        per_patient = r["scores"]["per_patient"]  # the mean over patients is the table's mean per class
        assert len(per_patient) == r["scores"]["patients"]
        for name in ("NEC/NET", "ED", "ET"):
            mean = sum(p[name] for p in per_patient.values()) / len(per_patient)
            assert mean == pytest.approx(r["scores"]["native_dice"][name], abs=1e-9)
    patient_rows = [line.split("|")[1:-1] for line in patient_table.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in patient_rows[0]] == ["patient", *names]
    assert sorted(row[0].strip() for row in patient_rows[1:]) == sorted(results[0]["scores"]["per_patient"])
    for row in patient_rows[1:]:
        for result, cell in zip(results, row[1:]):
            dice = result["scores"]["per_patient"][row[0].strip()]
            assert cell.strip() == f"{sum(dice.values()) / 3:.3f} ({dice['NEC/NET']:.2f})"
    assert "ahead in " in section.split("ours@load1 − monai@load1: mean class Dice")[1].splitlines()[0]


def test_a_peer_contender_with_another_seed_trains_the_peer_with_that_seed():
    sys.path.insert(0, str(ROOT))
    from bench import quality

    args = argparse.Namespace(mode="budget", budget=60.0, cap=0.0, peer_workers=1, patience=None, cap_epochs=5)
    seeded = quality.parse_contender("monai-s1=monai --seed 1")
    assert (seeded.name, seeded.options, seeded.peer_seed) == ("monai-s1", None, 1)
    argv = quality.contender_argv(seeded, Path("shards"), args)
    assert argv[1].endswith("monai_peer.py") and argv[argv.index("--seed") + 1] == "1"
    plain = quality.parse_contender("monai")
    assert plain.peer_seed == 0 and quality.contender_argv(plain, Path("shards"), args)[-2:] == ["--seed", "0"]
    assert quality.peer_description(seeded).endswith(", seed 1") and "seed" not in quality.peer_description(plain)
    ours = quality.parse_contender("mine=--variant v2 --seed 1")  # our own --seed stays an option of ours
    assert ours.options == ["--variant", "v2", "--seed", "1"]
    for wrong in ("m=monai --base 8", "m=monai --seed x", "m=monai --seed"):
        with pytest.raises(SystemExit, match="the peer takes only --seed N"):
            quality.parse_contender(wrong)


def test_each_of_ours_is_compared_with_the_peer_of_its_own_seed_and_per_patient():
    sys.path.insert(0, str(ROOT))
    from bench import quality

    def contender(text, per_patient):
        c = quality.parse_contender(text)
        dice = {name: {k: v for k, v in zip(quality.CLASSES, values)} for name, values in per_patient.items()}
        mean = {k: sum(d[k] for d in dice.values()) / len(dice) for k in quality.CLASSES}
        c.scores = {"grid_dice": {**mean, "WT": 0.5, "TC": 0.5}, "native_dice": None, "native_hd95": None,
                    "per_patient": dice, "patients": len(dice)}
        return c

    ours = contender("v2-s1=--variant v2 --seed 1", {"a": (0.7, 0.7, 0.7), "b": (0.3, 0.3, 0.3)})
    peer0 = contender("monai", {"a": (0.9, 0.9, 0.9), "b": (0.9, 0.9, 0.9)})
    peer1 = contender("m1=monai --seed 1", {"a": (0.5, 0.5, 0.5), "b": (0.4, 0.4, 0.4)})
    assert [quality.seed_of(c) for c in (ours, peer0, peer1)] == [1, 0, 1]
    args = argparse.Namespace(mode="budget", budget=60.0, label="t", patients=2, shape="8,8,8", size=8, seed=0,
                              profile="default", parallel=False, cores_per_run=1)
    info = dict(nproc=2, cpu="x", ram_gib=1, python="3", numpy="2", torch="2", load_at_start="0", load_at_end="0")
    text = quality.render([ours, peer0, peer1], None, args, info, None, None)
    line = next(l for l in text.splitlines() if l.startswith("- v2-s1 − "))
    # the peer of seed 1 (0.45 on average; the seed-0 peer's 0.9 would give -0.400): ours 0.5, a +0.2, b -0.1
    assert line.startswith("- v2-s1 − m1: mean class Dice +0.050") and "per patient -0.100 .. +0.200, ahead in 1 of 2" in line
    rows = text.split("Per validation patient")[1].splitlines()
    assert "| a       | 0.700 (0.70) | 0.900 (0.90) | 0.500 (0.50) |" in rows


def test_load_levels_train_every_contender_once_per_level():
    sys.path.insert(0, str(ROOT))
    from bench import quality

    contenders = [quality.parse_contender("v2"), quality.parse_contender("monai")]
    assert quality.with_loads(contenders, [0]) == contenders
    both = quality.with_loads(contenders, quality.parse_loads("0,1"))
    assert [(c.name, c.load) for c in both] == [("v2", 0), ("monai", 0), ("v2@load1", 1), ("monai@load1", 1)]
    assert both[2].options == ["--variant", "v2"] and both[3].options is None
    for wrong in ("", "x", "-1", "0,0", "9"):
        with pytest.raises(SystemExit, match="--load"):
            quality.parse_loads(wrong)
