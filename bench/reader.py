"""Reader benchmark: slices/s into batch tensors and peak RSS, shards against the per-slice .h5 loader.

    python bench/reader.py                           # 4 full-size patients in a temp dir, then removed
    python bench/reader.py --patients 2 --shape 96,96,155 --repeats 1   # a quick try
    python bench/reader.py --workdir /tmp/rb --keep --write             # keep the data, update BENCHMARKS.md
    python bench/reader.py --peers --write           # ours against MDS, LitData, a memmap (bench/reader_peers.py)

What it does, in one run on the same slices:

1. `etl synth --layout kaggle-h5` writes N patients as `volume_V_slice_S.h5` files (the Kaggle 2D
   export, one file per axial slice), then `etl build-shards` turns them into WebDataset and Zarr
   shards (`--size 128`, one split so every patient is read).
2. The (volume, slice) pairs the shards hold are read from the records' `slice_index`; the
   baseline iterates exactly those pairs. A few baseline samples are compared with the shards'
   (same slice, same preprocessing code, so they differ only by the shards' float16 rounding).
3. The page cache is warmed (every file read once), so the loops measure decoding, not the disk.
4. Each loader runs in its own subprocess (a clean peak RSS: the child's VmHWM), one process,
   `DataLoader(batch_size=32, num_workers=0)`, `--passes` passes over the data per child, children
   interleaved h5 / webdataset / zarr `--repeats` times so a change in the machine's load hits all
   three alike. Reported: the median pass's slices/s, the ratio to the baseline's median, and the
   ratios paired within each repeat.

The baseline is what the original notebook did per sample: open one .h5, read `image` and `mask`,
z-score each modality over the slice's non-zero voxels, resize to 128 (the same
`shards_spec.preprocess` functions the ETL uses: `brain_mask`, `normalise`, `resize_images`,
`resize_labels`), re-apply the resized brain mask, and expand the label map to three channels.
The shard loaders are `train.data.ShardDataset` as `train run` uses it (shuffle on, buffer 2000);
the baseline's DataLoader shuffles too. Torch runs one intra-op thread in every child
(`--threads`): on a 2-core machine shared with other work, a second OpenMP thread makes ops like
the collate's `torch.stack` wait for a descheduled thread (measured: 0.5 ms -> ~360 ms).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# `python bench/reader.py` puts bench/ first on sys.path, where bench/etl.py would shadow the etl package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(BENCH.parent))

from bench import _common as common  # noqa: E402

KINDS = ("h5", "webdataset", "zarr")
TIMES: dict[str, float] = {"read": 0.0, "per-slice work": 0.0, "decode": 0.0, "collate": 0.0}
"""Seconds spent in each stage, filled by the children's instrumentation (wrappers, no package change):
h5 "read" = open + read one file, "per-slice work" = normalise, resize, labels, tensors; shards "decode" =
`ShardDataset._decode` (read, sha256, untar, .npy/zarr decode, checks of one whole shard), "per-slice work" =
`ShardDataset._tensors` (float16 -> float32, label map -> 3 channels); "collate" = the DataLoader's
`default_collate` (torch.stack of 32 samples); the rest of a pass is the loop (generators, shuffle buffer,
sampler)."""
LABEL = {"h5": "per-slice .h5 (baseline)", "webdataset": "ShardDataset, WebDataset", "zarr": "ShardDataset, Zarr"}


# -- the baseline loader ---------------------------------------------------------------------------


def h5_dataset(folder: str, pairs: list[list[int]], size: int, stored_order: list[str], channels: list[str]):
    """A map-style torch Dataset: one `volume_V_slice_S.h5` opened and preprocessed per item."""
    import h5py
    import numpy as np
    import torch

    from shards_spec import preprocess
    from shards_spec.labels import encode_onehot, expand

    index = [stored_order.index(c) for c in channels]

    class H5Slices(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(pairs)

        def __getitem__(self, i: int):
            volume_no, s = pairs[i]
            start = time.perf_counter()
            with h5py.File(f"{folder}/volume_{volume_no}_slice_{s}.h5", "r") as handle:
                image, mask = handle["image"][()], handle["mask"][()]  # (H, W, 4) float, (H, W, 3) one-hot
            read = time.perf_counter()
            TIMES["read"] += read - start
            volume = image.transpose(2, 0, 1)[index, :, :, None]  # (C, H, W, 1) in the shards' channel order
            brain = preprocess.brain_mask(volume)  # (H, W, 1): any channel non-zero
            normalised = preprocess.normalise(volume, brain, "slice")  # z-score over the slice's brain voxels
            resized = preprocess.resize_images(normalised[None, ..., 0], size)[0]  # (C, size, size)
            brain_small = preprocess.resize_labels(brain[None, :, :, 0], size)[0].astype(bool)
            resized = np.where(brain_small, resized, 0.0).astype(np.float32)
            labels = preprocess.resize_labels(encode_onehot(mask)[None], size)[0]
            labels = np.where(brain_small, labels, 0)
            out = torch.from_numpy(resized), torch.from_numpy(expand(labels, "classes").astype(np.float32))
            TIMES["per-slice work"] += time.perf_counter() - read
            return out

    return H5Slices()


# -- one child: one loader, timed ------------------------------------------------------------------


def timed(function, stage: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES[stage] += time.perf_counter() - start

    return wrapper


def child(kind: str, config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    import torch

    torch.set_num_threads(config["threads"])
    import h5py  # noqa: F401  (imported up front in every child, so import cost is never timed)
    import zarr  # noqa: F401
    from torch.utils.data import default_collate

    from train.data import ShardDataset

    rss_ready = common.self_memory().get("VmRSS", 0)
    batch = config["batch_size"]
    passes = []
    first_batch = []
    for p in range(config["passes"]):
        TIMES.update(dict.fromkeys(TIMES, 0.0))
        start = time.perf_counter()
        if kind == "h5":
            dataset = h5_dataset(config["h5_folder"], config["pairs"], config["size"], config["stored_order"],
                                 config["channels"])
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0,
                                                 generator=torch.Generator().manual_seed(p),
                                                 collate_fn=timed(default_collate, "collate"))
        else:
            dataset = ShardDataset(config["shards"][kind], split=config["splits"], shuffle=True, seed=0, batch_size=batch)
            dataset.set_epoch(p)
            dataset._decode = timed(dataset._decode, "decode")  # instance attributes: the class is untouched
            dataset._tensors = timed(dataset._tensors, "per-slice work")
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=0,
                                                 collate_fn=timed(default_collate, "collate"))
        slices = 0
        first = None
        for image, mask in loader:
            if first is None:
                first = time.perf_counter() - start
            if image.dtype != torch.float32 or mask.shape[1] != 3:  # a wrong loader is not a benchmark
                raise SystemExit(f"{kind}: unexpected batch {image.dtype} {tuple(mask.shape)}")
            slices += image.shape[0]
        seconds = time.perf_counter() - start
        passes.append({"slices": slices, "seconds": seconds, "rate": slices / seconds, "stages": dict(TIMES)})
        first_batch.append(first)
        del loader, dataset
    memory = common.self_memory()
    print(json.dumps({"kind": kind, "passes": passes, "first_batch_s": first_batch, "rss_ready": rss_ready,
                      "peak_rss": memory.get("VmHWM", 0), "threads": torch.get_num_threads()}))


# -- the data --------------------------------------------------------------------------------------


def prepare(workdir: Path, args) -> dict:
    src, shards = workdir / "kaggle", {k: workdir / f"shards-{k}" for k in ("webdataset", "zarr")}
    env = common.single_thread_env()
    steps = {}
    if not (src / "done").exists():
        shutil.rmtree(src, ignore_errors=True)
        steps["synth"], _ = common.run_tool(common.cli("etl") + ["synth", "--out", str(src), "--patients", str(args.patients),
                                                                 "--layout", "kaggle-h5", "--shape", args.shape, "--seed", "0"],
                                            "etl synth", env)
        (src / "done").write_text("")
    for fmt, out in shards.items():
        if not (out / "manifest.json").exists():
            steps[f"build {fmt}"], _ = common.run_tool(
                common.cli("etl") + ["build-shards", "--src", str(src), "--out", str(out), "--format", fmt,
                                     "--size", str(args.size), "--split", "train=1", "--overwrite"],
                f"etl build-shards --format {fmt}", env)
    h5_files = sorted(src.rglob("volume_*_slice_*.h5"))
    if not h5_files:
        sys.exit(f"no volume_V_slice_S.h5 files under {src}")
    return {"src": src, "h5_folder": h5_files[0].parent, "h5_files": len(h5_files), "shards": shards, "steps": steps}


def shard_pairs(root: Path) -> tuple[list[list[int]], dict]:
    """(volume, slice) pairs held by a shard folder, from the records, and its manifest content."""
    from shards_spec.read import ShardStore

    store = ShardStore(root)
    content = store.manifest.content
    pairs = []
    for shard in content["shards"]:
        for record in store.records(shard):
            volume_no = int(content["patients"][record.patient]["meta"]["volume"])
            pairs += [[volume_no, int(s)] for s in record.slice_index]
    return pairs, content


def check_same_work(config: dict, samples: int = 6) -> dict:
    """Baseline samples against the shards' for the same slices: (max |difference|, masks equal)."""
    import numpy as np

    from shards_spec.read import ShardStore

    store = ShardStore(config["shards"]["webdataset"])
    record = next(store.records(store.manifest.content["shards"][0]))
    volume_no = int(store.manifest.content["patients"][record.patient]["meta"]["volume"])
    picks = np.linspace(0, record.slices - 1, samples).astype(int)
    pairs = [[volume_no, record.slice_index[j]] for j in picks]
    dataset = h5_dataset(config["h5_folder"], pairs, config["size"], config["stored_order"], config["channels"])
    worst, masks_equal = 0.0, True
    for k, j in enumerate(picks):
        image, mask = dataset[k]
        worst = max(worst, float(np.abs(image.numpy() - record.image[j].astype(np.float32)).max()))
        masks_equal &= bool(np.array_equal(mask.numpy().astype(bool), np.stack([record.mask[j] == c for c in (1, 2, 3)])))
    return {"slices_compared": samples, "max_abs_diff": worst, "masks_equal": masks_equal}


