"""Experiment tracking: `train run --logger tensorboard|mlflow` mirrors the run into the tool a
lab already watches; `metrics.csv` stays the default and the source of truth.

    train run --shards shards/ --variant v1 --out runs/v1 --logger tensorboard     # then: tensorboard --logdir runs
    train run --shards shards/ --variant v1 --out runs/v1 --logger mlflow --tracking-uri http://mlflow.lab:5000

A tracker is a `train.trainer.Callback`: the Trainer calls it on rank 0 only, at the start
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
the epoch it started from. A tracker that fails mid-run (a server gone) prints one warning and
stops logging; training goes on, and metrics.csv is complete.

The extras: `pip install 'brats-shards[tensorboard]'` / `'brats-shards[mlflow]'`; a missing one
is one line naming it, before any data is read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Iterator

import numpy as np

from shards_spec.errors import ToolError

LOGGERS = ("csv", "tensorboard", "mlflow")
TENSORBOARD_DIR = "tensorboard"
DEFAULT_EXPERIMENT = "brats-shards"
OVERLAY_TAG = "val_overlay"
OVERLAY_SLICES = 3


class TrackingError(ToolError):
    """A tracker that cannot start (bad option, a tracking store that refuses the run)."""


def make_tracker(logger: str, tracking_uri: str | None = None, images_every: int = 5) -> "Tracker | None":
    """The tracker for `--logger` (None for csv), after checking that its extra is installed."""
    from .extras import require

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
    tracker = MlflowTracker(images_every, tracking_uri)
    tracker.probe()  # a store that refuses us fails here, before the run folder is written
    return tracker


class Tracker:
    """What both trackers share: when to log what, the overlay slices, failure handling."""

    def __init__(self, images_every: int) -> None:
        self.images_every = images_every
        self.active = False
        self.overlay: list[dict] | None = None

    # ------------------------------------------------------------ Trainer callbacks

    def on_fit_start(self, trainer: Any) -> None:
        self.console = trainer.console
        self.start(trainer)  # a store that refuses the run stops it here, as one line, before any epoch
        self.active = True
        self._guard(self.log_params, hyperparameters(trainer.config.to_dict()), trainer.config.to_dict())

    def on_epoch_end(self, trainer: Any, row: dict) -> None:
        if not self.active:
            return
        epoch = int(row["epoch"])
        self._guard(self.log_metrics, {k: float(v) for k, v in row.items() if k != "epoch"}, epoch)
        if self.images_every and (epoch % self.images_every == 0 or epoch == trainer.config.epochs):
            self._guard(self._log_overlay, trainer, epoch)

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

    def _guard(self, method: Any, *args: Any) -> None:
        """Run one logging call; on failure warn once and stop tracking (metrics.csv goes on)."""
        try:
            method(*args)
        except Exception as exc:  # a tracking backend raises its own types (network, store, protobuf)
            self.active = False
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            self.console.print(f"warning: {type(self).__name__}: {reason}; logging stopped, metrics.csv is complete")

    def _log_overlay(self, trainer: Any, epoch: int) -> None:
        if self.overlay is None:
            self.overlay = overlay_slices(trainer)
        if self.overlay:
            self.log_image(overlay_picture(trainer, self.overlay, epoch), epoch)


class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard/ (torch's SummaryWriter)."""

    def start(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(trainer.run_dir / TENSORBOARD_DIR))

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

    def probe(self) -> None:
        """Open the store and read from it (read-only, so every DDP rank may do it)."""
        from mlflow.tracking import MlflowClient

        with self._refusal():
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.client.search_experiments(max_results=1)

    def start(self, trainer: Any) -> None:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        with self._refusal():
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
            tags = {"brats_shards.run_dir": str(trainer.run_dir), "brats_shards.start_epoch": str(trainer.state.epoch)}
            self.run_id = self.client.create_run(experiment, run_name=trainer.run_dir.name, tags=tags).info.run_id

    @contextlib.contextmanager
    def _refusal(self) -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (MlflowException, OSError, ImportError) as exc:  # ImportError: a store whose backend is not installed
            reason = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
            if "MLFLOW_ALLOW_FILE_STORE" in str(exc):
                reason = ("MLflow keeps its file store behind MLFLOW_ALLOW_FILE_STORE=true: set it, or give a "
                          "server or database URI")
            raise TrackingError(f"--logger mlflow: the tracking store refuses the run ({reason})",
                                self.tracking_uri) from None

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
    from .data import iter_patients

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
    """RGB uint8 (H, W, 3): the slices with truth and prediction contours (`train.report`'s drawing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .metrics import probs_to_labels
    from .report import DISPLAY_CHANNELS, ShownSlice, plot_slices

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


__all__ = ["LOGGERS", "MlflowTracker", "TensorBoardTracker", "Tracker", "TrackingError", "hyperparameters",
           "make_tracker"]
