"""A call to something outside this process (a tracking server) that may not answer: waited for at most
the `BRATS_SHARDS_TRACKING_TIMEOUT` bound, never longer."""

from __future__ import annotations

import threading
from typing import Any, Callable

from shards_spec import limits

TIMEOUT_LIMITS = {"TRACKING_TIMEOUT": 10}
"""Seconds one tracker call may take (`BRATS_SHARDS_TRACKING_TIMEOUT`; module docstring)."""
TIMEOUT_ENV = limits.ENV_PREFIX + "TRACKING_TIMEOUT"


def bounded(call: Callable[..., Any], *args: Any, timeout: float) -> Any:
    """`call(*args)` on a daemon thread, waited for at most `timeout` seconds: its result, its
    exception, or `TimeoutError`. A call that does not return is abandoned (a daemon thread never
    holds the process at exit); the caller never calls that backend again."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = call(*args)
        except BaseException as exc:  # handed to the waiting thread, which decides
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="tracker-call", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"no answer within {timeout:g} s, the bound {TIMEOUT_ENV} sets")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


__all__ = ["TIMEOUT_ENV", "TIMEOUT_LIMITS", "bounded"]
