"""Shards from a URL, end to end through the real CLIs: a Range-answering HTTP server and an S3
endpoint (moto's server mode), both on 127.0.0.1 and started here. Training and evaluating from
a URL gives exactly what the local folder gives; verify/inspect read URLs; a corrupt served file
is refused naming it; `--cache-dir` serves the second run and re-fetches a tampered copy."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from etl.cli import app as etl_main
from tests.helpers.train_runs import assert_same_run
from train.cli import app as train_main

from .servers import BIN, learnable_shards, run_cli, run_process, s3_endpoint, serve_http

torch.set_num_threads(1)

PATIENTS = {"p1": 5, "p2": 6, "p3": 4, "p4": 6, "p5": 5}
SPLITS = {"train": ["p1", "p2", "p3", "p4"], "val": ["p5"]}
FORMATS = ("webdataset", "zarr")
TRAIN = ("--variant", "v1", "--batch-size", "4", "--base", "4", "--depth", "2", "--lr", "0.01", "--seed", "3",
         "--no-report",
         # the seed's schedule and output bias: these tests compare data paths and processes, and
         # resume with more --epochs (a cosine schedule spans --epochs), on tiny runs that must predict tumour
         "--schedule", "plateau", "--head-bias", "zero")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """One folder holding the same patients as shards-webdataset/ and shards-zarr/."""
    root = tmp_path_factory.mktemp("site")
    for fmt in FORMATS:
        learnable_shards(root, fmt, PATIENTS, SPLITS)
    return root


@pytest.fixture(scope="module")
def http(site):
    with serve_http(site) as server:
        yield server


@pytest.fixture(scope="module")
def s3(site):
    with s3_endpoint({f"shards-{fmt}": site / f"shards-{fmt}" for fmt in FORMATS}) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def local_run(site, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "local"
    assert run_cli(train_main, "run", "--shards", site / "shards-webdataset", "--out", out, "--epochs", "2",
                   "--workers", "0", *TRAIN) == 0
    return out


def evaluation(json_path: Path) -> dict:
    data = json.loads(json_path.read_text())
    return {"slice_level": data["slice_level"], "shard_grid": data["shard_grid"]}


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_train_from_http_and_resume_from_the_url_equal_the_local_run(http, local_run, tmp_path):
    """Epoch 1 from the URL by the console script with one loader worker (which opens its own
    HTTP session), epoch 2 by --resume, which takes the URL from config.json: the same rows and
    weights as 2 local epochs. (Loader workers are forked, so runs with workers are not started
    from this process, whose server threads come and go.)"""
    base, _ = http
    url = f"{base}/shards-webdataset"
    out = tmp_path / "http"
    done = run_process(BIN / "train", "run", "--shards", url, "--out", out, "--epochs", "1", "--workers", "1", *TRAIN)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["config"]["shards"] == url
    assert run_cli(train_main, "run", "--out", out, "--resume", "--epochs", "2", "--workers", "0") == 0
    assert_same_run(out, local_run)


@pytest.mark.slow
def test_train_from_s3_zarr_with_endpoint_and_cache_equals_the_local_run(s3, local_run, tmp_path):
    """s3:// through --storage-option endpoint_url (credentials from AWS_* variables), Zarr this
    time: the same slices, so the same run as the local WebDataset one."""
    url = "s3://lab/shards-zarr"
    out, cache = tmp_path / "s3", tmp_path / "cache"
    assert run_cli(train_main, "run", "--shards", url, "--storage-option", f"endpoint_url={s3}", "--out", out,
                   "--epochs", "2", "--workers", "0", "--cache-dir", cache, *TRAIN) == 0
    assert_same_run(out, local_run)
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["shards"] == url and s3 not in json.dumps(record)  # storage options are not saved
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert cached and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in cached)
    # the report reads the validation slices from the URL in config.json, with the options given again
    assert run_cli(train_main, "report", out, "--storage-option", f"endpoint_url={s3}") == 0
    assert (out / "report" / "slices.png").is_file()


@pytest.mark.slow
def test_evaluate_both_formats_from_http_and_s3_equals_local(site, http, s3, local_run, tmp_path):
    checkpoint = local_run / "checkpoints" / "best.pt"
    base, _ = http
    results = {}
    for fmt in FORMATS:
        sources = {
            "local": (str(site / f"shards-{fmt}"),),
            "http": (f"{base}/shards-{fmt}",),
            "s3": (f"s3://lab/shards-{fmt}", "--storage-option", f"endpoint_url={s3}"),
        }
        for where, (shards, *options) in sources.items():
            out = tmp_path / f"{where}-{fmt}.json"
            assert run_cli(train_main, "evaluate", "--checkpoint", checkpoint, "--shards", shards, *options,
                           "--workers", "0", "--json", out) == 0
            results[where, fmt] = evaluation(out)
    reference = results["local", "webdataset"]
    for key, value in results.items():
        assert value == reference, key


@pytest.mark.slow
def test_verify_and_inspect_urls(site, http, s3, capsys, monkeypatch):
    base, _ = http
    for fmt in FORMATS:
        assert run_cli(etl_main, "verify", f"{base}/shards-{fmt}") == 0
        assert f"ok: {base}/shards-{fmt}: 5 shards" in capsys.readouterr().out
    # S3 with the endpoint from the environment, as botocore reads it (no option given)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    assert run_cli(etl_main, "verify", "s3://lab/shards-zarr") == 0
    assert "ok: s3://lab/shards-zarr" in capsys.readouterr().out
    assert run_cli(etl_main, "inspect", "s3://lab/shards-webdataset") == 0
    shown = capsys.readouterr().out
    from shards_spec.read import ShardStore

    digest = ShardStore(site / "shards-webdataset").manifest.digest
    assert f"content digest {digest}" in shown and "5 patients" in shown


@pytest.mark.slow
def test_a_corrupt_served_shard_is_refused_naming_it(site, tmp_path, capsys):
    """One byte flipped in one served file of each format: `etl verify URL` fails naming it,
    `train evaluate` refuses it (also into an empty cache), and `train run` with a loader
    worker stops with one line naming it (it used to hang at exit: workers ignore SIGTERM)."""
    bad = tmp_path / "bad"
    shutil.copytree(site, bad)
    tar = "shards-webdataset/train/train-000001.tar"
    flip_byte(bad / tar, 700)
    manifest = json.loads((bad / "shards-zarr" / "manifest.json").read_text())
    chunk = next(f["path"] for s in manifest["content"]["shards"] if s["split"] == "val" for f in s["files"]
                 if "/c/" in f["path"])
    flip_byte(bad / "shards-zarr" / chunk)
    with serve_http(bad) as (base, _):
        for fmt, name in (("webdataset", tar), ("zarr", f"shards-zarr/{chunk}")):
            assert run_cli(etl_main, "verify", f"{base}/shards-{fmt}") != 0
            err = capsys.readouterr().err
            assert f"{base}/{name}" in err and "sha256" in err and "1 bad shard(s)" in err

        checkpoint_run = tmp_path / "run"
        assert run_cli(train_main, "run", "--shards", str(site / "shards-zarr"), "--out", checkpoint_run,
                       "--epochs", "1", "--workers", "0", *TRAIN) == 0
        assert run_cli(train_main, "evaluate", "--checkpoint", checkpoint_run / "checkpoints" / "last.pt",
                       "--shards", f"{base}/shards-zarr", "--workers", "0", "--cache-dir", tmp_path / "cache") == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and f"{base}/shards-zarr/{chunk}: sha256 differs" in err

        done = run_process(BIN / "train", "run", "--shards", f"{base}/shards-webdataset", "--out", tmp_path / "bad-run",
                           "--epochs", "1", "--workers", "1", *TRAIN, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {base}/{tar}: sha256 differs from the manifest (corrupt or changed file)"]
    assert "Traceback" not in done.stderr


def test_cache_dir_serves_the_second_run_and_refetches_a_tampered_copy(http, local_run, tmp_path):
    """The manifest is always fetched (it says what is valid); shard files come from the cache,
    re-checked by sha256 each time; a cached copy that no longer matches is fetched again, with a
    warning, and the result is unchanged."""
    base, requests = http
    url = f"{base}/shards-webdataset"
    checkpoint = local_run / "checkpoints" / "best.pt"
    cache = tmp_path / "cache"

    def evaluate(name: str) -> dict:
        out = tmp_path / f"{name}.json"
        assert run_cli(train_main, "evaluate", "--checkpoint", checkpoint, "--shards", url, "--workers", "0",
                       "--cache-dir", cache, "--json", out) == 0
        return evaluation(out)

    requests.clear()
    first = evaluate("first")
    fetched = [p for p in requests if not p.endswith("manifest.json")]
    assert fetched == ["/shards-webdataset/val/val-000000.tar"]

    requests.clear()
    assert evaluate("second") == first
    assert requests == ["/shards-webdataset/manifest.json"]

    (copy,) = [p for p in cache.rglob("*") if p.is_file()]
    flip_byte(copy)
    requests.clear()
    with pytest.warns(UserWarning, match="fetching it again"):
        assert evaluate("third") == first
    assert requests == ["/shards-webdataset/manifest.json", "/shards-webdataset/val/val-000000.tar"]
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == copy.name


@pytest.mark.slow
def test_a_plain_static_server_without_range_is_enough(site, local_run, tmp_path, capsys):
    """Python's http.server answers no Range requests; our reader fetches each listed file with
    one plain GET (tars streamed, Zarr files whole), so both formats verify and evaluate."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        ranges: list = []

        def log_message(self, *args):
            pass

        def send_head(self):
            if self.headers.get("Range"):
                type(self).ranges.append(self.path)
            return super().send_head()

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for fmt in FORMATS:
            assert run_cli(etl_main, "verify", f"{base}/shards-{fmt}") == 0
            out = tmp_path / f"{fmt}.json"
            assert run_cli(train_main, "evaluate", "--checkpoint", local_run / "checkpoints" / "best.pt", "--shards",
                           f"{base}/shards-{fmt}", "--workers", "0", "--json", out) == 0
            assert evaluation(out) == evaluation(tmp_path / "webdataset.json")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert Quiet.ranges == []
