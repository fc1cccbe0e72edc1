"""`--threads`: intra-op threads that follow what other work leaves of the CPU
(`train.runtime.cpu_share`): the /proc arithmetic on a fake /proc, the governor's decisions under a
fake clock, what each `--threads` value means, a real busy process beside it, and a real run."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

from tests.helpers.train_runs import options
from train import cli, fit
from train.config.options import ConfigError, resolve
from train.runtime import cpu_share
from train.runtime.cpu_share import ThreadGovernor, Usage, free_cores, plan, read_usage, threads_problem

TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- the option


@pytest.mark.parametrize("value", ["auto", "follow", "1", "8", 3])
def test_the_values_threads_takes(value):
    assert threads_problem(value) is None


@pytest.mark.parametrize("value", ["0", "many", "-1", 0, True, 2.5, "", "2000"])
def test_a_bad_threads_value_is_refused_naming_the_option(value):
    with pytest.raises(ConfigError, match=r"^--threads: must be auto, follow or a number of threads"):
        resolve({"shards": "s", "out": "o", "variant": "v2", "threads": value})


def test_train_run_refuses_a_bad_threads_value_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--shards", str(tmp_path), "--variant", "v2", "--out", str(tmp_path / "run"),
                  "--threads", "lots"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.strip().splitlines() == ["error: --threads: must be auto, follow or a number of threads (1..1024), "
                                        "got 'lots'"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, device, budgeted, distributed, environ, expected", [
    ("auto", "cpu", True, False, {}, (None, True)),  # its length follows the machine already
    ("auto", "cpu", False, False, {}, (None, False)),  # an epoch-bounded run repeats bit for bit
    ("auto", "cpu", True, False, {"OMP_NUM_THREADS": "2"}, (None, False)),  # the user pinned it
    ("auto", "cuda", True, False, {}, (None, False)),
    ("auto", "cpu", True, True, {}, (None, False)),  # torchrun ranks share the cores by design
    ("follow", "cpu", False, False, {"OMP_NUM_THREADS": "2"}, (None, True)),
    ("follow", "cuda", False, False, {}, (None, False)),
    ("3", "cpu", True, False, {}, (3, False)),
    (2, "cuda", False, False, {}, (2, False)),
])
def test_what_each_threads_value_means(value, device, budgeted, distributed, environ, expected):
    assert plan(value, device_type=device, budgeted=budgeted, distributed=distributed, environ=environ) == expected


# ---------------------------------------------------------------- reading /proc


def test_free_cores_is_the_cores_less_what_other_processes_used():
    # 5 s apart: 10 CPU-seconds used in all on 2 cores (both full), 5 of them by this run -> others used 1 core
    before, after = Usage(busy=100.0, ours=10.0, cores=2), Usage(busy=110.0, ours=15.0, cores=2)
    assert free_cores(before, after, 5.0) == pytest.approx(1.0)
    # nothing else running: all the busy time is ours
    assert free_cores(before, Usage(busy=106.0, ours=16.0, cores=2), 5.0) == pytest.approx(2.0)
    # more busy than there are cores (a reading's rounding) never goes below 0
    assert free_cores(before, Usage(busy=130.0, ours=10.0, cores=2), 5.0) == 0.0


def write_stat(path, pid: int, parent: int, user: int, system: int, name: str = "python") -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    fields = ["S", str(parent)] + ["0"] * 9 + [str(user), str(system)] + ["0"] * 20
    (path / str(pid)).mkdir()
    (path / str(pid) / "stat").write_text(f"{pid} ({name}) " + " ".join(fields) + "\n")


def test_read_usage_on_a_fake_proc(tmp_path):
    me = os.getpid()
    cpus = sorted(os.sched_getaffinity(0))
    # per allowed cpu: user nice system idle iowait irq softirq steal = 100+0+50+999+999+5+5+40 -> busy 200 ticks
    lines = ["cpu  1 1 1 1 1 1 1 1 0 0"] + [f"cpu{n} 100 0 50 999 999 5 5 40 0 0" for n in cpus]
    lines.append(f"cpu{max(cpus) + 1} 5000 0 0 0 0 0 0 0 0 0")  # a cpu this process may not run on
    (tmp_path / "stat").write_text("\n".join(lines + ["intr 1 2 3", "ctxt 42"]) + "\n")
    write_stat(tmp_path, me, 1, 300, 100)
    write_stat(tmp_path, 4242, me, 50, 50, name="pt_data_worker :) (1")  # a loader worker: ours
    write_stat(tmp_path, 4243, me, 1000, 0)  # a child that was there before the run: other work
    write_stat(tmp_path, 4244, 1, 700, 0)  # someone else's process
    (tmp_path / "self").mkdir()  # not a pid: ignored
    usage = read_usage(str(tmp_path), foreign=frozenset({4243}))
    assert usage == Usage(busy=200 * len(cpus) / TICKS, ours=500 / TICKS, cores=len(cpus))


def test_read_usage_is_none_where_proc_cannot_tell(tmp_path):
    assert read_usage(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------- the governor's decisions


class FakeMachine:
    """Readings of a machine with `cores` cores on which this run uses `ours` and other work `others`
    cores, as a fake clock advances."""

    def __init__(self, cores: int = 2) -> None:
        self.cores, self.now, self.busy, self.mine = cores, 0.0, 0.0, 0.0
        self.ours, self.others, self.reads, self.set_to = 2.0, 0.0, 0, []

    def advance(self, seconds: float) -> None:
        wanted = self.ours + self.others  # more than the cores: the scheduler shares them in proportion
        share = min(1.0, self.cores / wanted) if wanted else 1.0
        self.now += seconds
        self.busy += wanted * share * seconds
        self.mine += self.ours * share * seconds

    def read(self) -> Usage:
        self.reads += 1
        return Usage(busy=self.busy, ours=self.mine, cores=self.cores)

    def governor(self, ceiling: int) -> ThreadGovernor:
        return ThreadGovernor(ceiling, read=self.read, clock=lambda: self.now, set_threads=self.set_to.append,
                              interval=5.0)


def test_the_governor_gives_up_a_core_to_a_busy_process_and_takes_it_back():
    machine = FakeMachine(cores=2)
    governor = machine.governor(ceiling=2)
    machine.advance(6)
    assert governor.poll() is None and machine.set_to == []  # quiet: both cores stay
    machine.others = 1.0  # a busy process starts
    machine.advance(1)
    reads = machine.reads
    assert governor.poll() is None and machine.reads == reads  # within the interval: /proc is not read
    machine.advance(5)
    assert governor.poll() == 1 and machine.set_to == [1]
    machine.ours = 1.0
    for _ in range(3):  # stable while the busy process runs: this run's own share does not count
        machine.advance(5)
        assert governor.poll() is None
    machine.others = 0.0  # it ends
    machine.advance(5)
    assert governor.poll() == 2 and machine.set_to == [1, 2]


def test_the_governor_never_goes_below_one_thread_or_above_its_ceiling():
    machine = FakeMachine(cores=8)
    governor = machine.governor(ceiling=4)
    machine.advance(5)
    assert governor.poll() is None  # 8 free cores, ceiling 4: stays at 4
    machine.ours, machine.others = 4.0, 32.0  # 32 busy processes take nearly all 8 cores
    machine.advance(5)
    assert governor.poll() == 1 and machine.set_to == [1]


def test_the_governor_keeps_its_count_when_proc_cannot_tell():
    now = [0.0]
    governor = ThreadGovernor(2, read=lambda: None, clock=lambda: now[0], set_threads=pytest.fail, interval=5.0)
    now[0] = 60.0
    assert governor.poll() is None and governor.threads == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_real_busy_process_beside_the_run_takes_a_thread():
    """The condition users have: one busy process on the machine. A child that was running before the
    governor started is other work (a harness's load), not a loader worker."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: there is no thread to give up")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        set_to: list[int] = []
        governor = ThreadGovernor(cores, set_threads=set_to.append, interval=1.0)
        time.sleep(1.2)  # this run idles; the busy process takes a whole core
        governor.poll()
    finally:
        busy.kill()
        busy.wait()
    assert set_to and set_to[-1] <= cores - 1  # at most the cores left (fewer if the machine has more load)


# ---------------------------------------------------------------- in a run


def test_a_run_that_follows_the_load_says_so_sets_the_threads_and_gives_them_back(shards, tmp_path, monkeypatch):
    machine = FakeMachine(cores=2)
    machine.others = 1.0
    seen: list[int] = []

    class Governed(ThreadGovernor):
        def __init__(self, ceiling: int) -> None:
            assert ceiling == 2  # the count the run started with
            super().__init__(ceiling, read=machine.read, clock=lambda: machine.now, interval=5.0)

    def tick(epoch, step, stop):
        machine.advance(3.0)
        seen.append(torch.get_num_threads())

    monkeypatch.setattr(cpu_share, "ThreadGovernor", Governed)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        console = Console(record=True, width=300)
        hooks = fit.Hooks(after_step=tick, console=console)
        result = fit.run(options(shards, tmp_path / "run", threads="follow", epochs=2), hooks=hooks)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    text = console.export_text()
    assert result.exit_code == 0
    assert "2 intra-op thread(s) following the load (--threads)" in text
    assert "CPU shared: 1 intra-op thread(s) now" in text
    assert seen[0] == 2 and seen[-1] == 1  # set from the second poll on (5 fake seconds)
    assert after == 2  # the caller's count back


def test_a_pinned_thread_count_holds_during_the_run_and_is_given_back(shards, tmp_path):
    seen: list[int] = []
    before = torch.get_num_threads()
    hooks = fit.Hooks(after_step=lambda e, s, stop: seen.append(torch.get_num_threads()),
                      console=Console(quiet=True))
    result = fit.run(options(shards, tmp_path / "run", threads="2", epochs=1), hooks=hooks)
    assert result.exit_code == 0
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == before