# -- the run ---------------------------------------------------------------------------------------


def run(args) -> None:
    info = common.machine()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="reader-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = prepare(workdir, args)
        pairs, content = shard_pairs(data["shards"]["webdataset"])
        zarr_pairs, _ = shard_pairs(data["shards"]["zarr"])
        if sorted(map(tuple, pairs)) != sorted(map(tuple, zarr_pairs)):
            sys.exit("the WebDataset and Zarr shards hold different slices; cannot compare")
        config = {
            "h5_folder": str(data["h5_folder"]), "pairs": pairs, "size": args.size, "batch_size": args.batch_size,
            "stored_order": content["source"]["kaggle_channel_order"], "channels": content["channels"],
            "shards": {k: str(v) for k, v in data["shards"].items()}, "splits": sorted(content["splits"]),
            "passes": args.passes, "threads": args.threads,
        }
        config_path = workdir / "reader-config.json"
        config_path.write_text(json.dumps(config))
        same = check_same_work(config)
        warmed = common.warm_page_cache([data["src"], *data["shards"].values()])
        sizes = {"h5": common.folder_bytes(data["src"], "*.h5"),
                 **{k: common.folder_bytes(v) for k, v in data["shards"].items()}}
        print(f"{len(pairs)} slices of {args.patients} patients ({data['h5_files']} .h5 files); "
              f"page cache warmed ({warmed / 2**30:.2f} GiB read); load {common.load()}", flush=True)

        results: dict[str, list[dict]] = {k: [] for k in KINDS}
        loads = []
        for r in range(args.repeats):
            for kind in KINDS:
                argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--config", str(config_path)]
                done = subprocess.run(argv, capture_output=True, text=True, env=common.single_thread_env(), cwd=common.REPO)
                if done.returncode != 0:
                    sys.exit(f"{kind} child failed:\n{done.stderr[-3000:]}")
                out = json.loads(done.stdout.strip().splitlines()[-1])
                if any(p["slices"] != len(pairs) for p in out["passes"]):
                    sys.exit(f"{kind} read {[p['slices'] for p in out['passes']]} slices, expected {len(pairs)}")
                results[kind].append(out)
                loads.append(common.load())
                rates = ", ".join(f"{p['rate']:.0f}" for p in out["passes"])
                print(f"  repeat {r + 1} {kind:10s} slices/s per pass: {rates}; peak RSS {common.mib(out['peak_rss'])}; "
                      f"load {loads[-1]}", flush=True)
        info["load_at_end"] = common.load()
        info["shared"] = args.shared
        report(args, info, data, pairs, config, same, sizes, results, loads)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for name in ("kaggle", "shards-webdataset", "shards-zarr", "reader-config.json"):
                target = workdir / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def summarise(results: dict) -> dict:
    out = {}
    for kind, runs in results.items():
        rates = [p["rate"] for r in runs for p in r["passes"]]
        per_repeat = [statistics.median(p["rate"] for p in r["passes"]) for r in runs]
        out[kind] = {
            "median": statistics.median(rates), "min": min(rates), "max": max(rates), "per_repeat": per_repeat,
            "peak_rss": max(r["peak_rss"] for r in runs), "rss_ready": statistics.median(r["rss_ready"] for r in runs),
            "first_batch": statistics.median(r["first_batch_s"][0] for r in runs),
        }
    base = out["h5"]
    for kind in KINDS:
        out[kind]["ratio"] = out[kind]["median"] / base["median"]
        out[kind]["paired"] = [a / b for a, b in zip(out[kind]["per_repeat"], base["per_repeat"])]
    return out


