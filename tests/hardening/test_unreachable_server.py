"""A shard server that cannot be reached is said as such, never as "not found" (issue 22): fsspec's
HTTP filesystem reports a refused connection while it asks for the manifest's size as
`FileNotFoundError`, and `etl verify http://127.0.0.1:8765/` with no server said
"manifest.json: not found: is http://127.0.0.1:8765/ a shard folder?". A real 404 still reads
"not found"; a server error is neither."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from shards_spec import remote
from shards_spec.errors import SpecError
from shards_spec.read import ShardStore
from tests.shard_fixtures import serve_range_http

from .helpers import assert_one_line, run_cli_inprocess

NO_RETRIES = {"BRATS_SHARDS_RETRIES": "0"}


@pytest.fixture
def no_retries(monkeypatch):
    for name, value in NO_RETRIES.items():
        monkeypatch.setenv(name, value)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def answering(status: int) -> Iterator[str]:
    """A server on 127.0.0.1 that answers every request with `status` and no body."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.send_error(status)

        do_GET = do_HEAD

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_refused_connection_says_so_and_a_404_still_reads_not_found(no_retries, capsys):
    url = f"http://127.0.0.1:{closed_port()}/"
    for command in ("verify", "inspect"):
        code, _, err = run_cli_inprocess("etl", [command, url], capsys)
        line = assert_one_line(code, err, f"{url}manifest.json", f"cannot connect to {url}: connection refused")
        assert "not found" not in line

    with answering(404) as url:
        code, _, err = run_cli_inprocess("etl", ["verify", url], capsys)
    line = assert_one_line(code, err, f"{url}manifest.json: not found: is {url} a shard folder?")
    assert "cannot connect" not in line


@pytest.mark.slow
def test_a_server_error_on_the_manifest_is_retried_and_not_called_not_found(monkeypatch, capsys):
    monkeypatch.setenv("BRATS_SHARDS_RETRIES", "1")
    monkeypatch.setenv("BRATS_SHARDS_BACKOFF", "0")
    with answering(503) as url:
        code, _, err = run_cli_inprocess("etl", ["verify", url], capsys)
    line = assert_one_line(code, err, f"{url}manifest.json: cannot be read", "503", "gave up after 2 attempt(s)")
    assert "not found" not in line and "cannot connect" not in line


@pytest.mark.slow
def test_a_server_gone_after_the_manifest_is_named_as_unreachable_for_each_shard(fixture_shards, no_retries):
    with serve_range_http(fixture_shards["webdataset"]) as url:
        store = ShardStore(url)
        assert store.verify_file(store.manifest.content["shards"][0]["files"][0]) is None  # the control: served
    entry = store.manifest.content["shards"][0]["files"][0]
    problem = store.verify_file(entry)
    assert problem is not None and problem.startswith(f"{url}/{entry['path']}: cannot connect to {url}/: "
                                                      "connection refused"), problem


def test_unreachable_is_told_from_not_found_along_the_chain_of_causes():
    def raised(error: BaseException, cause: BaseException) -> BaseException:
        try:
            raise error from cause
        except BaseException as exc:  # noqa: BLE001 - the chained exception is the point
            return exc

    dns = raised(FileNotFoundError("http://x.invalid/manifest.json"), socket.gaierror(-2, "Name or service not known"))
    assert remote.connection_failure(dns) == "its host name does not resolve"
    assert remote.unwrap(dns) is dns.__cause__
    timeout = raised(FileNotFoundError("http://10.255.255.1/manifest.json"), TimeoutError())
    assert remote.unwrap(timeout) is timeout.__cause__
    no_such_key = raised(FileNotFoundError("s3://lab/shards/manifest.json"), KeyError("NoSuchKey"))
    assert remote.connection_failure(no_such_key) is None and remote.unwrap(no_such_key) is no_such_key
    with pytest.raises(FileNotFoundError):  # a backend's own not-found stays one, and is not retried
        remote.Attempts("s3://lab/shards/manifest.json").failed(no_such_key)
    with pytest.raises(SpecError, match="cannot connect to http://x.invalid/: its host name does not resolve"):
        attempts = remote.Attempts("http://x.invalid/manifest.json")
        attempts.left = 0
        attempts.failed(dns)
