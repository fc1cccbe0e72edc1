"""Benchmark of `etl build-shards` on full-size synthetic BraTS 2020 patients (not a test).

    python bench/etl.py --patients 16 --work /tmp/etl-bench            # print the figures
    python bench/etl.py --patients 16 --work /tmp/etl-bench --write    # and update bench/BENCHMARKS.md

What it measures, in one run, on the same source (240x240x155 uncompressed .nii, 4 modalities + seg):

- a plain single-process loop: nibabel load -> the same `shards_spec` preprocessing
  (`preprocess_volume`: z-score, resize, re-mask) -> `np.save` per slice (image and mask);
- `build_shards` on a Dask LocalCluster of 1 and of 2 single-threaded worker processes, warm
  (a cluster started beforehand, its workers having imported torch, passed as `--scheduler`:
  the throughput of the graph itself) and cold (the default path: `build_shards` starts and
  stops its own LocalCluster, as a user's command does);
- bytes per slice on disk for WebDataset (none, gz) and Zarr, against raw float16 (+ uint8 mask).

Targets: warm 2 workers >= 1.7x warm 1 worker; warm 1 worker no slower than 1.25x the plain loop;
369 patients (BraTS 2020 training) projected under 5 minutes with the measured cold start plus
369 / throughput. The machine's other load is printed with the figures: on a shared 2-core
machine the 2-worker figure cannot beat what the second core has free.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BRATS_2020_TRAINING = 369
MARK_START = "<!-- etl-bench:start -->"
MARK_END = "<!-- etl-bench:end -->"
MODALITIES = ("t1", "t1ce", "t2", "flair")


def make_source(work: Path, patients: int) -> Path:
    from etl.synth import synthesize

    src = work / f"src-{patients}"
    if not (src / ".complete").exists():
        shutil.rmtree(src, ignore_errors=True)
        started = time.time()
        synthesize(src, patients=patients, layout="brats2020", shape=(240, 240, 155), seed=0)
        (src / ".complete").write_text("")
        print(f"synthesised {patients} patients in {time.time() - started:.1f} s")
    return src


def cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


CPU: dict[str, float] = {}
"""Run name -> CPU seconds (user + sys) the run's processes spent: less sensitive to other load."""


def plain_loop(src: Path, out: Path, size: int) -> float:
    """The baseline: what someone would write without this tool, on one core."""
    import nibabel as nib
    import torch

    from shards_spec.labels import encode_labels
    from shards_spec.preprocess import brain_mask, preprocess_volume

    torch.set_num_threads(1)
    shutil.rmtree(out, ignore_errors=True)
    folders = sorted(p for p in src.rglob("BraTS20_Training_*") if p.is_dir())
    cpu = cpu_seconds()
    started = time.perf_counter()
    for folder in folders:
        pid = folder.name
        volume = np.stack([np.asarray(nib.load(folder / f"{pid}_{m}.nii").dataobj, dtype=np.float32) for m in MODALITIES])
        seg_path = next(folder.glob("*seg.nii")) if not (folder / f"{pid}_seg.nii").exists() else folder / f"{pid}_seg.nii"
        labels = encode_labels(np.asarray(nib.load(seg_path).dataobj), "brats2020")
        slices = preprocess_volume(volume, brain_mask(volume), labels, size=size)
        target = out / pid
        target.mkdir(parents=True)
        for k, z in enumerate(slices.slice_index):
            np.save(target / f"{z:03d}_image.npy", slices.image[k])
            np.save(target / f"{z:03d}_mask.npy", slices.mask[k])
    CPU["plain loop"] = cpu_seconds() - cpu
    return time.perf_counter() - started


def _warm() -> str:
    import nibabel  # noqa: F401
    import torch  # noqa: F401

    import etl.build  # noqa: F401
    import etl.sources  # noqa: F401
    import etl.writers.webdataset  # noqa: F401
    import etl.writers.zarr  # noqa: F401
    import shards_spec.preprocess  # noqa: F401

    return "ok"


