"""Remote shard folders: fsspec filesystems with our timeouts and retries, and one-line errors.

A server that stalls mid-body held a reader for aiohttp's 300 s default per shard, and a URL
whose fsspec backend is not installed printed a 76-line traceback. Here:

- every remote filesystem gets connect and read timeouts (`BRATS_SHARDS_CONNECT_TIMEOUT`,
  `BRATS_SHARDS_READ_TIMEOUT`, see `limits`) unless the user's storage options set their own:
  `client_kwargs={"timeout": ...}` for `http(s)://` (aiohttp), `config_kwargs` for `s3://`;
- opening and reading are retried on transient errors (timeouts, dropped connections, HTTP
  5xx/429) `BRATS_SHARDS_RETRIES` times, waiting `BRATS_SHARDS_BACKOFF` seconds doubled each
  time; when they are exhausted the error is one line saying so and naming the file;
- a server that cannot be reached (connection refused, a host name that does not resolve, a
  connect timeout) is said as such, also where fsspec's HTTP filesystem reports it as
  `FileNotFoundError` (its `info` turns any failure into one): it is retried like the above, then
  `cannot connect to http://host:port/: connection refused`, never "not found"; only an HTTP 404
  (or 410) is "not found";
- a protocol whose backend package is missing is one line naming the package to install (and
  this project's extra, `brats-shards[s3]` / `[gcs]`, where there is one).
"""

from __future__ import annotations

import socket
import time
from typing import Callable, Iterator, TypeVar

from . import limits
from .errors import SpecError

T = TypeVar("T")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
"""Protocol -> this project's extra that installs its backend (pyproject's optional dependencies)."""
NOT_FOUND_STATUSES = (404, 410)
NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
RETRY_HELP = "BRATS_SHARDS_RETRIES, BRATS_SHARDS_READ_TIMEOUT and BRATS_SHARDS_CONNECT_TIMEOUT change the limits"


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower()


def open_filesystem(url: str, storage_options: dict):
    """(filesystem, root path) of a URL, with our default timeouts; one-line errors."""
    from fsspec.core import url_to_fs

    protocol = protocol_of(url)
    options = with_timeouts(protocol, storage_options)
    try:
        return url_to_fs(url, skip_instance_cache=True, **options)
    except ImportError as exc:
        raise SpecError(missing_backend(protocol, exc), url) from None
    except (ValueError, TypeError) as exc:  # "Protocol not known", an option the backend does not take
        raise SpecError(f"cannot be opened ({type(exc).__name__}: {_first_line(exc)})", url) from None


def with_timeouts(protocol: str, storage_options: dict) -> dict:
    """The user's storage options plus our connect/read timeouts where they set none."""
    options = dict(storage_options)
    connect, read = limits.get("CONNECT_TIMEOUT") or None, limits.get("READ_TIMEOUT") or None
    if protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        # total=None: a large shard on a slow link may take long; a stall may not.
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect,
                                                           sock_read=read))
        options["client_kwargs"] = client
    elif protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", connect)
        config.setdefault("read_timeout", read)
        options["config_kwargs"] = config
    return options


def missing_backend(protocol: str, exc: ImportError) -> str:
    """One line naming the package that serves `protocol://` (fsspec's own text as the fallback)."""
    from fsspec.registry import known_implementations

    cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
    package = getattr(cause, "name", None) or known_implementations.get(protocol, {}).get("class", "").split(".")[0]
    if not package or package == "fsspec":
        return f"{protocol}:// cannot be read here: {_first_line(exc)}"
    extra = EXTRAS.get(protocol)
    how = f"pip install 'brats-shards[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
    return f"{protocol}:// needs the package {package}, which is not installed: {how}"


def transient(exc: BaseException) -> bool:
    """Worth another attempt: a timeout, a dropped connection, a server error (5xx) or 429."""
    if isinstance(exc, (SpecError, *NOT_TRANSIENT)) or not isinstance(exc, Exception):
        return False
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, (OSError, TimeoutError)) or module in ("aiohttp", "botocore", "aiobotocore", "fsspec",
                                                                   "google", "urllib3")


def connection_failure(exc: BaseException) -> str | None:
    """Why no connection to the server could be made ("connection refused", ...), looked for along
    the chain of causes; None when `exc` is another error. Classes are matched by name so that no
    backend (aiohttp, botocore) is imported to ask."""
    failed = None
    for error in _causes(exc):
        names = {cls.__name__ for cls in type(error).__mro__}
        if isinstance(error, socket.gaierror):
            return "its host name does not resolve"
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if names & {"ConnectionTimeoutError", "ConnectTimeoutError"}:
            return f"timed out after {limits.get('CONNECT_TIMEOUT'):g} s (BRATS_SHARDS_CONNECT_TIMEOUT)"
        if failed is None and names & {"ClientConnectorError", "EndpointConnectionError"}:
            failed = _first_line(error) or type(error).__name__
    return failed


def unwrap(exc: BaseException) -> BaseException:
    """The error that happened, under fsspec's `FileNotFoundError` when that was not a 404: a failed
    connection, a timeout or another HTTP status (a 500 read "not found" too)."""
    cause = exc.__cause__
    if not isinstance(exc, FileNotFoundError) or cause is None:
        return exc
    status = getattr(cause, "status", None)
    if isinstance(status, int) and status not in NOT_FOUND_STATUSES:
        return cause
    if isinstance(cause, TimeoutError) or connection_failure(cause) is not None:
        return cause
    return exc  # a 404, or a backend's own not-found (s3fs's NoSuchKey)


def server_of(url: str) -> str:
    """`http://host:port/` of a URL, for a message about the server rather than one file."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/" if parts.netloc else url


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not _first_line(exc):  # aiohttp's and fsspec's say nothing
        return f"{type(exc).__name__}: timed out (connect {limits.get('CONNECT_TIMEOUT'):g} s, read {limits.get('READ_TIMEOUT'):g} s)"
    return f"{type(exc).__name__}: {_first_line(exc) or 'no detail'}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


class Attempts:
    """The retry budget of one file: each failure waits the backoff and doubles it, until spent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.left = limits.retries()
        self.total = self.left + 1
        self.delay = limits.get("BACKOFF")

    def failed(self, exc: BaseException) -> None:
        """Return to try again, or raise: the error itself when it is not transient (a `SpecError`
        for an HTTP status fsspec reported as not found), else a `SpecError` saying the attempts
        are exhausted (naming the server when it could not be reached)."""
        error = unwrap(exc)
        unreachable = connection_failure(error)
        if not transient(error) and unreachable is None:
            if error is not exc:
                raise SpecError(f"cannot be read ({describe(error)})", self.name) from exc
            raise exc
        if self.left <= 0:
            what = f"cannot connect to {server_of(self.name)}: {unreachable}" if unreachable else \
                f"cannot be read: {describe(error)}"
            raise SpecError(f"{what} (gave up after {self.total} attempt(s); {RETRY_HELP})", self.name) from exc
        self.left -= 1
        time.sleep(self.delay)
        self.delay *= 2


def with_retries(fn: Callable[[], T], name: str, attempts: Attempts | None = None) -> T:
    """`fn()`, retried on transient errors with backoff."""
    attempts = attempts or Attempts(name)
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - `failed` re-raises what is not transient
            attempts.failed(exc)
