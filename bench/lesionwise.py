"""Lesion-wise metrics on speckled predictions: time and peak memory of `lesionwise_scores`.

    python bench/lesionwise.py                          # the default cases, this tree
    python bench/lesionwise.py --before /tmp/before     # and on another checkout (e.g. a `git archive` of HEAD~1)
    python bench/lesionwise.py --before /tmp/before --write   # also update BENCHMARKS.md

A poor model's prediction is speckled: thousands of one-voxel lesions. Each case puts an ET voxel
at every even (x, y, z) of the volume, so every region (WT, TC, ET) has one lesion per 2x2x2 cell
(6,912 on 48x48x24, 16,384 on 64x64x32). The truth is either the same speckle (every lesion
matched: the most per-pair HD95 work) or the speckle moved one voxel along x (no lesion touches
another: pure matching work). Each case runs in a fresh process, one thread; the peak is the
process's peak RSS (VmHWM) minus its RSS before the call, so imports do not count. Each process
gets an address-space limit (`--memory-limit`, 6 GiB) so that code which asks for gigabytes fails
instead of pushing a shared machine into swap.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load, machine, machine_lines, self_memory, single_thread_env, table, write_section  # noqa: E402

CASES = {"48x48x24": (48, 48, 24), "64x64x32": (64, 64, 32)}
TRUTHS = ("same speckle", "speckle moved 1 voxel")
NOTE = ("Before (commit b659979): the package's dense n_true x n_pred matching, a few float64 matrices of that "
        "size, and a torch call per matched pair's HD95. Now: only overlapping pairs are formed (the sparse solve "
        "past `DENSE_MATCH_LIMIT`, 2^20 lesion pairs), and a small pair's HD95 is one numpy distance matrix. In the "
        "'same speckle' rows the time is almost all per-pair HD95 (3 regions x every lesion); matching is well under "
        "a second. At 64x64x32 the before code stops at its first 2 GiB matrix (it holds several at once). "
        "Wall seconds depend on the load of this shared 2-core machine; CPU seconds are the process's own.")


def speckle(shape: tuple[int, ...], shift: int = 0) -> np.ndarray:
    """An ET voxel at every even (x, y, z), moved `shift` voxels along x."""
    labels = np.zeros(shape, np.uint8)
    labels[shift::2, ::2, ::2] = 3
    return labels


def child(repo: str, shape: tuple[int, ...], truth: str) -> None:
    """Run one case in this process and print its figures as JSON."""
    sys.path.insert(0, repo)
    from train.metrics.lesionwise import lesionwise_scores

    pred = speckle(shape)
    target = pred if truth == TRUTHS[0] else speckle(shape, shift=1)
    before = self_memory()["VmRSS"]
    start, cpu = time.perf_counter(), time.process_time()
    scores = lesionwise_scores(pred, target)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = self_memory()["VmHWM"] - before
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak": peak, "lesions": scores["ET"]["fp"] + scores["ET"]["tp"],
                      "tp": scores["ET"]["tp"], "dice": scores["ET"]["dice"]}))


def run_case(code: str, repo: str, name: str, truth: str, timeout: float, limit: int) -> list[str]:
    argv = [sys.executable, __file__, "--child", name, truth, "--repo", repo]
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # noqa: E731
    row = [code, name, truth]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=single_thread_env(), timeout=timeout,
                              preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return row + ["", "", f"> {timeout:.0f} s (stopped)", "", ""]
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row + ["", "", f"failed: {last.split('Error: ')[-1].split(' for an array')[0][:60]}", "", ""]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return row + [f"{out['lesions']:,}", f"{out['tp']:,}", f"{out['seconds']:.2f}", f"{out['cpu']:.2f}",
                  f"{out['peak'] / 2**20:,.0f}"]


def commit(repo: str) -> str:
    done = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(REPO), help="checkout whose train.metrics is measured")
    parser.add_argument("--before", help="a second checkout measured the same way, for comparison")
    parser.add_argument("--memory-limit", type=float, default=6.0, help="GiB of address space per case")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a case is stopped")
    parser.add_argument("--write", action="store_true", help="update this section of BENCHMARKS.md")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.repo, CASES[args.child[0]], args.child[1])
        return
    info = machine()
    checkouts = [("before", args.before)] * bool(args.before) + [("this tree", args.repo)]
    limit = int(args.memory_limit * 2**30)
    rows = [run_case(code, repo, name, truth, args.timeout, limit)
            for code, repo in checkouts for name in CASES for truth in TRUTHS]
    info["load_at_end"] = load()
    header = ["code", "volume", "truth", "lesions per region", "matched", "seconds", "CPU seconds",
              "peak MiB above start"]
    command = " ".join(["python bench/lesionwise.py", *sys.argv[1:]])
    body = "\n".join([
        "## Lesion-wise metrics on a speckled prediction",
        "",
        f"Command: `OMP_NUM_THREADS=1 {command}`; each case a fresh process, one thread, "
        f"{args.memory_limit:g} GiB address-space limit; this tree at commit {commit(args.repo)}"
        + (f", before = `{args.before}`." if args.before else "."),
        *machine_lines(info),
        "",
        table(header, rows),
        "",
        NOTE,
    ])
    print(body)
    if args.write:
        write_section("lesionwise", body)


if __name__ == "__main__":
    main()