def dask_build(src: Path, out: Path, size: int, workers: int, *, warm: bool, fmt: str = "webdataset",
               compression: str = "none") -> tuple[float, dict]:
    from etl.build import BuildOptions, build_shards

    shutil.rmtree(out, ignore_errors=True)
    options = dict(src=src, out=out, size=size, format=fmt, compression=compression, split="train=0.8,val=0.2",
                   workers=workers)
    if not warm:
        started = time.perf_counter()
        summary = build_shards(BuildOptions(**options))
        return time.perf_counter() - started, summary.content
    import logging

    from distributed import Client, LocalCluster

    single = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR, env=single) as cluster, Client(cluster) as client:
        client.run(_warm)
        options["scheduler"] = cluster.scheduler_address
        before = sum(client.run(cpu_seconds).values()) + cpu_seconds()
        started = time.perf_counter()
        summary = build_shards(BuildOptions(**options))
        seconds = time.perf_counter() - started
        CPU[f"dask {workers} worker{'s' if workers > 1 else ''} (warm)"] = \
            sum(client.run(cpu_seconds).values()) + cpu_seconds() - before
        return seconds, summary.content


def bytes_per_slice(content: dict) -> float:
    return sum(s["bytes"] for s in content["shards"]) / sum(s["slices"] for s in content["shards"])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1)
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def load() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("/tmp/etl-bench"))
    parser.add_argument("--repeats", type=int, default=1, help="repeat the timed runs, keep the best")
    parser.add_argument("--write", action="store_true", help="update the ETL section of bench/BENCHMARKS.md")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = make_source(work, args.patients)
    n = args.patients
    print(f"{n} patients 240x240x155, size {args.size}; {machine()}; {load()}")

    times: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, run in (
            ("plain loop", lambda: plain_loop(src, work / "plain", args.size)),
            ("dask 1 worker (warm)", lambda: dask_build(src, work / "w1", args.size, 1, warm=True)[0]),
            ("dask 2 workers (warm)", lambda: dask_build(src, work / "w2", args.size, 2, warm=True)[0]),
            ("dask 1 worker (cold)", lambda: dask_build(src, work / "c1", args.size, 1, warm=False)[0]),
            ("dask 2 workers (cold)", lambda: dask_build(src, work / "c2", args.size, 2, warm=False)[0]),
        ):
            previous_cpu = dict(CPU)
            seconds = run()
            if seconds >= times.get(name, float("inf")) and name in previous_cpu:
                CPU[name] = previous_cpu[name]  # keep the CPU figure of the best (kept) run
            times[name] = min(times.get(name, float("inf")), seconds)
            cpu = f"{CPU[name] / n:5.2f} CPU s/patient, {CPU[name] / seconds:4.2f} cores" if name in CPU else " " * 31
            print(f"  {name:24s} {seconds:7.1f} s  {n / seconds:5.2f} patients/s  {cpu}  ({load()})", flush=True)

    _, gz = dask_build(src, work / "gz", args.size, 2, warm=False, compression="gz")
    _, zarr_content = dask_build(src, work / "zarr", args.size, 2, warm=False, fmt="zarr")
    plain_content = json.loads((work / "c2" / "manifest.json").read_text())["content"]
    identical = all((work / "w1" / s["path"]).read_bytes() == (work / "w2" / s["path"]).read_bytes()
                    for s in plain_content["shards"])
    raw = 4 * args.size * args.size * 2 + args.size * args.size
    sizes = {
        "raw float16 image + uint8 mask": raw,
        "webdataset, none": bytes_per_slice(plain_content),
        "webdataset, gz": bytes_per_slice(gz),
        "zarr (zstd 3)": bytes_per_slice(zarr_content),
    }
    plain_files = sum(p.stat().st_size for p in (work / "plain").rglob("*.npy"))
    sizes["plain loop np.save per slice"] = plain_files / sum(s["slices"] for s in plain_content["shards"])

    rate = {k: n / v for k, v in times.items()}
    startup = times["dask 2 workers (cold)"] - times["dask 2 workers (warm)"]
    ratios = {
        "2 workers / 1 worker (warm), target >= 1.7": rate["dask 2 workers (warm)"] / rate["dask 1 worker (warm)"],
        "2 workers / 1 worker (cold)": rate["dask 2 workers (cold)"] / rate["dask 1 worker (cold)"],
        "1 worker (warm) time / plain loop time, target <= 1.25": times["dask 1 worker (warm)"] / times["plain loop"],
        "1 worker (cold) time / plain loop time": times["dask 1 worker (cold)"] / times["plain loop"],
    }
    projected = startup + BRATS_2020_TRAINING / rate["dask 2 workers (warm)"]
    # What two free cores would give: CPU seconds per patient are little affected by other load.
    cpu_2 = CPU["dask 2 workers (warm)"] / n
    ratios["CPU s/patient, 2 workers / 1 worker (warm): parallel overhead"] = cpu_2 / (CPU["dask 1 worker (warm)"] / n)
    projected_cpu = startup + BRATS_2020_TRAINING * cpu_2 / 2
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k:56s} {v:5.2f}")
    print(f"  projected {BRATS_2020_TRAINING} patients, 2 workers: {projected / 60:.1f} min "
          f"(start-up {startup:.1f} s + {BRATS_2020_TRAINING} / {rate['dask 2 workers (warm)']:.2f} per s), target <= 5 min")
    print(f"  projected {BRATS_2020_TRAINING} patients on 2 free cores (CPU-bound): {projected_cpu / 60:.1f} min "
          f"({cpu_2:.2f} CPU s/patient)")
    print("bytes per slice:")
    for k, v in sizes.items():
        print(f"  {k:34s} {v / 1024:7.1f} KiB  ({v / raw:4.2f} x raw)")
    print(f"1 and 2 worker shards byte-identical: {identical}")

    if args.write:
        write_markdown(args, n, times, rate, ratios, projected, projected_cpu, startup, sizes, raw, identical)


