"""Experiment tracking: `train run --logger tensorboard|mlflow` mirrors the run into the tool a
lab already watches; `metrics.csv` stays the default and the source of truth.

    train run --shards shards/ --variant v1 --out runs/v1 --logger tensorboard     # then: tensorboard --logdir runs
    train run --shards shards/ --variant v1 --out runs/v1 --logger mlflow --tracking-uri http://mlflow.lab:5000

A tracker is a `train.training.trainer.Callback`: the Trainer calls it on rank 0 only, at the start
(`on_fit_start`), after every epoch's checkpoint and CSV row (`on_epoch_end`) and at the end
(`on_fit_end`). It logs

- the resolved configuration (`Config.to_dict()`, lists joined by commas) as hyperparameters:
  TensorBoard's HParams plugin plus a `config` text, MLflow params;
- every metrics.csv column of the epoch's row but `epoch` (the step), under the column's own
  name: `train_loss`, `val_loss`, `mean_dice`, `dice_<channel>`, ..., `lr` (the learning rate
  the epoch trained with), `seconds`;
- every `--log-images-every` epochs (and after the last one) a picture `val_overlay`: up to three
  validation slices (the first patients of the validation split, each on its slice with the
  most tumour) with the ground-truth and predicted contours, drawn as `train report` draws its
  slices, predicted by the model as it is at the end of that epoch.

Where it goes: TensorBoard event files in `RUN/tensorboard/` (a `--resume` appends to them);
MLflow: one MLflow run per `train run` invocation, named after the run folder, in the
experiment `$MLFLOW_EXPERIMENT_NAME` (default "brats-shards") at `--tracking-uri` (default:
MLflow's own, `$MLFLOW_TRACKING_URI` or `sqlite:///mlflow.db`), tagged with the run folder and
the epoch it started from.

A tracker never stops or stalls training. Every call to its backend (MLflow's set-up probe, the
run's creation, each batch of params or metrics, each picture, the end) runs on a helper thread
and is waited for at most `BRATS_SHARDS_TRACKING_TIMEOUT` seconds (default 10: a lab server
answers in well under a second; a stalled one would otherwise hold the run for MLflow's own
120 s x 7 retries). MLflow's client gets no retries and a request timeout a second longer
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`, `MLFLOW_HTTP_REQUEST_TIMEOUT`) unless those variables are
set, so a closed port fails at once and an abandoned request ends soon after. Before anything is
written, the probe failing is one line (exit 2); from the run's start on, a failure or a call
not answered in time prints one warning (on the run's console, stderr) and the run goes on
without the tracker: metrics.csv is complete. Credentials in `--tracking-uri`
(`http://user:password@host`) are never printed: every message has them redacted.

The extras: `pip install 'brats-shards[tensorboard]'` / `'brats-shards[mlflow]'`; a missing one
is one line naming it, before any data is read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import unquote, urlsplit

from shards_spec import limits
from shards_spec.errors import ToolError

from ..data import iter_patients
from ..metrics import probs_to_labels
from ..runfiles.rundir import TENSORBOARD_DIR
from ..runtime.bounded import TIMEOUT_ENV, TIMEOUT_LIMITS, bounded
from ..runtime.extras import require
from .pictures import DISPLAY_CHANNELS, ShownSlice, plot_slices

if TYPE_CHECKING:
    import numpy as np  # imported where used: `train --help` reads TIMEOUT_LIMITS from here

LOGGERS = ("csv", "tensorboard", "mlflow")
DEFAULT_EXPERIMENT = "brats-shards"
OVERLAY_TAG = "val_overlay"
OVERLAY_SLICES = 3
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


class TrackingError(ToolError):
    """A tracker that cannot start (bad option, a tracking store that refuses the run)."""


def call_timeout() -> float:
    """`BRATS_SHARDS_TRACKING_TIMEOUT` in seconds (> 0), checked before anything is written."""
    value = limits.get("TRACKING_TIMEOUT", TIMEOUT_LIMITS)
    if not value > 0:
        raise TrackingError(f"environment variable {TIMEOUT_ENV} must be a number of seconds > 0, got {value:g}")
    return value


def redact(text: str, uri: str | None = None) -> str:
    """`text` without credentials: the `user:password@` of any URL in it, and the password of
    `uri` wherever it appears (also percent-decoded)."""
    text = _USERINFO.sub(r"\1***@", text)
    password = urlsplit(uri).password if uri and "://" in uri else None
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def reason_of(exc: BaseException, uri: str | None = None) -> str:
    """A short, credential-free reason for `exc`: the OS's words for a refused or failed
    connection when the message carries them (MLflow wraps them in a long URL line)."""
    text = str(exc).strip()
    if isinstance(exc, TimeoutError) and TIMEOUT_ENV in text:
        return text
    errno = None if isinstance(exc, (OSError, ToolError)) else re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if errno:
        return redact(errno.group(1).strip(), uri)
    if "Read timed out" in text:
        return redact("no answer (read timed out)", uri)
    first = text.splitlines()[0] if text else type(exc).__name__
    return redact(first, uri)[:240]


def make_tracker(logger: str, tracking_uri: str | None = None, images_every: int = 5) -> "Tracker | None":
    """The tracker for `--logger` (None for csv), after checking that its extra is installed."""

    if logger not in LOGGERS:
        raise TrackingError(f"--logger: must be one of {list(LOGGERS)}, got {logger!r}")
    if images_every < 0:
        raise TrackingError(f"--log-images-every: must be >= 0 (0: no pictures), got {images_every}")
    if tracking_uri is not None and logger != "mlflow":
        raise TrackingError("--tracking-uri: only --logger mlflow uses a tracking URI")
    if logger == "csv":
        return None
    if logger == "tensorboard":
        require("tensorboard", "tensorboard", "--logger tensorboard")
        return TensorBoardTracker(images_every)
    require("mlflow", "mlflow", "--logger mlflow")
    require("mlflow.tracking", "mlflow", "--logger mlflow")  # imported here, not on a call's thread
    tracker = MlflowTracker(images_every, tracking_uri)
    tracker.probe()  # a store that refuses us fails here, before the run folder is written
    return tracker


class Tracker:
    """What both trackers share: when to log what, the overlay slices, failure handling."""

    def __init__(self, images_every: int) -> None:
        self.images_every = images_every
        self.active = False
        self.overlay: list[dict] | None = None
        self.timeout = call_timeout()
        self.console: Any = None

    # ------------------------------------------------------------ Trainer callbacks

    def on_fit_start(self, trainer: Any) -> None:
        self.console = trainer.console
        self.active = True
        if self._guard(self.start, trainer):
            config = trainer.config.to_dict()
            self._guard(self.log_params, hyperparameters(config), config)

    def on_epoch_end(self, trainer: Any, row: dict) -> None:
        if not self.active:
            return
        epoch = int(row["epoch"])
        self._guard(self.log_metrics, {k: float(v) for k, v in row.items() if k != "epoch"}, epoch)
        if self.active and self.images_every and (epoch % self.images_every == 0 or epoch == trainer.config.epochs):
            picture = self._overlay(trainer, epoch)
            if picture is not None:
                self._guard(self.log_image, picture, epoch)

    def on_fit_end(self, trainer: Any, result: Any) -> None:
        if self.active:
            self._guard(self.close, result.exit_code == 0)
        self.active = False

    # ------------------------------------------------------------ what a backend implements

    def start(self, trainer: Any) -> None:
        raise NotImplementedError

    def log_params(self, params: dict[str, Any], config: dict) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_image(self, image: np.ndarray, step: int) -> None:
        raise NotImplementedError

    def close(self, success: bool) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ shared

    def redact(self, text: str) -> str:
        return redact(text)

    def _guard(self, method: Any, *args: Any) -> bool:
        """One backend call, bounded (`bounded`, `self.timeout`); on failure or time-out warn
        once and stop tracking (metrics.csv goes on). True when the call succeeded."""
        if not self.active:
            return False
        try:
            bounded(method, *args, timeout=self.timeout)
        except Exception as exc:  # a tracking backend raises its own types (network, store, protobuf)
            self._stop(exc)
            return False
        return True

    def _stop(self, exc: BaseException) -> None:
        self.active = False
        reason = self.redact(reason_of(exc))[:240]
        self.console.print(f"warning: {type(self).__name__}: {reason}; logging stopped, metrics.csv is complete",
                           highlight=False, markup=False)

    def _overlay(self, trainer: Any, epoch: int) -> np.ndarray | None:
        """The overlay picture, drawn here on the training thread (the model must not run on
        another thread while training goes on); a failure stops tracking like a failed call."""
        try:
            if self.overlay is None:
                self.overlay = overlay_slices(trainer)
            return overlay_picture(trainer, self.overlay, epoch) if self.overlay else None
        except Exception as exc:  # drawing, or reading the validation slices
            self._stop(exc)
            return None


class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard/ (torch's SummaryWriter)."""

    def start(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = trainer.run_dir / TENSORBOARD_DIR
        if folder.exists() and not folder.is_dir():
            raise TrackingError("is not a folder, so TensorBoard cannot write its event files there", folder)
        self.writer = SummaryWriter(log_dir=str(folder))

    def log_params(self, params: dict[str, Any], config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Declared metrics make the HParams dashboard show these scalars beside the options.
        experiment, start, end = hparams(params, {"mean_dice": math.nan, "val_loss": math.nan, "train_loss": math.nan})
        for summary in (experiment, start, end):
            self.writer._get_file_writer().add_summary(summary)  # as SummaryWriter.add_hparams does
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, sort_keys=True) + "\n```", 0)
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, image: np.ndarray, step: int) -> None:
        self.writer.add_image(OVERLAY_TAG, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self, success: bool) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run through `MlflowClient` (no global active-run state)."""

    def __init__(self, images_every: int, tracking_uri: str | None) -> None:
        super().__init__(images_every)
        self.tracking_uri = tracking_uri
        # MLflow's client: a request ends a second after the call's bound (so the bound speaks
        # first, and an abandoned call ends soon after) and is not retried (120 s x 7 by default),
        # unless the user set these; MLflow reads them at each request.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(math.ceil(self.timeout) + 1))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

    def redact(self, text: str) -> str:
        return redact(text, self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))

    def probe(self) -> None:
        """Open the store and read from it (read-only, so every DDP rank may do it), bounded."""
        from mlflow.tracking import MlflowClient

        def connect() -> Any:
            client = MlflowClient(tracking_uri=self.tracking_uri)
            client.search_experiments(max_results=1)
            return client

        with self._refusal():
            self.client = bounded(connect, timeout=self.timeout)

    def start(self, trainer: Any) -> None:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        tags = {"brats_shards.run_dir": str(trainer.run_dir), "brats_shards.start_epoch": str(trainer.state.epoch)}
        self.run_id = self.client.create_run(experiment, run_name=trainer.run_dir.name, tags=tags).info.run_id

    @contextlib.contextmanager
    def _refusal(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # MLflow's own, OSError, ImportError (a store whose backend is not installed)
            reason = reason_of(exc, self.tracking_uri)
            if "MLFLOW_ALLOW_FILE_STORE" in str(exc):
                reason = ("MLflow keeps its file store behind MLFLOW_ALLOW_FILE_STORE=true: set it, or give a "
                          "server or database URI")
            uri = None if self.tracking_uri is None else self.redact(self.tracking_uri)
            what = "gave" if reason.startswith("no answer") else "refuses the run:"
            raise TrackingError(f"--logger mlflow: the tracking store {what} {self.redact(reason)}", uri) from None

    def log_params(self, params: dict[str, Any], config: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_image(self, image: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, image, key=OVERLAY_TAG, step=step)

    def close(self, success: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if success else "KILLED")


# ---------------------------------------------------------------- what is logged


def hyperparameters(config: dict) -> dict[str, Any]:
    """The resolved configuration as flat scalar values (lists joined, None and dicts as text)."""
    flat: dict[str, Any] = {}
    for key, value in sorted(config.items()):
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        elif value is None:
            value = "None"
        flat[key] = value
    return flat


def overlay_slices(trainer: Any) -> list[dict]:
    """Up to `OVERLAY_SLICES` validation slices, one per patient in manifest order, each the
    patient's slice with the most tumour (read once, in this process, without touching the
    training stream or any random generator)."""
    import numpy as np


    config = trainer.config
    picked = []
    for patient in iter_patients(trainer.setup.val_ds.store, config.val_split, list(config.channels)):
        tumour = (patient.mask > 0).sum(axis=(1, 2))
        s = int(np.argmax(tumour))
        picked.append({"patient": patient.patient, "slice_index": patient.slice_index[s],
                       "image": patient.image[s].astype(np.float32), "truth": patient.mask[s].copy()})
        if len(picked) == OVERLAY_SLICES:
            break
    return picked


def overlay_picture(trainer: Any, slices: list[dict], epoch: int) -> np.ndarray:
    """RGB uint8 (H, W, 3): the slices with truth and prediction contours (`train.reporting.report`'s drawing)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch


    model, channels = trainer.model, list(trainer.config.channels)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = torch.from_numpy(np.stack([s["image"] for s in slices])).to(trainer.device)
        probs = torch.sigmoid(model(images).float()).cpu().numpy()
    model.train(was_training)
    preds = probs_to_labels(probs, trainer.config.target, channel_axis=1)
    display = next((c for c in DISPLAY_CHANNELS if c in channels), channels[0])
    shown = []
    for item, pred in zip(slices, preds):
        pred[np.all(item["image"] == 0, axis=0)] = 0  # background as the shards store it
        both = (pred > 0).sum() + (item["truth"] > 0).sum()
        dice = 2 * float(((pred > 0) & (item["truth"] > 0)).sum()) / both if both else 1.0
        shown.append(ShownSlice(f"epoch {epoch}", item["patient"], dice, item["slice_index"],
                                item["image"][channels.index(display)], item["truth"], pred, display))
    figure = plot_slices(shown)
    figure.suptitle(f"Validation slices ({display}) after epoch {epoch}")
    for (left, right), item in zip(np.reshape(figure.axes, (-1, 2)), shown):  # per slice, not per patient
        for ax, what in ((left, "ground truth"), (right, "prediction")):
            ax.set_title(f"{item.patient}, slice {item.slice_index}\n{what} (whole-tumour Dice of the slice "
                         f"{item.dice:.3f})", fontsize=9)
    try:
        figure.canvas.draw()
        return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(figure)


__all__ = ["LOGGERS", "MlflowTracker", "TIMEOUT_ENV", "TensorBoardTracker", "Tracker", "TrackingError", "bounded",
           "call_timeout", "hyperparameters", "make_tracker", "redact"]
