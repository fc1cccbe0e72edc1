"""Checks of a typer app's `--help` that both command lines must pass (shards_spec/cli.py):
80 columns, nothing cut, example commands whole and valid, on/off options with their `--no-` form."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import typer.main

WIDTH = 80
ACTIONS = {"help", "version", "install_completion", "show_completion"}
"""Flags that do something rather than switch a setting: no `--no-` form."""


def render_help(app, argv: list[str], capsys, monkeypatch, columns: int = WIDTH) -> str:
    """`TOOL ARGV --help` in this process, in a window `columns` wide (COLUMNS, as a shell sets it)."""
    from shards_spec.errors import run_cli

    monkeypatch.setenv("COLUMNS", str(columns))
    capsys.readouterr()
    try:
        run_cli(app, [*argv, "--help"])
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    return capsys.readouterr().out


def squeezed(text: str) -> str:
    """Text without any whitespace, so that wrapped and unwrapped text compare equal."""
    return "".join(text.split())


def examples(help_text: str) -> list[str]:
    """The commands of the `Example(s):` paragraphs, a line ending in ` \\` joined with the next."""
    commands, inside, pending = [], False, ""
    for line in help_text.splitlines():
        stripped = line.strip()
        if stripped in ("Example:", "Examples:"):
            inside = True
        elif inside and not stripped:
            inside = False
        elif inside:
            pending = f"{pending} {stripped}" if pending else stripped
            if pending.endswith(" \\"):
                pending = pending[:-2]
            else:
                commands.append(pending)
                pending = ""
    assert not pending, f"an example ends with a continuation: {pending!r}"
    return commands


def parse_example(app, tool: str, command_line: str) -> tuple[str, dict]:
    """Parse an example as the shell would and the tool's command would: (command name, the
    parameters the example sets; click raises for anything it cannot take). The example may start with environment assignments or a launcher (torchrun);
    anything else before the tool's name means the line was cut from its command."""
    words = shlex.split(command_line)
    assert tool in words, f"not a {tool} command: {command_line!r}"
    launcher = words[:words.index(tool)]
    assert all("=" in w for w in launcher) or (launcher and launcher[0] == "torchrun"), command_line
    name, *args = words[words.index(tool) + 1:]
    group = typer.main.get_command(app)
    command = group.commands[name]  # type: ignore[attr-defined]
    context = command.make_context(name, list(args))
    given = {k: v for k, v in context.params.items()  # typer vendors click: compare the source by name
             if getattr(context.get_parameter_source(k), "name", None) == "COMMANDLINE"}
    return name, given


def check_help_page(app, text: str, command) -> None:
    """One help page: no line wider than WIDTH, nothing cut, every option's whole help shown."""
    for line in text.splitlines():
        assert len(line) <= WIDTH, f"{len(line)} columns: {line!r}"
    body = "\n".join(line for line in text.splitlines() if not line.startswith("Usage: "))  # [ARGS]...
    assert "..." not in body and "…" not in body, text  # click's and rich's marks of a cut
    flat = squeezed(text)
    for param in getattr(command, "params", []):
        if getattr(param, "help", None) and not getattr(param, "hidden", False):
            assert squeezed(param.help) in flat, param.help
    for sub in getattr(command, "commands", {}).values():
        from shards_spec.cli import summary

        assert squeezed(summary(sub)) in flat, summary(sub)


def toggles(command) -> list:
    """The on/off options of a click command (flags that are not actions)."""
    return [p for p in command.params
            if getattr(p, "is_flag", False) and p.name not in ACTIONS]


def required_args(command) -> list[str]:
    """Placeholder values for a command's required options and arguments, so that it parses."""
    args: list[str] = []
    for param in command.params:
        if param.required:
            args += ["x"] if param.param_type_name == "argument" else [param.opts[0], "x"]
    return args


def check_toggles(tool: str, name: str, command, help_text: str) -> None:
    """Every on/off option of `command` has its `--no-` form, is shown as `--x / --no-x` in its
    help, and parses to True and False."""
    for option in toggles(command):
        on, off = option.opts[0], f"--no-{option.opts[0][2:]}"
        assert option.secondary_opts == [off], f"{tool} {name} {on} has no {off}"
        assert f"{on} / {off}" in help_text, f"{tool} {name} --help does not show {on} / {off}"
        base = required_args(command)
        assert command.make_context(name, [*base, on]).params[option.name] is True
        assert command.make_context(name, [*base, off]).params[option.name] is False


def complete(tool: str, words: str) -> list[str]:
    """What the installed `tool` offers bash for the last of `words` (click's completion protocol)."""
    env = {**os.environ, f"_{tool.upper()}_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - 1)}
    done = subprocess.run([Path(sys.executable).with_name(tool)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()