def report(args, info, data, pairs, config, same, sizes, results, loads) -> None:
    s = summarise(results)
    target = 20.0
    rows = []
    for kind in KINDS:
        k = s[kind]
        rows.append([
            LABEL[kind], f"{k['median']:,.0f}", f"{k['min']:,.0f} – {k['max']:,.0f}",
            "1.0 (baseline)" if kind == "h5" else f"{k['ratio']:.1f}x",
            "" if kind == "h5" else ", ".join(f"{x:.1f}" for x in k["paired"]),
            common.mib(k["peak_rss"]), common.mib(k["rss_ready"]), f"{k['first_batch']:.2f}",
        ])
    header = ["loader", "slices/s (median pass)", "range", "vs baseline", "paired ratio per repeat",
              "peak RSS", "RSS before loop", "first batch (s)"]
    figures = common.table(header, rows)
    stage_rows, per_slice = [], {}
    for kind in KINDS:
        all_passes = [p for r in results[kind] for p in r["passes"]]
        slices = sum(p["slices"] for p in all_passes)
        total = sum(p["seconds"] for p in all_passes) / slices * 1e6
        stages = {name: sum(p["stages"][name] for p in all_passes) / slices * 1e6 for name in TIMES}
        rest = total - sum(stages.values())
        per_slice[kind] = {"total": total, **stages}
        stage_rows.append([LABEL[kind], f"{total:,.0f}"] + [f"{stages[n]:,.0f}" if stages[n] else "–" for n in TIMES]
                          + [f"{rest:,.0f}"])
    breakdown = common.table(["loader", "µs per slice, all passes", *TIMES, "rest (loop, buffer, sampler)"], stage_rows)
    print()
    print(figures)
    print()
    print(breakdown)
    met = {kind: s[kind]["ratio"] >= target for kind in ("webdataset", "zarr")}
    verdict = "; ".join(f"{kind}: {s[kind]['ratio']:.1f}x — target ≥ {target:.0f}x {'met' if ok else 'NOT met'}"
                        for kind, ok in met.items())
    budget = per_slice["h5"]["total"] / target
    if not all(met.values()):
        verdict += (f". Measured cause: {target:.0f}x this baseline ({per_slice['h5']['total']:,.0f} µs per slice) "
                    f"allows {budget:,.0f} µs per slice; " + "; ".join(
                        f"{kind} spends {per_slice[kind]['total']:,.0f} (decode {per_slice[kind]['decode']:,.0f}, "
                        f"per-slice work {per_slice[kind]['per-slice work']:,.0f}, collate {per_slice[kind]['collate']:,.0f})"
                        for kind, ok in met.items() if not ok))
    print(f"\n{verdict}")
    print(f"same work check: {same}")
    if not args.write:
        return
    command = f"python bench/reader.py --patients {args.patients}" + (
        f" --shape {args.shape}" if args.shape != "240,240,155" else "") + (
        f" --repeats {args.repeats}" if args.repeats != 3 else "") + (
        f" --passes {args.passes}" if args.passes != 3 else "") + " --write"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO, capture_output=True, text=True).stdout.strip()
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in data["steps"].items()) or "reused"
    body = "\n".join([
        "## reader: slices/s into batches and peak RSS — shards vs the per-slice .h5 loader",
        "",
        f"Command: `{command}` (commit {commit}, {time.strftime('%Y-%m-%d', time.gmtime())}).",
        "",
        *common.machine_lines(info),
        f"- load average after each child, in order: {'; '.join(loads)}",
        f"- data: {args.patients} synthetic patients, `etl synth --layout kaggle-h5 --shape {args.shape}` "
        f"({data['h5_files']} .h5 files, {sizes['h5'] / 2**30:.2f} GiB); `etl build-shards --size {args.size} "
        f"--split train=1` in both formats (WebDataset {sizes['webdataset'] / 2**20:.0f} MiB, Zarr "
        f"{sizes['zarr'] / 2**20:.0f} MiB); {len(pairs)} slices with brain, the (volume, slice) pairs read from the "
        f"records' `slice_index`; preparation: {steps}",
        f"- every loader: one process, `DataLoader(batch_size={args.batch_size}, num_workers=0)`, float32 image "
        f"(4, {args.size}, {args.size}) + mask (3, {args.size}, {args.size}) per slice, shuffled; torch intra-op "
        f"threads {args.threads}; page cache warm; each child makes {args.passes} passes (the median pass counts), "
        f"children interleaved h5 / webdataset / zarr, {args.repeats} repeats; peak RSS = the child's VmHWM "
        "(largest over repeats)",
        f"- same work: baseline and shard samples of {same['slices_compared']} slices differ by at most "
        f"{same['max_abs_diff']:.2g} (the shards' float16 rounding); masks equal: {same['masks_equal']}",
        "",
        figures,
        "",
        f"Target ≥ {target:.0f}x the baseline in one process: {verdict}.",
        "",
        "Where the time goes (instrumented in the children by wrapping, not changing, the package's functions; "
        "means over every pass): *read* = open and read one .h5; *decode* = `ShardDataset._decode`, one whole "
        "shard read, sha256-checked, untarred or unzarred, checked; *per-slice work* = the baseline's normalise + "
        "resize + labels, the shards' `ShardDataset._tensors` (float16 -> float32, label map -> 3 channels); "
        "*collate* = `default_collate`.",
        "",
        breakdown,
        "",
        "The shard loaders pay per patient (one file read, sha256-checked, decoded whole, then sliced); the "
        "baseline pays per slice an HDF5 open, a 240x240x4 float64 read, the z-score and the antialiased resize, "
        "which the shards did once at build time. Their peak RSS is higher because ShardDataset holds the shuffle "
        "buffer (up to 2000 slices; here every slice fits) and one decoded patient; the baseline holds one batch.",
    ])
    common.write_section("reader", body)
    print(f"wrote the reader section of {common.BENCHMARKS_MD}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", action="store_true",
                        help="ours against MDS, LitData and a memmap floor (bench/reader_peers.py; the 'bench' extra)")
    parser.add_argument("--patients", type=int, help="synthetic patients (default 4 = 620 .h5 files; 16 with --peers)")
    parser.add_argument("--workdir", help="keep data here (reused by a later run); default a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic data and shards")
    parser.add_argument("--shared", action="store_true", help="say in the table that other work shared the machine")
    parser.add_argument("--write", action="store_true", help="replace the reader section of bench/BENCHMARKS.md")
    parser.add_argument("--shape", default="240,240,155", help="synthetic volume shape H,W,D (default BraTS's)")
    parser.add_argument("--size", type=int, default=128, help="shard slice size (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="(the h5 comparison; --peers uses 16)")
    parser.add_argument("--repeats", type=int, default=3, help="children per loader, interleaved (default 3)")
    parser.add_argument("--passes", type=int, default=3, help="passes over the data inside each child (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each child (default 1)")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--peer-child", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.config)
    elif args.peer_child:
        from bench import reader_peers

        reader_peers.child(args.peer_child, args.workers, args.config)
    elif args.peers:
        from bench import reader_peers

        args.patients = args.patients or 16
        reader_peers.run(args)
    else:
        args.patients = args.patients or 4
        run(args)


if __name__ == "__main__":
    main()
