"""`train`'s command-line conventions (issue 14, items 8 and 9): --help in 80 columns with whole
descriptions and examples that are valid commands, on/off options both ways, --version, shell
completion, `--config FILE` under the flags, `--device cuda:N` / `mps` and their one-line refusals."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
import typer.main

from tests.cli_help import check_help_page, check_toggles, complete, examples, parse_example, render_help, squeezed
from train import cli, fit
from train.apply import inference
from train.config.options import FIELDS, PRESETS, config_record, resolve
from train.runfiles.rundir import write_config
from train.runtime import devices

GROUP = typer.main.get_command(cli.app)
COMMANDS = list(GROUP.commands)  # type: ignore[attr-defined]


def invoke(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- --help


@pytest.mark.parametrize("argv", [[], *[[name] for name in COMMANDS]], ids=lambda a: " ".join(a) or "train")
def test_help_fits_80_columns_with_nothing_cut(argv, capsys, monkeypatch):
    text = render_help(cli.app, argv, capsys, monkeypatch)
    command = GROUP if not argv else GROUP.commands[argv[0]]  # type: ignore[attr-defined]
    check_help_page(cli.app, text, command)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_example_is_a_whole_command_that_parses(name, capsys, monkeypatch):
    text = render_help(cli.app, [name], capsys, monkeypatch)
    commands = examples(text)
    assert commands, f"train {name} --help shows no example"
    for line in commands:
        parsed_name, params = parse_example(cli.app, "train", line)
        assert parsed_name in COMMANDS
        assert params  # the example sets options the command takes


def test_help_in_a_narrow_window_still_shows_every_word(capsys, monkeypatch):
    """At 60 columns descriptions wrap narrower; none is cut."""
    text = render_help(cli.app, ["run"], capsys, monkeypatch, columns=60)
    commands = examples(text)  # example commands are never wrapped (a cut command would not run)
    wide = [line for line in text.splitlines() if len(line) > 60]
    assert all(any(line.strip().removesuffix(" \\") in c for c in commands) for line in wide), wide
    flat = squeezed(text)
    assert all(squeezed(p.help) in flat for p in GROUP.commands["run"].params if p.help)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- on/off options


@pytest.mark.parametrize("name", COMMANDS)
def test_on_off_options_are_shown_and_parsed_both_ways(name, capsys, monkeypatch):
    command = GROUP.commands[name]  # type: ignore[attr-defined]
    check_toggles("train", name, command, render_help(cli.app, [name], capsys, monkeypatch))


def test_run_flags_reach_the_run_both_ways(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(fit, "run", lambda overrides, **kw: calls.append((overrides, kw)) or fit.Result(Path("r"), 0, 0, ""))
    code, _, err = invoke(["run", "--shards", "s", "--variant", "v1", "--no-amp", "--batch-norm", "--no-report",
                           "--deep-supervision", "--no-resume", "--no-force"], capsys)
    assert code in (0, None), err
    overrides, kw = calls[0]
    assert (overrides["amp"], overrides["batch_norm"], overrides["report"], overrides["deep_supervision"]) == \
        (False, True, False, True)
    assert (kw["resume"], kw["force"]) == (False, False)


# ---------------------------------------------------------------- every Config field is an option


def test_every_config_field_is_an_option_of_train_run():
    options = {p.name for p in GROUP.commands["run"].params}  # type: ignore[attr-defined]
    assert set(FIELDS) <= options, set(FIELDS) - options


def _shown_default(help_text: str) -> str | None:
    return help_text.rsplit("[default: ", 1)[1].rstrip("]") if "[default: " in help_text else None


def test_the_defaults_shown_by_train_run_are_those_a_new_run_takes():
    """Each `[default: X]` of `train run --help` against `config.resolve` for a new run, on a CPU
    and on CUDA (sizes differ) and for both presets (the preset's choices differ)."""
    base = {"shards": "s", "out": "o"}
    resolved = {(kind, variant): resolve({**base, "variant": variant}, device_kind=kind).to_dict()
                for kind in ("cpu", "cpu-fp32", "cuda") for variant in PRESETS}
    checked = 0
    for param in GROUP.commands["run"].params:  # type: ignore[attr-defined]
        if param.name not in FIELDS or param.name in ("shards", "out", "variant"):
            continue
        shown = _shown_default(param.help or "")
        values = {key: r[param.name] for key, r in resolved.items()}
        if len({json.dumps(v) for v in values.values()}) == 1:
            value = next(iter(values.values()))
            expected = {True: "on", False: "off", None: None}.get(value, value) if isinstance(value, (bool, type(None))) \
                else f"{value:g}" if isinstance(value, float) else str(value)
            if value is None:  # off unless given: either said ("off") or not shown
                assert shown in (None, "off"), (param.name, shown)
            else:
                assert shown == expected, (param.name, shown, expected)
        elif len({json.dumps(values[("cpu", v)]) for v in PRESETS}) > 1:
            assert shown == "the preset's", (param.name, shown)
        else:
            cpu, fp32, cuda = values[("cpu", "v1")], values[("cpu-fp32", "v1")], values[("cuda", "v1")]
            expected = (f"{cpu} on CPU, {cuda} on CUDA" if cpu == fp32 else
                        f"{cpu} on a CPU with native bf16, {fp32} on other CPUs, {cuda} on CUDA")
            assert shown == expected, (param.name, shown)
        checked += 1
    assert checked >= len(FIELDS) - 3


# ---------------------------------------------------------------- --version, completion


def test_version_names_the_distribution_torch_and_numpy(capsys):
    code, out, _ = invoke(["--version"], capsys)
    assert code in (0, None)
    line = out.strip()
    assert line.startswith(f"train {md.version('brats-shards')} ")
    assert f"torch {torch.__version__}" in line and f"numpy {numpy.__version__}" in line
    assert len(out.strip().splitlines()) == 1


def test_shell_completion_completes_commands_and_options():
    """bash's protocol, as the script that `train --show-completion` prints in bash drives it
    (`_TRAIN_COMPLETE=source_bash` prints that script whatever shell runs the test)."""
    script = Path(sys.executable).with_name("train")
    env = {**os.environ, "_TRAIN_COMPLETE": "source_bash"}
    shown = subprocess.run([script], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "_TRAIN_COMPLETE=complete_bash" in shown.stdout, shown.stderr
    assert "complete -o default -F _train_completion train" in shown.stdout
    assert complete("train", "train run --dev") == ["--device"]
    assert complete("train", "train ev") == ["evaluate"]


# ---------------------------------------------------------------- --config FILE


@pytest.fixture
def captured_run(monkeypatch):
    """`fit.run` replaced by a recorder of the overrides `train run` hands it."""
    calls = []
    monkeypatch.setattr(fit, "run", lambda overrides, **kw: calls.append(overrides) or fit.Result(Path("r"), 0, 0, ""))
    return calls


def test_a_toml_file_sets_options_and_flags_override_it(tmp_path, capsys, captured_run):
    path = tmp_path / "run.toml"
    path.write_text('variant = "v2"\nshards = "shards/"\nepochs = 7\nbatch-size = 4\nlr = 1\namp = false\n'
                    'channels = ["t1ce", "flair"]\nplateau_factor = 0.25\nschedule = "plateau"\n')
    code, _, err = invoke(["run", "--config", path, "--epochs", "3", "--amp", "--out", tmp_path / "r"], capsys)
    assert code in (0, None), err
    overrides = captured_run[0]
    assert overrides["epochs"] == 3 and overrides["amp"] is True  # the flags
    assert overrides["batch_size"] == 4 and overrides["lr"] == 1.0 and isinstance(overrides["lr"], float)
    config = resolve(overrides, device_kind="cpu")
    assert (config.variant, config.shards, config.epochs, config.batch_size, config.channels, config.schedule,
            config.plateau_factor, config.amp) == ("v2", "shards/", 3, 4, ("t1ce", "flair"), "plateau", 0.25, True)


def test_a_runs_saved_config_json_repeats_the_run_with_the_flags_changed(tmp_path, capsys, captured_run):
    """The config.json `train run` writes (`rundir.write_config(config_record(...))`) is a valid
    --config: the new run is the old one but for its folder and the flags given."""
    first = resolve({"variant": "v1", "shards": "shards/", "out": str(tmp_path / "a"), "epochs": 9, "base": 8},
                    device_kind="cpu")
    write_config(tmp_path / "a", config_record(first, "v1", {"epochs": 9, "base": 8}, "f" * 64))
    code, _, err = invoke(["run", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b",
                           "--seed", "1"], capsys)
    assert code in (0, None), err
    again = resolve(captured_run[0], device_kind="cuda")  # every size comes from the file, not the device
    assert again == dataclasses.replace(first, out=str(tmp_path / "b"), seed=1)


def test_a_saved_config_json_does_not_take_the_old_runs_folder(tmp_path, capsys, captured_run):
    first = resolve({"variant": "v1", "shards": "shards/", "out": str(tmp_path / "a")}, device_kind="cpu")
    write_config(tmp_path / "a", config_record(first, "v1", {}, "f" * 64))
    invoke(["run", "--config", tmp_path / "a" / "config.json"], capsys)
    assert "out" not in captured_run[0]


@pytest.mark.parametrize("content, fragment", [
    ('variant = "v1"\nbach_size = 3\n', "unknown key 'bach_size'"),
    ('epochs = "many"\n', "epochs: must be an integer, got 'many'"),
    ('amp = 1\n', "amp: must be true or false, got 1"),
    ('channels = [1, 2]\n', "channels: must be a list of names"),
    ('epochs = \n', "not valid TOML"),
    ('resume = true\n', "unknown key 'resume'"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, content, fragment):
    path = tmp_path / "run.toml"
    path.write_text(content)
    code, _, err = invoke(["run", "--config", path, "--shards", "s"], capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"error: {path}: ") and fragment in line, line


def test_a_missing_or_foreign_config_file_is_one_line(tmp_path, capsys):
    code, _, err = invoke(["run", "--config", tmp_path / "none.toml"], capsys)
    assert code == 2 and one_error_line(err) == f"error: {tmp_path / 'none.toml'}: does not exist"
    (tmp_path / "run.yaml").write_text("epochs: 3\n")
    code, _, err = invoke(["run", "--config", tmp_path / "run.yaml"], capsys)
    assert code == 2 and "must be a .toml file or a .json file" in one_error_line(err)


def test_a_config_that_is_a_fifo_or_huge_is_refused_without_reading_it(tmp_path, capsys):
    """A FIFO would block a plain read forever; a huge file is not read past the limit."""
    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)
    code, _, err = invoke(["run", "--config", fifo, "--shards", "s"], capsys)
    assert code == 2 and one_error_line(err) == f"error: {fifo}: is a FIFO, not a regular file: refused"
    huge = tmp_path / "run.json"
    with open(huge, "wb") as handle:
        handle.truncate(2 << 20)  # 2 MiB of zeros, sparse
    code, _, err = invoke(["run", "--config", huge, "--shards", "s"], capsys)
    assert code == 2 and one_error_line(err).startswith(f"error: {huge}: is larger than 1 MiB")


def test_overrides_from_argv_reads_the_config_file_too(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('variant = "v2"\nepochs = 7\n')
    assert cli.overrides_from_argv(["--config", str(path), "--seed", "3"]) == \
        {"variant": "v2", "epochs": 7, "seed": 3}


# ---------------------------------------------------------------- --device


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as on a machine with two CUDA GPUs (no tensor is made on them)."""
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    return selected


def test_cuda_n_names_gpu_n_and_becomes_the_current_device(two_gpus):
    assert devices.resolve("cuda:1") == torch.device("cuda", 1) and two_gpus == [1]
    assert devices.resolve("cuda") == torch.device("cuda", 0)
    assert devices.resolve("auto") == torch.device("cuda", 0)
    assert inference.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_under_torchrun_cuda_is_the_ranks_gpu_and_one_named_gpu_is_refused(two_gpus):
    assert devices.resolve("cuda", local_rank=1) == torch.device("cuda", 1)
    assert devices.resolve("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(devices.DeviceError, match=r"^--device: cuda:0 names one device for all the processes"):
        devices.resolve("cuda:0", local_rank=1)
    with pytest.raises(devices.DeviceError, match=r"^--device: LOCAL_RANK 2 \(torchrun\), but torch sees 2"):
        devices.resolve("cuda", local_rank=2)


def test_start_processes_honours_the_device_and_torchruns_local_rank(two_gpus, monkeypatch):
    config = resolve({"variant": "v1", "shards": "s", "out": "o", "device": "cuda:1"}, device_kind="cuda")
    dist, device = fit.start_processes(config)
    assert device == torch.device("cuda", 1) and not dist.enabled
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(devices.DeviceError, match="names one device for all the processes"):
        fit.start_processes(config)  # refused before any process group is started


def test_cuda_n_beyond_the_gpus_is_one_line(two_gpus, capsys, tmp_path):
    code, _, err = invoke(["run", "--shards", tmp_path, "--variant", "v1", "--out", tmp_path / "r",
                           "--device", "cuda:2"], capsys)
    assert code == 2
    assert one_error_line(err) == "error: --device: cuda:2, but torch sees 2 CUDA device(s): cuda:0, cuda:1"


@pytest.mark.parametrize("bf16,cpu_kind", [(True, "cpu"), (False, "cpu-fp32")])
def test_device_defaults_follow_the_device_kind(two_gpus, monkeypatch, bf16, cpu_kind):
    """A CPU's sizes depend on whether it computes bf16 natively (it then trains in bf16): the
    probe is torch's, replaced here so the test means the same on any machine."""
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: bf16)
    assert [devices.defaults_kind(d) for d in ("cuda:1", "cuda", "auto", "cpu", "mps")] == \
        ["cuda", "cuda", "cuda", cpu_kind, cpu_kind]


def test_auto_without_a_gpu_takes_the_cpus_sizes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.defaults_kind("auto") == "cpu-fp32"
    config = resolve({"variant": "v2", "shards": "s", "out": "o"}, device_kind=devices.defaults_kind("auto"))
    assert (config.base, config.stem, config.batch_size) == (16, 2, 16)  # half the width, the same stem and batch
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert resolve({"variant": "v2", "shards": "s", "out": "o"}, device_kind=devices.defaults_kind("auto")).base == 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    code, _, err = invoke(["run", "--shards", tmp_path, "--variant", "v1", "--out", tmp_path / "r",
                           "--device", "cuda:1"], capsys)
    assert code == 2 and one_error_line(err).startswith("error: --device: cuda was asked for, but torch sees no CUDA")


def test_mps_when_torch_has_it_and_one_line_when_not(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, _, err = invoke(["run", "--shards", tmp_path, "--variant", "v1", "--out", tmp_path / "r",
                           "--device", "mps"], capsys)
    assert code == 2 and one_error_line(err).startswith("error: --device: mps was asked for, but torch sees no Apple GPU")
    with pytest.raises(devices.DeviceError):
        inference.resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.resolve("mps") == torch.device("mps")
    assert devices.resolve("auto").type in ("cpu", "cuda")  # auto never picks mps


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:-1", "gpu0", "CUDA", ""])
def test_a_misspelt_device_is_one_line_naming_the_choices(device, capsys, tmp_path):
    code, _, err = invoke(["run", "--shards", tmp_path, "--variant", "v1", "--out", tmp_path / "r",
                           "--device", device], capsys)
    assert code == 2
    assert one_error_line(err) == f"error: --device: must be auto, cpu, cuda, cuda:N or mps, got {device!r}"
    with pytest.raises(devices.DeviceError):
        inference.resolve_device(device)
