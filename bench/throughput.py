"""Throughput of each variant's default model: FLOPs per slice and training steps per second.

    python bench/throughput.py                      # this machine's device (CUDA if torch sees one, else CPU)
    python bench/throughput.py --device cpu --threads 2 --write

For each variant (v1, v2) with the sizes `train run` picks on this device (`train.config.options.DEVICE_DEFAULTS`),
and for the MONAI peer of bench/quality.py: forward + backward GFLOP of one 128² slice (torch's FLOP
counter), then training steps per second (Adam, the variant's loss, autocast as `train run` uses it:
fp16 on CUDA) on random batches held on the device, after warm-up steps; slices/s and the achieved
TFLOP/s follow. On CUDA it also projects a T4's step rate: the same fraction of the card's dense
fp16 tensor peak (H100 SXM 989, H100 PCIe 756, H200 989, A100 312, L4 121, T4 65 TFLOP/s) applied
to the T4's 65 TFLOP/s. That is a projection from one measured card, not a T4 measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(BENCH.parent))

from bench import _common as common  # noqa: E402

PEAK_FP16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0,
                    "L4": 121.0, "T4": 65.0}
T4_TFLOPS = 65.0


def steps_per_second(model, loss_fn, channels: int, size: int, batch: int, device, amp, steps: int) -> float:
    import torch

    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    x = torch.randn(batch, channels, size, size, device=device)
    y = (torch.rand(batch, 3, size, size, device=device) > 0.9).float()

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - started)


def main() -> None:
    import torch

    from bench.monai_peer import build_monai_unet
    from train.config.options import resolve
    from train.models import build_model, count_parameters
    from train.recipe.losses import build_loss
    from train.training.engine import autocast_dtype, prepare_model
    from train.training.messages import autocast_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    device = torch.device(kind)
    name = torch.cuda.get_device_name(device) if kind == "cuda" else common.cpu_model()
    peak = next((v for k, v in PEAK_FP16_TFLOPS.items() if k in name), None) if kind == "cuda" else None
    rows = []
    for variant in ("v1", "v2", "monai peer"):
        if variant == "monai peer":
            model, channels, loss, batch, amp = build_monai_unet(4), 4, build_loss("dice"), 16, None
            options = "MONAI UNet (16,32,64,128), strides 2, batch 16"
            if kind == "cuda":
                amp = torch.float16
        else:
            config = resolve({"shards": "-", "out": "-", "variant": variant}, device_kind=kind)
            channels = config.in_channels
            model = prepare_model(build_model(config.model, channels, 3, **config.model_kwargs), device)  # as `train run`
            loss, batch = build_loss(config.loss), config.batch_size
            amp = autocast_dtype(config.amp, config.amp_dtype, device)
            options = (f"{config.model}, base {config.base}, stem {config.stem}, batch {batch}, "
                       f"autocast {autocast_name(amp)}")
        gflop = common.gflop_per_slice(model, channels, args.size)
        rate = steps_per_second(model, loss, channels, args.size, batch, device, amp, args.steps)
        tflops = rate * batch * gflop / 1e3
        row = [variant, options, f"{count_parameters(model):,}", f"{gflop:.2f}", f"{rate:.2f}", f"{rate * batch:.0f}",
               f"{tflops:.2f}"]
        if kind == "cuda":
            t4 = rate * (T4_TFLOPS / peak) if peak else float("nan")
            row += [f"{t4:.2f}", f"{t4 * batch:.0f}"]
        rows.append(row)
    header = ["model", "defaults on this device", "params", "GFLOP/slice (fwd+bwd)", "steps/s", "slices/s",
              "achieved TFLOP/s"]
    if kind == "cuda":
        header += ["projected T4 steps/s", "projected T4 slices/s"]
    threads = f", {torch.get_num_threads()} threads" if kind == "cpu" else ""
    text = "\n".join([f"## Throughput of the default models on {name} ({kind}{threads})", "",
                      f"Command: `python bench/throughput.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')}); "
                      f"torch {torch.__version__}; {args.size}² slices, random batches held on the device, "
                      f"{args.steps} timed steps after 5 warm-up steps.", "",
                      common.table(header, rows), ""])
    if kind == "cuda":
        text += (f"\nT4 projection: the measured fraction of this card's dense fp16 peak ({peak} TFLOP/s) applied to "
                 f"the T4's {T4_TFLOPS}; a projection, not a T4 measurement.\n")
    print(text)
    if args.write:
        common.write_section(f"throughput-{kind}", text)


if __name__ == "__main__":
    main()
