"""What the `etl` and `train` command lines share, so that they read and behave alike.

- Help in click's plain layout (no rich panels): descriptions wrap to the window, at most 80
  columns, and are never cut; a group lists each command with its whole first paragraph
  (`SummaryGroup`), not click's summary cut at the line's end with "...". Paragraphs marked `\\b`
  (examples, exit codes) print as written, so their lines stay within 78 characters and a long
  command goes on after a trailing ` \\` (tests/*/test_cli_conventions.py check both tools).
- On/off options are spelt `--name/--no-name` (`typer.Option(False, "--force/--no-force")`):
  both spellings are accepted and shown.
- `--version`: the distribution's version and those of the libraries that matter to the tool.
- Shell completion: typer's `--install-completion` and `--show-completion`.
- Tables (`print_table`) never wrap a cell: `0.812 ± 0.034 (0.830)` stays on one line in a log
  file or a narrow window.

Errors are the other shared convention: `shards_spec.errors.run_cli`.
"""

from __future__ import annotations

import inspect
from typing import Any

import typer
from typer.core import TyperGroup

DISTRIBUTION = "brats-shards"
HELP_WIDTH = 80


class SummaryGroup(TyperGroup):
    """A command group whose list of commands shows each one's whole first paragraph, wrapped."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, summary(command)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def summary(command: Any) -> str:
    """A command's first paragraph as one line (its `short_help` when it has one)."""
    text = inspect.cleandoc(command.short_help or command.help or "")
    return " ".join(text.split("\n\n")[0].split())


def make_app(name: str, help: str, libraries: tuple[str, ...]) -> typer.Typer:
    """A typer app in the shared style, with `--version` (naming `libraries`' versions too) and
    shell completion."""
    app = typer.Typer(
        name=name,
        help=help,
        cls=SummaryGroup,
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"max_content_width": HELP_WIDTH},
    )

    def show_version(value: bool) -> None:
        if value:
            typer.echo(version_text(name, libraries))
            raise typer.Exit()

    @app.callback()
    def _options(
        version: bool = typer.Option(False, "--version", is_eager=True, callback=show_version,
                                     help="Print the version (and the libraries') and exit."),
    ) -> None:
        pass

    return app


def version_text(tool: str, libraries: tuple[str, ...]) -> str:
    """`train 0.1.0 (brats-shards; torch 2.5.1, numpy 2.1.3; Python 3.11.7)`, read from the
    installed distributions' metadata (no library is imported)."""
    import importlib.metadata as md
    import platform

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    parts = ", ".join(f"{library} {version(library)}" for library in libraries)
    return f"{tool} {version(DISTRIBUTION)} ({DISTRIBUTION}; {parts}; Python {platform.python_version()})"


def print_table(console: Any, table: Any) -> None:
    """Print a rich table with every cell on one line: when the window (or a log file's 80
    columns) is narrower than the table, the table keeps its natural width instead of wrapping
    numbers away from their ± parts; a terminal then wraps whole lines, a log file keeps them."""
    from rich.measure import Measurement

    for column in table.columns:
        column.no_wrap = True
    natural = Measurement.get(console, console.options.update_width(1 << 16), table).maximum
    if natural > console.width:
        table.width = natural
    console.print(table, crop=False)
