"""Helpers shared by the benchmark scripts: the machine, the CLIs, process memory, BENCHMARKS.md.

Benchmarks are measurements, not tests: nothing here asserts a time. Memory is read from
/proc (Linux): VmHWM (a process's own peak RSS), VmRSS, and Pss from smaps_rollup, which shares
each page among the processes mapping it, so the Pss of a process tree adds up to the memory the
tree really occupies (forked loader workers share the parent's torch pages; their RSS counts
those pages again in every worker).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BENCHMARKS_MD = BENCH_DIR / "BENCHMARKS.md"
MIB = 2**20


# -- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return float("nan")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine() -> dict:
    import numpy
    import torch

    return {
        "nproc": os.cpu_count(),
        "ram_gib": round(mem_total_gib(), 1),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "load_at_start": load(),
    }


def machine_lines(info: dict) -> list[str]:
    return [
        f"- machine: {info['nproc']} CPU cores ({info['cpu']}), {info['ram_gib']} GiB RAM, no GPU used; "
        f"Python {info['python']}, numpy {info['numpy']}, torch {info['torch']}",
        f"- load average (1/5/15 min) at start: {info['load_at_start']}; at end: {info['load_at_end']}"
        + (" (machine shared with other developers' runs)" if info.get("shared") else ""),
    ]


# -- the command-line tools ------------------------------------------------------------------------


def cli(name: str) -> list[str]:
    """The console script `name` (etl, train) of this environment as an argv prefix."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-c", f"import sys; from {name}.cli import main; sys.exit(main())"]


def run_tool(argv: list[str], what: str, env: dict | None = None) -> tuple[float, str]:
    """Run a command, fail loudly with its output; (seconds, combined output)."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{what} failed (exit {done.returncode}): {' '.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def single_thread_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def warm_page_cache(paths: list[Path]) -> int:
    """Read every file under `paths` once, so later reads measure decoding, not the disk."""
    total = 0
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    total += len(chunk)
    return total


def folder_bytes(root: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in root.rglob(pattern) if p.is_file())


# -- memory ----------------------------------------------------------------------------------------


def _status(pid: int | str) -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes (empty if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def self_memory() -> dict[str, int]:
    """This process's VmRSS and VmHWM (peak RSS) in bytes."""
    return _status("self")


def _children(pid: int) -> list[int]:
    """All descendants of `pid` (from /proc/<pid>/task/*/children, else a /proc scan)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids: list[int] = []
        try:
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    kids += [int(k) for k in handle.read().split()]
        except OSError:
            kids = _children_by_scan(parent)
        out += kids
        todo += kids
    return out


def _children_by_scan(parent: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == parent:
                    kids.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


class TreeSampler:
    """Samples the memory of a process and all its descendants every `interval` seconds.

    Records, over the run: the peak of the tree's summed Pss (the headline: shared pages counted
    once), the peak of its summed RSS (shared pages counted once per process), the sum over
    processes of each one's own peak RSS (VmHWM, last value seen), the most processes seen at
    once, and a coarse timeline (t, Pss sum, processes) for the report.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak_pss = self.peak_rss = 0
        self.peak_pss_at = 0.0
        self.hwm: dict[int, int] = {}
        self.max_procs = 0
        self.samples = 0
        self.timeline: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.perf_counter()

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        pids = [self.pid] + _children(self.pid)
        pss = rss = 0
        alive = 0
        for pid in pids:
            status = _status(pid)
            if not status:
                continue
            alive += 1
            rss += status.get("VmRSS", 0)
            self.hwm[pid] = max(self.hwm.get(pid, 0), status.get("VmHWM", 0))
            pss += _pss(pid)
        if not alive:
            return
        now = time.perf_counter() - self._t0
        self.samples += 1
        self.max_procs = max(self.max_procs, alive)
        if pss > self.peak_pss:
            self.peak_pss, self.peak_pss_at = pss, now
        self.peak_rss = max(self.peak_rss, rss)
        if not self.timeline or now - self.timeline[-1][0] >= 5.0:
            self.timeline.append((round(now, 1), pss, alive))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def result(self) -> dict:
        return {
            "peak_pss": self.peak_pss,
            "peak_pss_at_s": round(self.peak_pss_at, 1),
            "peak_rss_sum": self.peak_rss,
            "sum_hwm": sum(self.hwm.values()),
            "processes": len(self.hwm),
            "max_processes_at_once": self.max_procs,
            "samples": self.samples,
            "timeline": self.timeline,
        }


def run_sampled(argv: list[str], *, env: dict | None = None, interval: float = 0.2,
                timeout: float | None = None) -> tuple[subprocess.CompletedProcess, dict, float]:
    """Run `argv`, sampling its process tree's memory; (completed, memory, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    with TreeSampler(proc.pid, interval) as sampler:
        stdout, stderr = proc.communicate(timeout=timeout)
        sampler.sample()
    wall = time.perf_counter() - start
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr), sampler.result(), wall


# -- BENCHMARKS.md ---------------------------------------------------------------------------------


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Put `body` (starting with its own `## ` heading) between this benchmark's markers,
    replacing an earlier version and leaving every other section as it is."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nMeasurements, not tests: each section says how it was measured, on what machine, "
        "and is rewritten only by its script's `--write`.\n\n"
    )
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (also readable as plain text on a terminal)."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def gflop_per_slice(model, channels: int, size: int) -> float:
    """Forward + backward GFLOP of one `size`² slice of `channels` (torch's FLOP counter); the
    outputs of a deeply supervised model (a tuple in training mode) all count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(torch.randn(1, channels, size, size))
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9
