"""The peer of bench/quality.py: a plain MONAI U-Net trained by a plain loop on our `ShardDataset`.

    python bench/monai_peer.py --shards SHARDS --out RUN --budget 600 [--patience 3 --cap-epochs 1000]

What a MONAI user writes in a few lines (the network and loss of issue 11's table):

    UNet(spatial_dims=2, in_channels=4, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2),
         num_res_units=0), sigmoid DiceLoss, Adam 1e-3, batch 16, all four channels, --target classes,
    fed by `train.data.ShardDataset` (shuffled, seed 0) through a DataLoader with one worker.

Every pass over the training split it validates exactly as `train run` does (`train.training.engine.validate`,
TP/FP/FN summed over the validation slices), keeps the best weights by that mean Dice, and stops
at the budget (checked after every step, then one last validation) or, with `--patience`, when the
score has not improved for that many validations. Its checkpoints are in our format with the model
registered as `monai_unet`, so `train evaluate` scores them with the very code it scores ours.
MONAI is a dev/bench dependency only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(BENCH.parent))

MODEL_NAME = "monai_unet"
LOSS_NAME = "monai_dice"
CHANNELS = ("t1", "t1ce", "t2", "flair")
BATCH_SIZE = 16
LR = 1e-3


def build_monai_unet(in_channels: int, out_channels: int = 3, **ignored: object):
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=0)


def register() -> None:
    """Make `train evaluate` know the peer: its model and loss by their registered names."""
    from monai.losses import DiceLoss

    from train import models
    from train.recipe import losses

    if MODEL_NAME not in models.MODELS:
        models.register_model(MODEL_NAME, build_monai_unet)
    if LOSS_NAME not in losses.LOSSES:
        losses.register_loss(LOSS_NAME, DiceLoss(sigmoid=True))


def payload(model, manifest, epoch: int, best: float, history: list[dict]) -> dict:
    """A checkpoint `train.apply.inference.load_model` reads (the keys `train predict` needs)."""
    import torch

    from train.runfiles import checkpoint as ckpt

    return {
        "format": ckpt.FORMAT, "epoch": epoch, "state": ckpt.RunState.FINISHED.value, "variant": "monai-peer",
        "model": {"name": MODEL_NAME, "kwargs": {}, "in_channels": len(CHANNELS), "out_channels": 3},
        "model_state": model.state_dict(), "channels": list(CHANNELS), "target": "classes",
        "preprocessing": dict(manifest.content["preprocessing"]), "labels": dict(manifest.content["labels"]),
        "manifest_digest": manifest.digest,
        "config": {"model": MODEL_NAME, "loss": LOSS_NAME, "amp": False, "batch_size": BATCH_SIZE, "lr": LR},
        "best_mean_dice": float(best), "history": history, "versions": {"torch": str(torch.__version__)},
    }


def train(shards: str, out: Path, budget: float, patience: int | None, cap_epochs: int, workers: int, seed: int) -> dict:
    import torch
    from monai.losses import DiceLoss

    from shards_spec.read import ShardStore
    from train.data import ShardDataset
    from train.runfiles import checkpoint as ckpt
    from train.runtime.distributed import Dist
    from train.training import engine

    out.mkdir(parents=True, exist_ok=True)
    store = ShardStore(shards)
    torch.manual_seed(seed)
    model = build_monai_unet(len(CHANNELS))
    loss_fn = DiceLoss(sigmoid=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    train_ds = ShardDataset(store, split="train", channels=list(CHANNELS), shuffle=True, seed=seed)
    val_ds = ShardDataset(store, split="val", channels=list(CHANNELS), shuffle=False)
    device = torch.device("cpu")
    train_loader = engine.make_loader(train_ds, BATCH_SIZE, workers, device, seed, persistent=True)
    val_loader = engine.make_loader(val_ds, BATCH_SIZE, workers, device, seed + 1, persistent=True)
    started = time.monotonic()
    history, best, best_epoch, steps, stale = [], -math.inf, 0, 0, 0
    out_of_time = False
    for epoch in range(cap_epochs):
        train_ds.set_epoch(epoch)
        model.train()
        for image, mask in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(image), mask)
            loss.backward()
            optimizer.step()
            steps += 1
            if time.monotonic() - started >= budget:
                out_of_time = True
                break
        validation = engine.validate(model, val_loader, loss_fn, device, None, Dist(), "classes")
        score = validation.mean_dice()
        row = {"epoch": epoch + 1, "steps": steps, "seconds": round(time.monotonic() - started, 3),
               "mean_dice": score, "val_loss": validation.loss}
        history.append(row)
        if score > best:
            best, best_epoch, stale = score, epoch + 1, 0
            ckpt.save(payload(model, store.manifest, epoch + 1, best, history), out / "checkpoints" / "best.pt")
        else:
            stale += 1
        print(json.dumps(row), flush=True)
        if out_of_time or (patience is not None and stale >= patience):
            break
    ckpt.save(payload(model, store.manifest, len(history), best, history), out / "checkpoints" / "last.pt")
    with open(out / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    for loader in (train_loader, val_loader):
        engine.close_loader(loader)
    return {"steps": steps, "epochs": len(history), "best": best, "best_epoch": best_epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, required=True, help="seconds of training (wall clock)")
    parser.add_argument("--patience", type=int, default=None, help="stop after this many validations without gain")
    parser.add_argument("--cap-epochs", type=int, default=100000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    summary = train(args.shards, args.out, args.budget, args.patience, args.cap_epochs, args.workers, args.seed)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
