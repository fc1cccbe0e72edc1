"""Quality harness: our recipes against a plain MONAI U-Net, on the same shards, for the same
budget, scored by the same code.

    python bench/quality.py --write                              # 16 full-size patients, 128², 10 min each: v1, v2, MONAI
    python bench/quality.py --contender "v2-b8=--variant v2 --base 8" --contender monai --budget 300
    python bench/quality.py --mode converge --patience 3 --cap 3600 --write
    python bench/quality.py --patients 4 --shape 64,64,32 --size 32 --budget 20 --work /tmp/q   # a quick try
    python bench/quality.py --profile shifted --load 0,1 --contender v2 --contender monai --write   # off the bench

What it does, in one run:

1. Data, once: `etl synth` (brats2020 layout, `--patients`, `--shape`, seed 0, `--profile`: `default`,
   the data the recipe was tuned on, or `shifted`, a second data set with more variety, chosen before
   any result on it) and `etl build-shards --size` (default split train 0.8 / val 0.2, seed 0). Kept
   in `--work` and reused when the same options ask for it again.
2. Each contender trains on the same cores and threads, one after the other, for the same
   wall-clock `--budget` (mode `budget`), or (mode `converge`) until its validation score has not
   improved for `--patience` validations, capped at `--cap` seconds. Ours is `train run` exactly
   as a user types it, plus `--time-budget`, `--device cpu` and `--no-report` (and in `converge`
   mode `--early-stop`); a contender is a name and the options it adds (`--contender
   "NAME=--variant v2 --base 8"`; bare `v1` and `v2` are the presets with their defaults). The peer
   (`monai`) is bench/monai_peer.py: MONAI's U-Net and DiceLoss, Adam, batch 16, in a plain loop
   fed by our `ShardDataset` (`--contender "monai-s1=monai --seed 1"`: the peer with another seed).
   `--load 0,1` trains every contender once per load level: quiet, then beside one busy process
   (a plain Python loop at normal priority, as ../shared/tools/with-load starts, for the whole of
   that contender's training and nothing else), as on a laptop or a shared server; rows are named
   `NAME@loadN`. `--throttle NAME=SECONDS` runs contender NAME at a tenth of its speed for its first
   SECONDS (stopped 0.9 s of every second with SIGSTOP/SIGCONT, its loader worker too): a slow
   start for real, which the time budget's schedule must not let ruin the run.
3. Every contender's best checkpoint (best validation mean Dice) is scored by `train evaluate
   --src` on the validation patients: Dice and HD95 per class (NEC/NET, ED, ET) and per BraTS
   region (WT, TC, ET) on the native grid, each the mean over patients; also the per-class Dice on
   the 128² shard grid (the issue's first table).
4. The loader check (`--starvation-steps`, for the first of our contenders): training steps per
   second fed from the shards through the recipe's DataLoader, against the same steps on batches
   already in memory, in one process.
5. A table, the curves (validation mean Dice against training seconds) and the machine go to the
   terminal and, with `--write`, to bench/BENCHMARKS.md (section `quality` or `quality-<label>`)
   and bench/quality-<label>.png.

Nothing here asserts a score; it measures. Another job sharing the cores slows every contender
that runs while it does: the load average after each contender is recorded beside its row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# `python bench/quality.py` puts bench/ first on sys.path, where bench/etl.py would shadow the etl package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(BENCH.parent))

from bench import _common as common  # noqa: E402

PRESETS = {"v1": ["--variant", "v1"], "v2": ["--variant", "v2"]}
PEER = "monai"
CLASSES = ("NEC/NET", "ED", "ET")
REGIONS = ("WT", "TC", "ET")


@dataclass
class Contender:
    name: str
    options: list[str] | None  # None: the MONAI peer
    peer_seed: int = 0  # the peer's seed (`NAME=monai --seed N`)
    load: int = 0  # busy processes beside its training
    throttle: float = 0.0  # seconds at the start run at a tenth of the speed
    run_dir: Path = Path()
    wall: float = 0.0
    cpu: float = 0.0
    load_after: str = ""
    steps: int | None = None
    epochs: int = 0
    params: int = 0
    gflop: float = 0.0
    curve: list[tuple[float, float]] = field(default_factory=list)
    scores: dict = field(default_factory=dict)


# ---------------------------------------------------------------- 1. data


def prepare(work: Path, patients: int, shape: str, size: int, seed: int, profile: str = "default") -> tuple[Path, Path]:
    """Synthesise the source and build the shards once; reuse them when the options match."""
    key = f"p{patients}-s{shape.replace(',', 'x')}-z{size}-seed{seed}" + ("" if profile == "default" else f"-{profile}")
    source, shards = work / key / "source", work / key / "shards"
    if not (shards / "manifest.json").exists():
        shutil.rmtree(work / key, ignore_errors=True)
        common.run_tool([*common.cli("etl"), "synth", "--out", str(source), "--patients", str(patients),
                         "--shape", shape, "--seed", str(seed), "--profile", profile], "etl synth")
        common.run_tool([*common.cli("etl"), "build-shards", "--src", str(source), "--out", str(shards),
                         "--size", str(size), "--seed", str(seed)], "etl build-shards")
    return source, shards


# ---------------------------------------------------------------- 2. training


def parse_contender(text: str) -> Contender:
    if text == PEER:
        return Contender(PEER, None)
    if text in PRESETS:
        return Contender(text, list(PRESETS[text]))
    name, sep, options = text.partition("=")
    if not sep or not name:
        sys.exit(f"--contender: expected NAME=OPTIONS, {PEER}, or one of {sorted(PRESETS)}; got {text!r}")
    words = shlex.split(options)
    if words[:1] == [PEER]:  # the peer with another seed: NAME=monai --seed N
        if len(words) != 3 or words[1] != "--seed" or not words[2].isdigit():
            sys.exit(f"--contender: the peer takes only --seed N (NAME={PEER} --seed N); got {text!r}")
        return Contender(name, None, peer_seed=int(words[2]))
    return Contender(name, words)


def parse_loads(text: str) -> list[int]:
    try:
        loads = [int(v) for v in text.split(",")]
    except ValueError:
        loads = []
    if not loads or any(v < 0 or v > 8 for v in loads) or len(set(loads)) != len(loads):
        sys.exit(f"--load: expected busy-process counts between 0 and 8 such as 1 or 0,1; got {text!r}")
    return loads


def with_loads(contenders: list[Contender], loads: list[int]) -> list[Contender]:
    """Every contender once per load level (`NAME@loadN` beside N busy processes; the bare name at 0)."""
    if loads == [0]:
        return contenders
    return [Contender(c.name if n == 0 else f"{c.name}@load{n}", c.options, c.peer_seed, load=n)
            for n in loads for c in contenders]


def contender_argv(c: Contender, shards: Path, args: argparse.Namespace) -> list[str]:
    """The command that trains `c` (ours: `train run` as a user types it; the peer: bench/monai_peer.py)."""
    budget = args.budget if args.mode == "budget" else args.cap
    if c.options is None:
        argv = [sys.executable, str(BENCH / "monai_peer.py"), "--shards", str(shards), "--out", str(c.run_dir),
                "--budget", str(budget), "--workers", str(args.peer_workers), "--seed", str(c.peer_seed)]
        if args.mode == "converge":
            argv += ["--patience", str(args.patience)]
        return argv
    argv = [*common.cli("train"), "run", "--shards", str(shards), "--out", str(c.run_dir), *c.options,
            "--time-budget", f"{budget}s", "--device", "cpu", "--no-report"]
    if "--epochs" not in c.options:
        argv += ["--epochs", str(args.cap_epochs)]
    if args.mode == "converge":
        argv += ["--early-stop", str(args.patience)]
    return argv


def train_contenders(contenders: list[Contender], shards: Path, work: Path, args: argparse.Namespace) -> None:
    """Train every contender: one after the other on all cores, or (`--parallel`) side by side,
    each pinned to its own `--cores-per-run` cores with as many torch threads. Wall and CPU
    seconds are measured per process tree (CPU: `os.wait4`'s rusage, children included)."""
    for c in contenders:
        c.run_dir = work / "runs" / f"{args.label}-{c.name}"
        shutil.rmtree(c.run_dir, ignore_errors=True)
        c.run_dir.parent.mkdir(parents=True, exist_ok=True)
    batches = [contenders] if args.parallel else [[c] for c in contenders]
    cores = sorted(os.sched_getaffinity(0))
    for batch in batches:
        running = []
        for i, c in enumerate(batch):
            env = dict(os.environ)
            pin = None
            if args.parallel:
                pin = set(cores[i * args.cores_per_run:(i + 1) * args.cores_per_run])
                if len(pin) < args.cores_per_run:
                    sys.exit(f"--parallel: {len(batch)} contenders x {args.cores_per_run} cores > {len(cores)} cores")
                env["OMP_NUM_THREADS"] = str(args.cores_per_run)
            print(f"training {c.name} ...", file=sys.stderr, flush=True)
            log = open(log_path(c), "w")  # beside the run folder: train run wants it for itself
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(c.load)]
            proc = subprocess.Popen(contender_argv(c, shards, args), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=common.REPO, preexec_fn=(lambda p=pin: os.sched_setaffinity(0, p)) if pin else None,
                                    start_new_session=c.throttle > 0)
            if c.throttle > 0:
                threading.Thread(target=throttle, args=(proc, c.throttle), daemon=True).start()
            running.append((c, proc, time.perf_counter(), log, busy))
        for c, proc, started, log, busy in running:
            _, status, usage = os.wait4(proc.pid, 0)
            for b in busy:
                b.kill()
                b.wait()
            proc.returncode = os.waitstatus_to_exitcode(status)
            c.wall = time.perf_counter() - started
            c.cpu = usage.ru_utime + usage.ru_stime
            c.load_after = common.load()
            log.close()
            if proc.returncode != 0:
                tail = log_path(c).read_text()[-3000:]
                sys.exit(f"{c.name} failed (exit {proc.returncode}): {' '.join(contender_argv(c, shards, args))}\n{tail}")
            read_curve(c)


