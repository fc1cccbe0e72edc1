"""Real servers for the integration tests, started on 127.0.0.1 by the test and stopped by it:
a Range-answering HTTP server that counts requests, an S3 endpoint (moto's server mode) holding
uploaded shard folders, and a Dask cluster of separate `dask scheduler` / `dask worker`
processes. Also tiny learnable shard folders and in-process CLI calls."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from tests import shard_fixtures
from tests.shard_fixtures import learnable_slices

BIN = Path(sys.executable).parent
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------ shards a model can learn from


def learnable_shards(root: Path, fmt: str, patients: dict[str, int], splits: dict[str, list[str]],
                     size: int = 16) -> Path:
    """`root/shards-<fmt>`, written by the real writers (same slices in both formats)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shard_fixtures, "patient_slices", learnable_slices)
        return shard_fixtures.make_shards(root, fmt, patients=patients, splits=splits, size=size, tumour_every=1)


# ------------------------------------------------------------------ HTTP with Range, counting


@contextlib.contextmanager
def serve_http(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """`tests.shard_fixtures.RangeHandler` on 127.0.0.1 (a free port); yields (base URL, the list
    of the paths of the GET requests it answers, in order)."""
    requests: list[str] = []

    class Counting(shard_fixtures.RangeHandler):
        ranges: list = []

        def send_head(self):
            if self.command == "GET":  # fsspec also sends a HEAD first for a file's size
                requests.append(self.path)
            return super().send_head()

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Counting, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ------------------------------------------------------------------ S3 (moto server mode)

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_endpoint(folders: dict[str, Path], bucket: str = "lab") -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with each folder uploaded to s3://bucket/<name>/ by s3fs;
    yields the endpoint URL. Dummy credentials are set in this process's environment (and taken
    away again), as `AWS_*` variables are how a user gives real ones."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir(bucket)
        for name, folder in folders.items():
            fs.put(f"{folder}/", f"{bucket}/{name}", recursive=True)
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------ Dask cluster (separate processes)


@contextlib.contextmanager
def dask_cluster(workdir: Path, workers: int = 2, timeout: float = 90.0) -> Iterator[str]:
    """`dask scheduler` and `workers` single-threaded `dask worker` processes on 127.0.0.1, each
    started in its own folder (so nothing can rely on the client's cwd); yields the scheduler's
    address. Every process is killed in the end, whatever happened."""
    workdir.mkdir(parents=True, exist_ok=True)
    scheduler_file = workdir / "scheduler.json"
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    processes: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> None:
        cwd = workdir / name
        cwd.mkdir(exist_ok=True)
        with open(logs / f"{name}.log", "wb") as log:
            processes.append(subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=SUBPROCESS_ENV,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("scheduler", ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                            "--no-dashboard", "--scheduler-file", str(scheduler_file)])
        for i in range(workers):
            start(f"worker{i}", ["distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
                                 "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                                 "--local-directory", str(workdir / f"worker{i}")])
        deadline = time.monotonic() + timeout
        while not scheduler_file.exists():
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError(f"the Dask scheduler did not start; logs in {logs}")
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(workers, timeout=max(1.0, deadline - time.monotonic()))
        yield address
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


# ------------------------------------------------------------------ command lines


def run_cli(app, *args: str) -> int:
    """Run a typer app in this process as its console script does (`ToolError` -> one line); its exit code."""
    from shards_spec.errors import run_cli as console_script

    try:
        console_script(app, [str(a) for a in args])
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code) if isinstance(exc.code, int) else 1
    return 0


def run_process(*args: str, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=kw.pop("env", SUBPROCESS_ENV), **kw)
