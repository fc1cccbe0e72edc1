"""Making inputs for `train predict`/`evaluate`/`report` tests: a synthetic source, its shards
(the real ETL in this process), checkpoints as `train run` writes them (a small random U-Net, or
the Oracle), and reading a written segmentation back.

The Oracle is a test-only torch module whose buffers hold the preprocessed slices of every
source patient and their preprocessed label maps (computed with the shards' own recipe); its
forward looks each input slice up (the stored slice equal to it, L-inf distance under 1e-3) and
returns +/-20 logits of that slice's label map (background for an unknown slice). Fed through a
real checkpoint file, `predict` must then reproduce the original segmentation on the native grid.
Register it for a test with the `oracle_registered` fixture (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from etl.build import BuildOptions, build_shards
from etl.sources import load_patient, scan_source
from etl.synth import synthesize
from shards_spec.labels import encode_labels, expand
from shards_spec.manifest import parse
from shards_spec.preprocess import preprocess_volume
from train import models
from train.cli import main as cli_main
from train.runfiles import checkpoint as ckpt

SHAPE = (48, 48, 24)


def make_source(root: Path, layout: str = "brats2020", patients: int = 3, shape=SHAPE, seed: int = 0) -> Path:
    """Synthetic patients in a release layout; returns the folder to pass as --src."""
    synthesize(root, patients=patients, layout=layout, shape=shape, seed=seed)
    return root


def make_shards(src: Path, out: Path, size: int, channels=("t1", "t1ce", "t2", "flair"),
                split: str = "train=0.5,val=0.5") -> Path:
    """The real ETL, in this process, split train/val by patient."""
    build_shards(BuildOptions(src=src, out=out, size=size, channels=tuple(channels), split=split, workers=0))
    return out


def manifest_of(shards: Path):
    return parse((shards / "manifest.json").read_bytes())


def save_checkpoint(path: Path, model: nn.Module, name: str, kwargs: dict, channels, target: str, manifest,
                    **config) -> Path:
    """A checkpoint as `train run` writes one (train.training.trainer.Trainer.payload's keys), for a given model."""
    payload = {
        "format": ckpt.FORMAT, "epoch": 1, "state": "finished", "variant": "v1",
        "model": {"name": name, "kwargs": kwargs, "in_channels": len(channels), "out_channels": 3},
        "model_state": model.state_dict(), "channels": list(channels), "target": target,
        "preprocessing": dict(manifest.content["preprocessing"]), "labels": dict(manifest.content["labels"]),
        "manifest_digest": manifest.digest,
        "config": {"model": name, "loss": "dice", "amp": True, "amp_dtype": "auto", "channels": list(channels),
                   "target": target, **config},
        "best_mean_dice": 0.0, "best_epoch": 1, "history": [], "epoch_seconds": [],
    }
    return ckpt.save(payload, path)


def unet_checkpoint(path: Path, manifest, channels=("t1ce", "flair"), target: str = "classes", seed: int = 0) -> Path:
    """A small random U-Net (base 4, depth 2): imperfect, non-trivial predictions."""
    torch.manual_seed(seed)
    kwargs = {"base": 4, "depth": 2, "batch_norm": True}
    model = models.build_model("unet", in_channels=len(channels), **kwargs).eval()
    return save_checkpoint(path, model, "unet", kwargs, channels, target, manifest)


class Oracle(nn.Module):
    """Returns large logits of the ground truth of the slices it recognises (see module doc).

    A slice is recognised only when it equals a stored one (up to `TOLERANCE`), so predict must
    feed exactly what the ETL's preprocessing makes; anything else is predicted empty.
    """

    TOLERANCE = 1e-3

    def __init__(self, in_channels: int, out_channels: int = 3, *, target: str = "classes", n: int = 1,
                 size: int = 8) -> None:
        super().__init__()
        self.target = target
        self.register_buffer("keys", torch.zeros(n, in_channels, size, size))
        self.register_buffer("labels", torch.zeros(n, size, size, dtype=torch.uint8))
        self.max_distance = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(x.flatten(1).double(), self.keys.flatten(1).double(), p=float("inf"))
        best = distance.min(dim=1)
        self.max_distance = max(self.max_distance, float(best.values.max()))
        labels = self.labels[best.indices].numpy().copy()
        labels[best.values.numpy() > self.TOLERANCE] = 0  # not a slice the shards' recipe gives: predict nothing
        channels = np.stack([expand(m, self.target) for m in labels]).astype(np.float32)
        return torch.from_numpy(channels * 40.0 - 20.0)


def oracle_checkpoint(path: Path, src: Path, manifest, channels=("t1ce", "flair"), target: str = "classes") -> Path:
    """An Oracle checkpoint knowing every patient of `src`, preprocessed with `manifest`'s settings."""
    pre = manifest.content["preprocessing"]
    keys, labels = [], []
    for ref in scan_source(src).patients:
        volume = load_patient(ref, channels=list(channels))
        slices = preprocess_volume(volume.volume, volume.brain, volume.labels, size=pre["size"], norm=pre["norm"],
                                   keep_empty=True)
        keys.append(slices.image.astype(np.float32))
        labels.append(slices.mask)
    keys_arr, labels_arr = np.concatenate(keys), np.concatenate(labels)
    kwargs = {"target": target, "n": len(keys_arr), "size": int(pre["size"])}
    model = Oracle(len(channels), **kwargs)
    model.keys.copy_(torch.from_numpy(keys_arr))
    model.labels.copy_(torch.from_numpy(labels_arr))
    return save_checkpoint(path, model, "oracle", kwargs, channels, target, manifest)


def read_labels(path: Path, convention: str) -> np.ndarray:
    """A written segmentation back to the 0..3 label map (refusing values outside the convention)."""
    return encode_labels(np.asarray(nib.load(str(path)).dataobj), convention)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli_main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def patient_folders(src: Path) -> list[Path]:
    return [Path(ref.meta["folder"]) for ref in scan_source(src).patients]