def throttle(proc: subprocess.Popen, seconds: float) -> None:
    """Run `proc`'s process group 0.1 s of every second for its first `seconds`."""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGSTOP)
            time.sleep(0.9)
            os.killpg(proc.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def log_path(c: Contender) -> Path:
    return c.run_dir.with_name(c.run_dir.name + ".log")


def read_curve(c: Contender) -> None:
    """(training seconds so far, validation mean Dice) per validation; steps and epochs done."""
    import csv

    with open(c.run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    c.epochs = len(rows)
    if c.options is None:  # the peer logs elapsed seconds and steps
        c.curve = [(float(r["seconds"]), float(r["mean_dice"])) for r in rows]
        c.steps = int(rows[-1]["steps"]) if rows else 0
        return
    elapsed = 0.0
    for r in rows:
        elapsed += float(r["seconds"])
        c.curve.append((elapsed, float(r["mean_dice"])))
    last = c.run_dir / "checkpoints" / "last.pt"
    if last.exists():
        from train.runfiles import checkpoint as ckpt

        c.steps = ckpt.load(last).get("steps")


# ---------------------------------------------------------------- 3. scoring


def model_cost(c: Contender, size: int) -> None:
    """Parameters and forward + backward GFLOP of one slice (`common.gflop_per_slice`)."""
    from train.models import build_model, count_parameters
    from train.runfiles import checkpoint as ckpt

    payload = ckpt.load(c.run_dir / "checkpoints" / "best.pt")
    spec = payload["model"]
    model = build_model(spec["name"], spec["in_channels"], spec.get("out_channels", 3), **(spec.get("kwargs") or {}))
    c.params = count_parameters(model)
    c.gflop = common.gflop_per_slice(model, spec["in_channels"], size)


def score(c: Contender, shards: Path, source: Path | None, work: Path, extra: list[Path] = (), tta: bool = False,
          min_et_voxels: int = 0) -> None:
    """`train evaluate --src` on the validation split, in this process (the peer's model is
    registered); without a source, the shard grid only (`--shards` given without `--src`).
    `extra` checkpoints make an ensemble; `tta` and `min_et_voxels` are evaluate's options."""
    from rich.console import Console

    from train.apply import evaluate

    results = evaluate.main(checkpoint=[c.run_dir / "checkpoints" / "best.pt", *extra], shards=str(shards), split="val",
                            src=source, json_path=work / "eval" / f"{c.name}.json", device="cpu",
                            batch_size=32, workers=0, console=Console(quiet=True), tta=tta,
                            min_et_voxels=min_et_voxels, overwrite=True)  # the harness's own file
    keys = (*CLASSES, "WT", "TC")
    grid = results["shard_grid"]["summary"]
    native = (results.get("native_grid") or {}).get("summary")
    c.scores = {
        "grid_dice": {k: grid[k]["dice"]["mean"] for k in keys},
        "native_dice": {k: native[k]["dice"]["mean"] for k in keys} if native else None,
        "native_hd95": {k: native[k]["hd95"]["mean"] for k in keys} if native else None,
        "nec_precision_recall": tuple((native or grid)["NEC/NET"][m]["mean"] for m in ("precision", "recall")),
        "patients": results["shard_grid"]["patients"],
        "per_patient": {row["patient"]: {k: row["scores"][k]["dice"] for k in CLASSES}
                        for row in (results.get("native_grid") or results["shard_grid"])["per_patient"]},
    }


def parse_score_variant(text: str, contenders: list[Contender]) -> tuple[str, str, argparse.Namespace, Contender,
                                                                         list[Contender]]:
    """(name, options, parsed options, the contender scored, the ensemble's others) of one
    `--score-variant NAME=OPTIONS`; a name that is no contender exits in one line (checked before
    any training, so a typo does not cost the runs)."""
    name, _, options = text.partition("=")
    parser = argparse.ArgumentParser(prog=f"--score-variant {name}")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--min-et-voxels", type=int, default=0)
    parser.add_argument("--ensemble", action="append", default=[])
    parser.add_argument("--of", default=None, help="the contender scored (default: the first of ours)")
    opts = parser.parse_args(shlex.split(options))
    by_name = {c.name: c for c in contenders}
    for wanted in [*opts.ensemble, *([opts.of] if opts.of else [])]:
        if wanted not in by_name:
            sys.exit(f"--score-variant {name}: no contender named {wanted!r} (contenders: {', '.join(by_name)})")
    of = by_name[opts.of] if opts.of else next((c for c in contenders if c.options is not None), None)
    if of is None:
        sys.exit(f"--score-variant {name}: give --of NAME (no contender of ours to score)")
    return name, options, opts, of, [by_name[n] for n in opts.ensemble]


def score_variants(contenders: list[Contender], texts: list[str], shards: Path, source: Path | None,
                   work: Path) -> list[Contender]:
    """Rows for inference options (TTA, post-processing, ensembles) of the first of our contenders:
    the same checkpoint scored again, so each row's difference is the option's alone."""
    rows = []
    for text in texts:
        name, options, opts, of, others = parse_score_variant(text, contenders)
        shown = [*(of.options if of.options is not None else [peer_description(of)]), f"[evaluate {options}]"]
        row = Contender(f"{of.name} {name}", shown, run_dir=of.run_dir, load=of.load,
                        wall=of.wall, cpu=of.cpu, load_after=of.load_after, steps=of.steps, epochs=of.epochs,
                        params=of.params, gflop=of.gflop, curve=[])
        score(row, shards, source, work, extra=[o.run_dir / "checkpoints" / "best.pt" for o in others], tta=opts.tta,
              min_et_voxels=opts.min_et_voxels)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- 4. the loader check


def starvation_child(shards: str, options: list[str], steps: int) -> dict:
    """Steps/s of the recipe fed by its DataLoader vs the same steps on batches held in memory."""
    from rich.console import Console

    from train import fit
    from train.cli import overrides_from_argv
    from train.training.trainer import Hooks, Setup, Trainer

    overrides = overrides_from_argv(["--shards", shards, "--out", "/tmp/unused-starvation-run", *options,
                                     "--device", "cpu"])
    config, preset, _ = fit.resolve_run(overrides, False, False)
    dist, device = fit.start_processes(config)
    manifest, train_ds, val_ds, splits = fit.open_data(config, None, True, False, dist, None)
    setup = Setup(config=config, preset=preset, overrides=overrides, manifest=manifest, train_ds=train_ds, val_ds=val_ds,
                  train_splits=splits, dist=dist, device=device, console=Console(quiet=True), hooks=Hooks())
    trainer = Trainer(setup)
    trainer.augmenter = trainer.build_augmenter(0)
    trainer.net.train()
    warm = 3

    def timed(batches) -> float:
        count, started = 0, 0.0
        for i, (image, mask) in enumerate(batches):
            if i == warm:
                started = time.perf_counter()
            trainer.train_step(image, mask)
            count += 1
            if count == warm + steps:
                break
        return (count - warm) / (time.perf_counter() - started)

    def stream():
        epoch = 0
        while True:
            train_ds.set_epoch(epoch)
            yield from trainer.train_loader
            epoch += 1

    fed = timed(stream())
    held = []
    for batch in stream():
        held.append(batch)
        if len(held) == warm + steps:
            break
    in_memory = timed(iter(held))
    trainer.close(None)  # type: ignore[arg-type]
    return {"fed": fed, "in_memory": in_memory, "ratio": fed / in_memory, "steps": steps,
            "workers": config.workers, "batch_size": config.batch_size}


def starvation(shards: Path, options: list[str], steps: int) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--starvation-child", str(shards), "--steps", str(steps),
            "--", *options]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=common.REPO)
    if done.returncode != 0:
        sys.exit(f"loader check failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- 5. output


def peer_description(c: Contender) -> str:
    return "MONAI UNet, DiceLoss, Adam, b16" + (f", seed {c.peer_seed}" if c.peer_seed else "")


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def render(contenders: list[Contender], check: dict | None, args: argparse.Namespace, info: dict,
           png: Path | None, source: Path | None) -> str:
    mode = (f"equal budget: {args.budget:.0f} s of training each" if args.mode == "budget" else
            f"to convergence: until {args.patience} validations without gain, capped at {args.cap:.0f} s")
    command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"## Quality: ours against a plain MONAI U-Net ({args.label}; {mode})", "",
             f"Command: `{command}` ({time.strftime('%Y-%m-%d')}).", *common.machine_lines(info),
             f"- data: {args.patients} synthetic BraTS 2020 patients (`etl synth`, shape {args.shape}, seed "
             f"{args.seed}, profile {args.profile}), shards at {args.size}², split train 0.8 / val 0.2 (seed {args.seed}); scored on the "
             f"{contenders[0].scores.get('patients', '?')} validation patients",
             "- every number is `train evaluate " + ("--src" if source else "") + "` of the contender's best checkpoint "
             "(best validation mean Dice): per patient, then the mean over patients; "
             + ("native grid unless said" if source else "**shard grid** (no source given: no native grid, no HD95)"),
             f"- {'side by side, each pinned to ' + str(args.cores_per_run) + ' cores' if args.parallel else 'one after the other, on all cores'}",
             ""]
    header = ["contender", "options", "params", "GFLOP/slice", "steps", "epochs", "train s", "CPU s",
              "NEC/NET", "ED", "ET", "mean class", "WT", "TC", "ET", "mean region", "NEC/NET prec/recall",
              "HD95 WT/TC/ET (mm)", "shard grid NEC/ED/ET", "busy", "load after"]
    rows = []
    nan = {k: math.nan for k in (*CLASSES, "WT", "TC")}
    for c in contenders:
        g = c.scores["grid_dice"]
        d, h = c.scores["native_dice"] or g, c.scores["native_hd95"] or nan
        classes = [d[k] for k in CLASSES]
        regions = [d["WT"], d["TC"], d["ET"]]
        rows.append([c.name, " ".join(c.options) if c.options is not None else peer_description(c),
                     f"{c.params:,}", f"{c.gflop:.2f}", "–" if c.steps is None else str(c.steps), str(c.epochs),
                     f"{c.wall:.0f}", f"{c.cpu:.0f}", *(fmt(v) for v in classes), fmt(sum(classes) / 3),
                     *(fmt(v) for v in regions), fmt(sum(regions) / 3),
                     "/".join(fmt(v, 2) for v in c.scores.get("nec_precision_recall", (None, None))),
                     "/".join(fmt(h[k], 1) for k in ("WT", "TC", "ET")), "/".join(fmt(g[k], 2) for k in CLASSES),
                     str(c.load) + (f"; first {c.throttle:g} s at 1/10 speed" if c.throttle else ""), c.load_after])
    lines.append(common.table(header, rows))
    peers = {}  # the first peer at each load level and seed; score variants of the peer have options
    for c in contenders:
        if c.options is None:
            peers.setdefault((c.load, c.peer_seed), c)
            peers.setdefault((c.load, None), c)
    if peers:
        lines.append("")
        for c in contenders:
            peer = peers.get((c.load, seed_of(c))) or peers.get((c.load, None))
            if peer is None or c is peer:
                continue
            ours_d = c.scores["native_dice"] or c.scores["grid_dice"]
            peer_d = peer.scores["native_dice"] or peer.scores["grid_dice"]
            gaps = [ours_d[k] - peer_d[k] for k in CLASSES]
            region_gap = sum(ours_d[k] - peer_d[k] for k in ("WT", "TC", "ET")) / 3
            lines.append(f"- {c.name} − {peer.name}: mean class Dice {sum(gaps) / 3:+.3f} (NEC/NET {gaps[0]:+.3f}, ED "
                         f"{gaps[1]:+.3f}, ET {gaps[2]:+.3f}); mean region Dice {region_gap:+.3f}"
                         + patient_spread(c, peer))
    lines += per_patient_lines(contenders)
    if check is not None:
        lines += ["", f"Loader check ({contenders[0].name}'s recipe, batch {check['batch_size']}, {check['workers']} "
                      f"loader worker(s), {check['steps']} steps): {check['fed']:.2f} steps/s fed from the shards, "
                      f"{check['in_memory']:.2f} steps/s on batches held in memory: **{100 * check['ratio']:.0f} %**."]
    lines += ["", "Validation mean Dice (dataset level, as `train run` logs it) against training seconds:", ""]
    for c in (c for c in contenders if c.curve):  # a score variant has its contender's curve
        points = ", ".join(f"{s:.0f} s: {v:.2f}" for s, v in c.curve[:: max(1, len(c.curve) // 12)])
        lines.append(f"- {c.name}: {points}")
    if png is not None:
        lines += ["", f"![curves]({png.name})"]
    return "\n".join(lines) + "\n"


def seed_of(c: Contender) -> int:
    """The seed a contender trains with: the peer's `--seed N`, ours from its options (train's default 0),
    so that `v2-s1` is compared with `monai-s1`, not with the peer of another seed."""
    if c.options is None:
        return c.peer_seed
    words = c.options
    return int(words[words.index("--seed") + 1]) if "--seed" in words[:-1] else 0


def patient_means(c: Contender) -> dict[str, float]:
    """Each validation patient's mean class Dice (empty for scores from before per-patient figures)."""
    return {name: sum(dice.values()) / len(dice) for name, dice in (c.scores.get("per_patient") or {}).items()}


def patient_spread(c: Contender, peer: Contender) -> str:
    """The per-patient differences behind a mean difference: with 3 to 5 validation patients one
    patient can decide it (a patient without ET scores ET 1 or 0 on a single stray voxel)."""
    ours, theirs = patient_means(c), patient_means(peer)
    gaps = [ours[name] - theirs[name] for name in ours if name in theirs]
    if not gaps:
        return ""
    ahead = sum(gap > 0 for gap in gaps)
    return f"; per patient {min(gaps):+.3f} .. {max(gaps):+.3f}, ahead in {ahead} of {len(gaps)}"


def per_patient_lines(contenders: list[Contender]) -> list[str]:
    """Mean class Dice per validation patient and contender (NEC/NET Dice beside it)."""
    names = sorted({name for c in contenders for name in (c.scores.get("per_patient") or {})})
    if not names:
        return []
    means = [patient_means(c) for c in contenders]
    rows = []
    for name in names:
        row = [name]
        for c, mean in zip(contenders, means):
            dice = (c.scores.get("per_patient") or {}).get(name)
            row.append("–" if dice is None else f"{mean[name]:.3f} ({dice['NEC/NET']:.2f})")
        rows.append(row)
    return ["", "Per validation patient, mean class Dice (NEC/NET Dice):", "",
            common.table(["patient", *(c.name for c in contenders)], rows)]


def plot(contenders: list[Contender], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for c in contenders:
        if c.curve:
            ax.plot([s for s, _ in c.curve], [v for _, v in c.curve], marker="o", markersize=3, label=c.name)
    ax.set(xlabel="training seconds", ylabel="validation mean Dice", ylim=(0, 1), title="Quality against time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/quality-bench"))
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--shape", default="240,240,155")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="default", help="etl synth --profile: default (the data the recipe "
                        "was tuned on) or shifted (a second data set with more variety)")
    parser.add_argument("--throttle", action="append", default=[], help="NAME=SECONDS: contender NAME at a tenth "
                        "of its speed for its first SECONDS (a slow start)")
    parser.add_argument("--load", default="0", help="busy processes beside each contender's training; a list "
                        "(0,1) trains every contender once per level")
    parser.add_argument("--contender", action="append", default=None,
                        help=f"NAME=OPTIONS, {PEER}, NAME={PEER} --seed N (the peer with another seed), v1 or v2 "
                             f"(repeatable; default: v1, v2, {PEER}); differences are taken to the first peer")
    parser.add_argument("--mode", choices=("budget", "converge"), default="budget")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training per contender (mode budget)")
    parser.add_argument("--patience", type=int, default=3, help="validations without gain (mode converge)")
    parser.add_argument("--cap", type=float, default=3600.0, help="seconds per contender at most (mode converge)")
    parser.add_argument("--cap-epochs", type=int, default=1000, help="--epochs for ours unless its options say")
    parser.add_argument("--peer-workers", type=int, default=1)
    parser.add_argument("--shards", type=Path, default=None, help="use these shards instead of synthesising data")
    parser.add_argument("--src", type=Path, default=None, help="with --shards: their source, for the native grid")
    parser.add_argument("--parallel", action="store_true", help="train the contenders side by side (a big machine)")
    parser.add_argument("--cores-per-run", type=int, default=2, help="with --parallel: cores (and threads) each")
    parser.add_argument("--starvation-steps", type=int, default=40, help="0 skips the loader check")
    parser.add_argument("--label", default=None, help="names the BENCHMARKS.md section (default: the mode)")
    parser.add_argument("--write", action="store_true", help="update bench/BENCHMARKS.md and the curves PNG")
    parser.add_argument("--markdown", type=Path, default=common.BENCHMARKS_MD)
    parser.add_argument("--score-variant", action="append", default=None,
                        help="NAME=OPTIONS scored from the first of our contenders' best checkpoint (or --of CONTENDER's) "
                             "without training again: --tta, --min-et-voxels N, --ensemble CONTENDER (repeatable)")
    parser.add_argument("--rescore", action="store_true", help="score the runs an earlier call trained, again")
    parser.add_argument("--starvation-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=40, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.starvation_child:
        print(json.dumps(starvation_child(args.starvation_child, args.rest, args.steps)))
        return
    args.label = args.label or args.mode
    contenders = [parse_contender(t) for t in (args.contender or ["v1", "v2", PEER])]
    contenders = with_loads(contenders, parse_loads(args.load))
    for text in args.throttle:
        name, _, seconds = text.partition("=")
        chosen = [c for c in contenders if c.name == name]
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if not chosen or not value > 0:
            sys.exit(f"--throttle: expected NAME=SECONDS naming a contender, got {text!r}")
        chosen[0].throttle = value
    for text in args.score_variant or []:
        parse_score_variant(text, contenders)
    info = common.machine()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.shards is not None:
        source, shards = args.src, args.shards
    else:
        source, shards = prepare(args.work, args.patients, args.shape, args.size, args.seed, args.profile)
    if args.rescore:  # score runs trained by an earlier call (same --work, --label and contenders)
        for c in contenders:
            c.run_dir = args.work / "runs" / f"{args.label}-{c.name}"
            read_curve(c)
    else:
        train_contenders(contenders, shards, args.work, args)
    check = None
    ours = [c for c in contenders if c.options is not None]
    if args.starvation_steps and ours:
        check = starvation(shards, ours[0].options, args.starvation_steps)
    from bench.monai_peer import register

    register()  # `train evaluate` builds the peer's model by its registered name

    for c in contenders:
        model_cost(c, args.size)
        score(c, shards, source, args.work)
    contenders += score_variants(contenders, args.score_variant or [], shards, source, args.work)
    info["load_at_end"] = common.load()
    info["shared"] = False  # the load average says what else ran; the contenders load the cores themselves
    png = args.markdown.parent / f"quality-{args.label}.png" if args.write else None
    if png is not None:
        plot(contenders, png)
    text = render(contenders, check, args, info, png, source)
    print(text)
    if args.write:
        common.write_section(f"quality-{args.label}", text, args.markdown)
    (args.work / f"quality-{args.label}.json").write_text(json.dumps(
        [{"name": c.name, "options": c.options, "wall": c.wall, "cpu": c.cpu, "steps": c.steps, "epochs": c.epochs,
          "params": c.params, "gflop": c.gflop, "curve": c.curve, "scores": c.scores} for c in contenders], indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
