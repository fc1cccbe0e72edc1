"""`train run --logger tensorboard|mlflow`, read back with the real libraries:

- TensorBoard: tensorboard's `EventAccumulator` over RUN/tensorboard finds every metrics.csv
  column (but `epoch`) per epoch with the CSV's values, the overlay pictures at the asked
  epochs (decoded PNGs), and the resolved config.json options in the HParams plugin data;
- MLflow: an `MlflowClient` over a file store finds one finished run named after the run folder,
  the options as params, every column's history equal to the CSV, the overlay images;
- a tracker changes nothing of the training (metrics.csv equals a run without one);
- a missing extra, a store that refuses the run, a bad option: one line, exit 2; a tracker that
  fails mid-run: a warning, and the run and its metrics.csv complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.predict import make_shards, make_source, run_cli
from train import fit
from train.reporting import tracking
from train.training.trainer import Hooks

torch.set_num_threads(1)

EPOCHS = 3
MLFLOW_REQUEST_VARIABLES = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
RUN = dict(variant="v1", epochs=EPOCHS, batch_size=8, workers=0, base=4, depth=2, lr=0.01, seed=1, report=False)


def quiet():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module", autouse=True)
def mlflow_request_variables():
    """An MLflow tracker sets MLflow's request variables where they are unset (tracking.py):
    after this module they are as they were before it."""
    with pytest.MonkeyPatch.context() as patch:
        for name in MLFLOW_REQUEST_VARIABLES:
            patch.setenv(name, "")  # records the original state, restored on leaving
            patch.delenv(name)
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tracking")
    return make_shards(make_source(root / "src", "brats2020", patients=3), root / "shards", size=32)


def train(shards: Path, out: Path, tracker=None, console=None) -> Path:
    hooks = Hooks(console=console or quiet(), callbacks=[tracker] if tracker else [])
    result = fit.run(dict(RUN, shards=str(shards), out=str(out)), hooks=hooks)
    assert result.exit_code == 0 and result.epochs_done == EPOCHS
    return out


def csv_rows(run: Path) -> tuple[list[str], list[dict[str, float]]]:
    with open(run / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), [{k: float(v) for k, v in row.items()} for row in reader]


def resolved_options(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["config"]


def same(a: float, b: float, rel: float = 1e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-12)


@pytest.fixture(scope="module")
def plain_run(shards, tmp_path_factory) -> Path:
    return train(shards, tmp_path_factory.mktemp("plain") / "run")


# ---------------------------------------------------------------- TensorBoard


@pytest.fixture(scope="module")
def tensorboard_run(shards, tmp_path_factory) -> Path:
    pytest.importorskip("tensorboard")
    return train(shards, tmp_path_factory.mktemp("tb") / "run", tracking.make_tracker("tensorboard", images_every=2))


@pytest.mark.slow
def test_tensorboard_scalars_equal_metrics_csv(tensorboard_run, plain_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    columns, rows = csv_rows(tensorboard_run)
    assert set(events.Tags()["scalars"]) == set(columns) - {"epoch"}
    assert {"lr", "train_loss", "val_loss", "mean_dice", "dice_ET"} <= set(columns)
    for column in columns[1:]:
        logged = events.Scalars(column)
        assert [e.step for e in logged] == [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
        for event, row in zip(logged, rows):
            assert same(event.value, row[column]), (column, event.value, row[column])  # float32 in the event file
    # the tracker changed nothing of the training
    plain_columns, plain_rows = csv_rows(plain_run)
    assert plain_columns == columns
    for a, b in zip(plain_rows, rows):
        assert all(same(a[c], b[c], 0) for c in columns if c != "seconds")


@pytest.mark.slow
def test_tensorboard_overlay_pictures_every_n_epochs_and_the_last(tensorboard_run):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    pictures = events.Images(tracking.OVERLAY_TAG)
    assert [p.step for p in pictures] == [2, 3]  # every 2 epochs, and after the last (3)
    for picture in pictures:
        pixels = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)).convert("RGB"))
        assert pixels.shape == (picture.height, picture.width, 3) and picture.height > 300
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # slices drawn, not a blank canvas


def test_tensorboard_hparams_are_the_resolved_config(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(tensorboard_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    logged = {}
    for key, value in start.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        logged[key] = getattr(value, kind)
    options = resolved_options(tensorboard_run)
    assert set(logged) == set(options)
    assert logged["lr"] == pytest.approx(options["lr"]) and logged["epochs"] == EPOCHS
    assert logged["channels"] == ",".join(options["channels"]) == "t1ce,flair"
    assert logged["model"] == options["model"] == "unet"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert {m.name.tag for m in experiment.experiment.metric_infos} == {"mean_dice", "val_loss", "train_loss"}


def test_tracker_failing_mid_run_warns_and_the_run_completes(shards, tmp_path):
    pytest.importorskip("tensorboard")

    class Flaky(tracking.TensorBoardTracker):
        def log_metrics(self, metrics, step):
            if step == 2:
                raise ConnectionError("tracking server went away")
            super().log_metrics(metrics, step)

    console = quiet()
    run = train(shards, tmp_path / "run", Flaky(images_every=0), console)
    assert "tracking server went away; logging stopped, metrics.csv is complete" in console.file.getvalue()
    assert len(csv_rows(run)[1]) == EPOCHS


# ---------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_run(shards, tmp_path_factory):
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    uri = (root / "mlruns").as_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
        run = train(shards, root / "run", tracking.make_tracker("mlflow", uri, images_every=2))
        yield run, uri


@pytest.mark.slow
def test_mlflow_run_params_metrics_and_images(mlflow_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir, uri = mlflow_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.tags["brats_shards.run_dir"] == str(run_dir)
    options = resolved_options(run_dir)
    assert set(run.data.params) == set(options)
    assert run.data.params["channels"] == "t1ce,flair" and float(run.data.params["lr"]) == options["lr"]
    columns, rows = csv_rows(run_dir)
    for column in columns[1:]:
        history = sorted(client.get_metric_history(run.info.run_id, column), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), column
        for metric, row in zip(history, rows):
            assert same(metric.value, row[column], 1e-12), (column, metric.value, row[column])
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    steps = sorted({int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png")})
    assert steps == [2, 3] and all(tracking.OVERLAY_TAG in p for p in images)


# ---------------------------------------------------------------- one-line errors


def test_missing_extra_is_one_line_naming_it(shards, tmp_path, monkeypatch, capsys):
    for module, extra in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
        out = tmp_path / f"run-{module}"
        code, _, err = run_cli(["run", "--shards", shards, "--variant", "v1", "--out", out, "--epochs", "1",
                                "--logger", module, "--device", "cpu"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert f"[{extra}]" in lines[0] and f"--logger {module}" in lines[0] and "pip install" in lines[0]
        assert not out.exists()  # refused before anything was written


def test_bad_options_and_a_refusing_store_are_one_line(shards, tmp_path, monkeypatch, capsys):
    base = ["run", "--shards", shards, "--variant", "v1", "--epochs", "1", "--device", "cpu", "--base", "4",
            "--depth", "2", "--workers", "0", "--no-report"]
    code, _, err = run_cli([*base, "--out", tmp_path / "a", "--logger", "wandb"], capsys)
    assert code == 2 and "--logger" in err and "wandb" in err
    code, _, err = run_cli([*base, "--out", tmp_path / "b", "--logger", "tensorboard", "--tracking-uri", "x"], capsys)
    assert code == 2 and "--tracking-uri" in err
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    code, _, err = run_cli([*base, "--out", tmp_path / "c", "--logger", "mlflow", "--tracking-uri",
                            (tmp_path / "mlruns").as_uri()], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--logger mlflow" in lines[0] and "refuses" in lines[0], err
    assert not (tmp_path / "c").exists()  # refused before the run folder was written


# ---------------------------------------------------------------- bounded calls: a tracker never stalls training


class TrackingServer:
    """A tracking server on 127.0.0.1 that answers MLflow's set-up requests (`answers`: path ->
    JSON body, status 200; a missing experiment 404) and accepts every other request and never
    answers it: a server that stalls after the set-up. With no answers, it stalls at once."""

    RUN = {"run": {"info": {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "status": "RUNNING",
                            "start_time": 0, "lifecycle_stage": "active", "run_name": "run",
                            "artifact_uri": "mlflow-artifacts:/1/r1/artifacts"}, "data": {}}}
    SET_UP = {"/api/2.0/mlflow/experiments/search": {"experiments": []},
              "/api/2.0/mlflow/experiments/get-by-name": None,
              "/api/2.0/mlflow/experiments/create": {"experiment_id": "1"},
              "/api/2.0/mlflow/runs/create": RUN}

    def __init__(self, answers: dict | None = None) -> None:
        import socket
        import threading

        self.answers = answers or {}
        self.requests: list[str] = []
        self.release = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self.release.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1].decode().split("?")[0]
            self.requests.append(path)
            if path not in self.answers:
                self.release.wait()  # accepted, never answered
                return
            body = self.answers[path]
            status, body = ("404 Not Found", {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "none"}) \
                if body is None else ("200 OK", body)
            text = json.dumps(body).encode()
            conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(text)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + text)

    def uri(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    def close(self) -> None:
        self.release.set()
        self.server.close()


@pytest.fixture
def server():
    made = []

    def make(answers: dict | None = None) -> TrackingServer:
        made.append(TrackingServer(answers))
        return made[-1]

    yield make
    for item in made:
        item.close()


@pytest.fixture
def mlflow_bounds(monkeypatch):
    """A one-second bound; MLflow's request variables absent now (the tracker sets its defaults)
    and absent again after the test."""
    monkeypatch.setenv(tracking.TIMEOUT_ENV, "1")
    for name in (*MLFLOW_REQUEST_VARIABLES, "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")  # records the original state, so the teardown restores it
        monkeypatch.delenv(name)


SECRET = "s3cret-Pw"


@pytest.mark.slow
def test_a_stalled_call_is_abandoned_at_the_bound_with_one_warning_and_training_completes(shards, tmp_path,
                                                                                         monkeypatch):
    pytest.importorskip("tensorboard")
    import threading

    monkeypatch.setenv(tracking.TIMEOUT_ENV, "0.5")
    never = threading.Event()

    class Stalled(tracking.TensorBoardTracker):
        calls = 0

        def log_metrics(self, metrics, step):
            Stalled.calls += 1
            if step == 2:
                never.wait()  # a backend that never returns
            super().log_metrics(metrics, step)

    console = quiet()
    try:
        run = train(shards, tmp_path / "run", Stalled(images_every=0), console)
    finally:
        never.set()
    text = console.file.getvalue()
    assert text.count("warning: Stalled:") == 1, text
    assert f"no answer within 0.5 s, the bound {tracking.TIMEOUT_ENV} sets; logging stopped" in text
    assert Stalled.calls == 2  # epoch 1 logged, epoch 2 stalled, epoch 3 not tried
    assert len(csv_rows(run)[1]) == EPOCHS


@pytest.mark.slow
def test_a_server_that_stalls_after_the_set_up_costs_one_warning_and_never_prints_the_password(
        shards, tmp_path, server, mlflow_bounds):
    pytest.importorskip("mlflow")
    stalling = server(TrackingServer.SET_UP)
    tracker = tracking.make_tracker("mlflow", stalling.uri(f"bob:{SECRET}@"), images_every=1)
    console = quiet()
    run = train(shards, tmp_path / "run", tracker, console)
    text = console.file.getvalue()
    assert "/api/2.0/mlflow/runs/create" in stalling.requests  # the set-up was answered
    assert stalling.requests[-1] == "/api/2.0/mlflow/runs/log-batch"  # then one call stalled, and no other was made
    assert text.count("warning: MlflowTracker:") == 1 and "logging stopped, metrics.csv is complete" in text, text
    assert len(csv_rows(run)[1]) == EPOCHS
    assert SECRET not in text


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["stalls", "closed port"])
def test_a_store_that_does_not_answer_the_probe_is_one_line_within_the_bound(kind, shards, tmp_path, server,
                                                                             mlflow_bounds, capsys):
    pytest.importorskip("mlflow")
    import socket

    if kind == "stalls":
        uri = server().uri(f"bob:{SECRET}@")
    else:
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]
        uri = f"http://bob:{SECRET}@127.0.0.1:{port}"  # nothing listens there any more
    out = tmp_path / "run"
    code, stdout, err = run_cli(["run", "--shards", shards, "--variant", "v1", "--out", out, "--epochs", "1",
                                 "--device", "cpu", "--workers", "0", "--logger", "mlflow", "--tracking-uri", uri],
                                capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    expected = "no answer" if kind == "stalls" else "connection refused"  # at once: MLflow's retries are off
    assert "--logger mlflow" in lines[0] and expected in lines[0].lower(), lines[0]
    assert SECRET not in stdout + err and "bob:" not in stdout + err
    assert not out.exists()  # refused before anything was written


def test_resume_with_tensorboard_a_file_warns_once_and_the_run_goes_on(shards, plain_run, tmp_path):
    pytest.importorskip("tensorboard")
    import shutil

    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    (run / tracking.TENSORBOARD_DIR).write_text("not a folder")
    console = quiet()
    result = fit.run(dict(RUN, shards=str(shards), out=str(run), epochs=EPOCHS + 1), resume=True,
                     hooks=Hooks(console=console, callbacks=[tracking.TensorBoardTracker(images_every=0)]))
    text = console.file.getvalue()
    assert result.exit_code == 0 and result.epochs_done == EPOCHS + 1
    assert text.count("warning: TensorBoardTracker:") == 1
    assert f"{run / tracking.TENSORBOARD_DIR}: is not a folder" in text
    assert len(csv_rows(run)[1]) == EPOCHS + 1


def test_credentials_are_redacted_and_a_bad_bound_is_one_line(monkeypatch):
    uri = "http://bob:p%40ss-w0rd@mlflow.lab:5000"
    text = f"API request to {uri}/api/2.0/x failed; auth p@ss-w0rd; also https://eve:other@h/"
    cleaned = tracking.redact(text, uri)
    assert "p%40ss-w0rd" not in cleaned and "p@ss-w0rd" not in cleaned and "eve:other" not in cleaned
    assert "http://***@mlflow.lab:5000/api/2.0/x" in cleaned and "https://***@h/" in cleaned
    assert tracking.redact("http://mlflow.lab:5000 answered 503", None) == "http://mlflow.lab:5000 answered 503"
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(tracking.TIMEOUT_ENV, bad)
        with pytest.raises(tracking.ToolError, match=tracking.TIMEOUT_ENV):
            tracking.call_timeout()
    monkeypatch.setenv(tracking.TIMEOUT_ENV, "2.5")
    assert tracking.call_timeout() == 2.5
