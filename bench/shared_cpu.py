"""Training speed on a CPU that other work shares: steps/s quiet and beside busy processes.

    python bench/shared_cpu.py                                  # v2's CPU recipe and the MONAI peer, 0 and 1 busy process
    python bench/shared_cpu.py --setting "passive=OMP_WAIT_POLICY=PASSIVE" --setting "1 thread=threads=1" --write
    python bench/shared_cpu.py --model v2 --setting "follow=OMP_WAIT_POLICY=PASSIVE,threads=follow" --duty 0.5  # a part-time neighbour

Each (model, setting, load) runs in a fresh process (OpenMP reads its environment once, at start):
the training step `train run` takes on this CPU (v2: the attention U-Net with the sizes a new run takes
here, `devices.defaults_kind`; bf16 autocast where the CPU has it, `v2-bf16` forces it, `v2-fp32` turns it
off; channels-last, the light augmentation in the main process; the peer: bench/quality.py's MONAI U-Net,
float32) on random batches held in memory, for `--seconds` after
warm-up steps. `--load N` busy processes (plain Python loops, as ../shared/tools/with-load starts)
run beside the loaded rows only. Rounds interleave the configurations; the median of `--rounds`
is kept. The figure that matters is loaded / quiet of the same configuration: what one busy
process beside training costs it.

A setting is `NAME=VAR=VALUE[,VAR=VALUE]`: environment variables of the child (`threads=N` sets
torch's intra-op threads instead; `threads=follow` lets `train.runtime.cpu_share.ThreadGovernor`
set them, as `train run --threads follow` and a budgeted CPU run do, and measures after its first
decision). The first row, `spin`, is OpenMP's own default (what a plain
PyTorch loop gets: waiting threads spin); `train` itself sets OMP_WAIT_POLICY=PASSIVE
(`train.cli.SHARED_CPU_ENV`), which `--setting "passive=OMP_WAIT_POLICY=PASSIVE"` measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(BENCH.parent))

from bench import _common as common  # noqa: E402

BUSY = "while True: pass"
PART_BUSY = ("import time\nwhile True:\n    end = time.monotonic() + {busy}\n    while time.monotonic() < end: pass\n"
             "    time.sleep({idle})")
"""A neighbour busy `--duty` of the time in 100 ms cycles (a browser, an editor's indexer)."""


def busy_code(duty: float) -> str:
    return BUSY if duty >= 1 else PART_BUSY.format(busy=0.1 * duty, idle=0.1 * (1 - duty))


def child(model_name: str, seconds: float, threads: str | None) -> dict:
    """Steps/s of one model's training step (run in a fresh process); `threads` "follow": as
    `train run --threads follow` sets them, measured after its first decision."""
    import torch

    from train.runtime.cpu_share import INTERVAL_S, ThreadGovernor

    governor = ThreadGovernor(torch.get_num_threads()) if threads == "follow" else None
    if threads and threads != "follow":
        torch.set_num_threads(int(threads))
    device = torch.device("cpu")
    if model_name == "peer":
        from bench.monai_peer import build_monai_unet
        from train.recipe.losses import build_loss

        model, loss_fn, channels, batch, amp, augmenter = build_monai_unet(4), build_loss("dice"), 4, 16, None, None
    else:
        from train.config.options import resolve
        from train.models import build_model
        from train.recipe.augment import AUGMENTATIONS
        from train.recipe.losses import build_loss
        from train.runtime.devices import defaults_kind
        from train.training import engine

        variant, _, precision = model_name.partition("-")  # v2-fp32: --no-amp; v2-bf16: --amp-dtype bfloat16
        forced = {"fp32": {"amp": False}, "bf16": {"amp_dtype": "bfloat16"}}.get(precision, {})
        config = resolve({"shards": "-", "out": "-", "variant": variant, **forced}, device_kind=defaults_kind("cpu"))
        channels, batch = len(config.channels), config.batch_size
        model = engine.prepare_model(build_model(config.model, channels, 3, **config.model_kwargs), device)
        loss_fn = build_loss(config.loss)
        amp = engine.autocast_dtype(config.amp, config.amp_dtype, device)
        augmenter = AUGMENTATIONS[config.augment](0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, channels, 128, 128)
    y = (torch.rand(batch, 3, 128, 128) > 0.9).float()

    def step() -> None:
        image, mask = (augmenter(x, y) if augmenter is not None else (x, y))
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            out = model(image)
            out = out[0] if isinstance(out, tuple) else out
            loss = loss_fn(out.float(), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if governor is not None:
            governor.poll()

    warm_up = INTERVAL_S + 0.5 if governor is not None else 0.0  # until the governor's first decision
    steps, started = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - started < warm_up:
        step()
        steps += 1
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        steps += 1
    return {"steps_per_s": steps / (time.perf_counter() - started), "threads": torch.get_num_threads()}


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition("=")
    env = dict(item.split("=", 1) for item in rest.split(",") if item) if rest else {}
    if not name or any(not k for k in env):
        sys.exit(f"--setting: expected NAME=VAR=VALUE[,VAR=VALUE], got {text!r}")
    return name, env


def measure(model: str, env: dict[str, str], load: int, seconds: float, duty: float = 1.0) -> float:
    busy = [subprocess.Popen([sys.executable, "-c", busy_code(duty)]) for _ in range(load)]
    try:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
        threads = env.get("threads")
        child_env.update({k: v for k, v in env.items() if k != "threads"})
        argv = [sys.executable, __file__, "--child", model, "--seconds", str(seconds)]
        if threads:
            argv += ["--threads", threads]
        done = subprocess.run(argv, env=child_env, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"child failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])["steps_per_s"]
    finally:
        for p in busy:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="v1, v2, v2-fp32 (--no-amp), v2-bf16 (bf16 autocast, "
                        "even without native bf16) or peer (default: v2 and peer)")
    parser.add_argument("--setting", action="append", default=[], help="NAME=VAR=VALUE[,VAR=VALUE]")
    parser.add_argument("--load", type=int, default=1, help="busy processes beside the loaded rows")
    parser.add_argument("--duty", type=float, default=1.0, help="the fraction of the time each busy process "
                        "computes, in 100 ms cycles (default 1: always)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--label", default=None, help="names the BENCHMARKS.md section (shared-cpu-LABEL)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seconds, args.threads)))
        return
    models = args.model or ["v2", "peer"]
    settings = [("spin", {})] + [parse_setting(s) for s in args.setting]
    configs = [(m, name, env, load) for m in models for name, env in settings for load in (0, args.load)]
    results: dict[tuple, list[float]] = {}
    load_before = common.load()
    for round_ in range(args.rounds):
        for model, name, env, load in configs:
            rate = measure(model, env, load, args.seconds, args.duty)
            results.setdefault((model, name, load), []).append(rate)
            print(f"round {round_ + 1}: {model:5s} {name:12s} load {load}: {rate:.2f} steps/s", flush=True)
    rows = []
    for model in models:
        for name, env in settings:
            quiet = statistics.median(results[(model, name, 0)])
            loaded = statistics.median(results[(model, name, args.load)])
            rows.append([model, name, ", ".join(f"{k}={v}" for k, v in env.items()) or "OpenMP's default",
                         f"{quiet:.2f}", f"{loaded:.2f}", f"{loaded / quiet:.2f}"])
    beside = f"{args.load} busy" + (f" {args.duty:.0%} of the time" if args.duty < 1 else "")
    header = ["model", "setting", "environment", "steps/s quiet", f"steps/s beside {beside}", "loaded / quiet"]
    text = "\n".join([
        "## Training speed on a shared CPU" + (f" ({args.label})" if args.label else ""), "",
        f"Command: `python bench/shared_cpu.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')}); "
        f"{common.cpu_model()}, {os.cpu_count()} cores; the training step on random 128² batches in memory, "
        f"{args.seconds:g} s per measurement, median of {args.rounds} interleaved rounds; load average before "
        f"{load_before}, after {common.load()}.", "",
        common.table(header, rows), ""])
    print(text)
    if args.write:
        common.write_section("shared-cpu" + (f"-{args.label}" if args.label else ""), text)


if __name__ == "__main__":
    main()