def write_markdown(args, n, times, rate, ratios, projected, projected_cpu, startup, sizes, raw, identical) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lines = [
        MARK_START,
        "## ETL: `etl build-shards` throughput and shard size",
        "",
        f"Command: `python bench/etl.py --patients {n} --work {args.work} --repeats {args.repeats} --write` "
        f"(best of {args.repeats}; commit {commit}, {time.strftime('%Y-%m-%d', time.gmtime())}).",
        f"Machine: {machine()}; {load()} at the end of the run (other work shares these cores).",
        f"Data: {n} synthetic BraTS 2020 patients (`etl.synth`), 240x240x155, uncompressed `.nii`, 4 modalities + seg;"
        f" output size {args.size}, norm slice, WebDataset unless said.",
        "",
        "| run | seconds | patients/s | CPU s/patient (all processes) | cores obtained (CPU s / s) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {k} | {v:.1f} | {rate[k]:.2f} | {CPU[k] / n:.2f} | {CPU[k] / v:.2f} |" if k in CPU else
              f"| {k} | {v:.1f} | {rate[k]:.2f} | | |" for k, v in times.items()]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    lines += [f"| projected {BRATS_2020_TRAINING} patients with 2 workers (start-up {startup:.1f} s + "
              f"{BRATS_2020_TRAINING} / warm rate), target <= 5 min | {projected / 60:.1f} min |",
              f"| projected {BRATS_2020_TRAINING} patients on 2 free cores (start-up + {BRATS_2020_TRAINING} x CPU s/patient"
              f" / 2) | {projected_cpu / 60:.1f} min |"]
    lines += ["", "| bytes per slice | KiB | x raw |", "|---|---:|---:|"]
    lines += [f"| {k} | {v / 1024:.1f} | {v / raw:.2f} |" for k, v in sizes.items()]
    lines += ["", f"1-worker and 2-worker shards byte-identical: {identical}.", "",
              "Warm: a LocalCluster started beforehand, its workers having imported torch (the graph's own throughput); "
              "cold: `build_shards` starts and stops its own cluster, as the command does. The plain loop and "
              "`build-shards` run the same `preprocess_volume` (8-slice slabs inside); the loop also saves one .npy "
              "per slice. On this shared 2-core machine the wall-clock "
              "2-worker ratio is bounded by what the second core has free (see the load average); the CPU-seconds "
              "figures are the stable ones.", MARK_END]
    path = REPO / "bench" / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = "\n".join(lines)
    if MARK_START in text and MARK_END in text:
        text = text[: text.index(MARK_START)] + block + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
