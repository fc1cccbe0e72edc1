"""The error types every stage raises for bad input, and the one-line CLI policy.

Anything a user can cause (a bad file, a lying manifest, a wrong option) is raised as a
`ToolError` subclass whose message names the file and the problem. The CLIs print that one line
and exit non-zero; other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable


class ToolError(Exception):
    """A problem with the user's input, reported as one line (`path: problem`)."""

    exit_code = 2

    def __init__(self, problem: str, path: object | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class SpecError(ToolError):
    """A manifest, plan or sample that breaks `SPEC.md` (also: untrusted bytes refused)."""


class SourceError(ToolError):
    """A source volume or layout the ETL or `predict` cannot read as BraTS."""


def one_line(exc: ToolError) -> str:
    """The error's line; for one raised in a DataLoader worker, which torch re-raises with the
    worker's traceback as its message, the original line (the traceback's last)."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        return last[len(prefix):] if last.startswith(prefix) else last
    return text


def run_cli(app: Callable[[], object], argv: list[str] | None = None) -> None:
    """Run a typer app, turning `ToolError` into one line on stderr and its exit code (2);
    `--debug` prints the traceback before that line, with the same exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        app(args=args, standalone_mode=True)  # type: ignore[call-arg]
    except ToolError as exc:
        if debug:  # the traceback, and still the exit code a script checks
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
