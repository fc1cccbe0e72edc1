"""`etl synth --profile`: a second data set with more variety (that the default data are unchanged
is tests/etl/test_reference_digests.py's byte-for-byte check)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from etl.cli import app
from etl.synth import synthesize
from etl.synth.anatomy import draw_patient, render
from etl.synth.profiles import PROFILES
from shards_spec.errors import run_cli

PATIENTS = 200


def draws(profile: str) -> list:
    return [draw_patient(np.random.default_rng([0, i]), PROFILES[profile]) for i in range(PATIENTS)]


def test_the_shifted_profile_has_the_variety_it_names():
    default, shifted = draws("default"), draws("shifted")

    def share(patients, test) -> float:
        return sum(bool(test(p)) for p in patients) / len(patients)

    without_et = lambda p: not any(lesion.enhancing for lesion in p.lesions)  # noqa: E731
    assert share(shifted, lambda p: p.grade == "LGG") > share(default, lambda p: p.grade == "LGG") + 0.05
    assert share(shifted, without_et) > share(default, without_et) + 0.05
    assert share(shifted, lambda p: len(p.lesions) == 2) > share(default, lambda p: len(p.lesions) == 2) + 0.1
    radii = lambda ps: [p.lesions[0].radius for p in ps]  # noqa: E731
    assert min(radii(shifted)) < min(radii(default)) and max(radii(shifted)) > max(radii(default))
    noise = lambda ps: np.mean([p.modalities["flair"].noise for p in ps])  # noqa: E731
    assert noise(shifted) > 1.5 * noise(default)


def test_a_shifted_patient_renders_with_brats_labels():
    patient = render(draw_patient(np.random.default_rng([0, 3]), PROFILES["shifted"]), (48, 48, 24))
    assert set(np.unique(patient.seg)) <= {0, 1, 2, 4} and patient.seg.any()
    assert all(img.dtype == np.int16 and img[~patient.brain].max() == 0 for img in patient.images.values())


def etl(args: list[str], capsys) -> tuple[int, str, str]:
    """The `etl` CLI in this process, as a user runs it: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        run_cli(app, args)
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else int(exc.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_synth_cli_records_the_profile_and_refuses_to_mix_two(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["synth", "--out", str(out), "--patients", "1", "--shape", "48,48,24"]
    code, _, err = etl(args + ["--profile", "shifted"], capsys)
    assert code == 0, err
    assert json.loads((out / ".etl-synth.json").read_text())["profile"] == "shifted"
    code, _, err = etl(args, capsys)  # the default profile into the shifted folder
    assert code != 0 and "profile shifted" in err and "Traceback" not in err
    code, out_text, _ = etl(args + ["--profile", "shifted"], capsys)  # the same options: nothing to add
    assert code == 0 and "nothing to add" in out_text
    code, _, err = etl(["synth", "--out", str(tmp_path / "x"), "--profile", "odd"], capsys)
    assert code != 0 and "--profile" in err and "shifted" in err and not (tmp_path / "x").exists()


def test_a_default_folder_keeps_its_marker_without_a_profile(tmp_path):
    from etl.synth.folder import prepare

    prepare(tmp_path / "d", layout="brats2020", shape=(48, 48, 24), seed=0, patients=1)  # as `etl synth` does
    synthesize(tmp_path / "d", patients=1, shape=(48, 48, 24))
    assert "profile" not in json.loads((tmp_path / "d" / ".etl-synth.json").read_text())
    assert prepare(tmp_path / "d", layout="brats2020", shape=(48, 48, 24), seed=0, patients=1) == (1, 1)
    with pytest.raises(Exception, match="profile"):
        prepare(tmp_path / "d", layout="brats2020", shape=(48, 48, 24), seed=0, patients=1, profile="shifted")
