"""Each `train run` option is declared once, as a field of `Config` (`train.config.schema`): its
typer option, its help text with its default, and its checks on the command line, in a `--config`
file, in `train evaluate` and `train predict` all come from that one declaration."""

from __future__ import annotations

import pytest
import typer.main

from tests.cli_help import render_help, squeezed
from train import cli
from train.config.options import REGISTRIES, ConfigError, check_option, choices_of
from train.config.schema import FIELDS, NUMBERS, default_text, kinds, option_name
from train.recipe import schedules

RUN = typer.main.get_command(cli.app).commands["run"]  # type: ignore[attr-defined]
FLAGS = {"config", "resume", "force", "storage_option", "logger", "tracking_uri", "log_images_every"}
"""The options of `train run` that are not `Config` fields (train/cli.py `_run_flags`)."""
SAMPLES = {"int": ("3", 3), "float": ("0.5", 0.5), "str": ("x", "x"), "tuple[str, ...]": ("t1,flair", "t1,flair")}
"""A value of each type as given on the command line, and as the command receives it."""


def invoke(words, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main([str(w) for w in words])
    return info.value.code or 0, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0].removeprefix("error: ")


def test_every_option_of_train_run_is_a_field_or_one_of_the_flags_and_each_field_one_option():
    params = {p.name: p for p in RUN.params}
    assert set(params) == set(FIELDS) | FLAGS
    for name, field in FIELDS.items():
        param = params[name]
        assert param.opts == [option_name(name)] and param.default is None, name  # None: not given
        if kinds(name) == ["bool"]:
            assert param.is_flag and param.secondary_opts == [f"--no-{name.replace('_', '-')}"], name
        else:
            raw, parsed = SAMPLES[kinds(name)[0]]
            got = RUN.make_context("run", [option_name(name), raw]).params[name]
            assert got == parsed and type(got) is type(parsed), (name, got)
        shown = default_text(name)
        assert param.help == field.metadata["help"] + ("" if shown is None else f"  [default: {shown}]"), name


def test_every_field_has_help_and_every_number_a_range_in_its_declaration(capsys, monkeypatch):
    text = squeezed(render_help(cli.app, ["run"], capsys, monkeypatch))
    for name, field in FIELDS.items():
        assert field.metadata["help"].strip() and squeezed(field.metadata["help"]) in text, name
        numeric = kinds(name)[0] in ("int", "float")
        assert (name in NUMBERS) == numeric, name
        assert not (field.metadata["choices"] and field.metadata["registry"]), name


def _out_of_range(name: str) -> int | float:
    bounds = NUMBERS[name]
    if kinds(name)[0] == "int":
        return bounds.low - 1
    return float(bounds.low if bounds.open_low else bounds.low - 1)


@pytest.mark.parametrize("name", sorted(NUMBERS))
def test_an_out_of_range_number_is_refused_alike_by_the_command_line_and_a_config_file(name, tmp_path, capsys):
    value = _out_of_range(name)
    base = ["run", "--shards", tmp_path / "s", "--variant", "v1", "--out", tmp_path / "r"]
    code, err = invoke([*base, option_name(name), value], capsys)
    flag_line = error_line(err)
    assert code == 2 and flag_line.startswith(f"{option_name(name)}: must be")
    path = tmp_path / "run.toml"
    path.write_text(f"{name} = {value!r}\n")
    code, err = invoke([*base, "--config", path], capsys)
    assert code == 2 and error_line(err) == f"{path}: {name}: " + flag_line.split(": ", 1)[1]
    with pytest.raises(ConfigError) as info:
        check_option(name, value)
    assert str(info.value) == flag_line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", sorted(n for n in FIELDS if choices_of(n) is not None))
def test_every_choice_is_checked_against_its_declared_or_registered_words(name, tmp_path, capsys):
    code, err = invoke(["run", "--shards", tmp_path / "s", "--variant", "v1", "--out", tmp_path / "r",
                        option_name(name), "nope"], capsys)
    assert code == 2 and error_line(err) == f"{option_name(name)}: must be one of {list(choices_of(name))}, got 'nope'"
    for word in choices_of(name):
        check_option(name, word)  # every allowed word passes


def test_registered_names_are_looked_up_when_a_value_is_checked():
    assert set(REGISTRIES) == {f.metadata["registry"] for f in FIELDS.values() if f.metadata["registry"]}
    with pytest.raises(ConfigError, match=r"^--schedule: must be one of \['cosine', 'poly', 'plateau'\], got 'toy'$"):
        check_option("schedule", "toy")
    schedules.register_schedule("toy", decay=lambda lr, t: lr)
    try:
        check_option("schedule", "toy")  # registered after the declaration, accepted
    finally:
        schedules.SCHEDULES.pop("toy")


@pytest.mark.parametrize("flag, value", [("--device", "tpu"), ("--batch-size", "0"), ("--workers", "-1")])
def test_evaluate_and_predict_refuse_a_shared_option_as_train_run_does(flag, value, tmp_path, capsys):
    """Checked before anything is read: the checkpoint and the inputs do not exist."""
    code, err = invoke(["run", "--shards", tmp_path / "s", "--variant", "v1", "--out", tmp_path / "r", flag, value],
                       capsys)
    expected = error_line(err)
    assert code == 2 and expected.startswith(f"{flag}: must be")
    commands = [["evaluate", "--checkpoint", tmp_path / "c.pt", "--shards", tmp_path / "s"]]
    if flag != "--workers":  # predict has no loader workers
        commands.append(["predict", "--checkpoint", tmp_path / "c.pt", "--input", tmp_path / "p",
                         "--out", tmp_path / "o"])
    for command in commands:
        code, err = invoke([*command, flag, value], capsys)
        assert code == 2 and error_line(err) == expected, command
