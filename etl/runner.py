"""Running shard tasks: in this process, on a Dask `LocalCluster`, or on an existing scheduler.

The runner knows nothing of shards: it maps a task function (`etl.task.build_shard` by default;
`etl export-nnunet` maps its per-case export) over tasks and yields results as they finish. Which cluster is used: `--scheduler ADDRESS` (or `DASK_SCHEDULER_ADDRESS`) for an
existing one, else a `LocalCluster` of single-threaded worker processes, or none at all with
`--workers 0`.

Ctrl-C in a terminal sends SIGINT to the whole process group, so the `LocalCluster`'s worker
processes get it too; each printed a `KeyboardInterrupt` traceback before the build's one line.
They ignore it (`dask_setup`, run in every worker as a preload): the main process stops the build
and closes the cluster, which ends them. A worker still inside a task when the scheduler closes
logged the lost heartbeat as an error with its traceback; a worker's own log says nothing a user
needs (a task's problem comes back as its result, a bug as the future's exception), so the
workers log only critical messages.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

from .task import ShardTask, build_shard


def dask_setup(worker: object) -> None:
    """Run by each `LocalCluster` worker process at its start (Dask's preload hook): leave Ctrl-C
    to the main process, and keep the shutdown that follows it quiet (see the module docstring)."""
    import logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


class Runner:
    """Runs shard tasks and yields their results as they finish.

    `workers=0` (and no scheduler) runs in this process, one task after another; otherwise a
    `LocalCluster` of `workers` single-threaded processes, or the cluster at `--scheduler` /
    `DASK_SCHEDULER_ADDRESS`. `stop()` makes tasks that have not started return at once (a stop
    file in the out folder, which every worker can see since it writes there) and waits for the
    running ones, so nothing is written after it returns.
    """

    def __init__(self, workers: int | None, scheduler: str | None, log: Callable[[str], None],
                 stop_file: Path | None = None) -> None:
        self.address = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.log = log
        self.client = self.cluster = None
        self.stop_file = stop_file
        self.futures: list = []
        self.in_process = self.address is None and self.workers == 0

    def __enter__(self) -> "Runner":
        if self.in_process:
            return self
        import logging

        from distributed import Client, LocalCluster

        if self.address:
            self.client = Client(self.address)
            self.log(f"Dask scheduler {self.address}")
        else:
            single = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            self.cluster = LocalCluster(
                n_workers=self.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                silence_logs=logging.ERROR, env=single, preload=[__name__],
            )
            self.client = Client(self.cluster)
            self.log(f"Dask LocalCluster: {self.workers} worker process(es), 1 thread each")
        services = self.client.scheduler_info().get("services", {})
        if "dashboard" in services:
            self.log(f"Dask dashboard: {self.client.dashboard_link}")
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.cancel(self.futures)
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def describe(self) -> dict:
        """How the tasks run, for the provenance: scheduler kind and worker count."""
        if self.in_process:
            return {"scheduler": "in-process", "workers": 0}
        if self.address:
            workers = len(self.client.scheduler_info().get("workers", {}))
            return {"scheduler": "external", "workers": workers}
        return {"scheduler": "LocalCluster", "workers": self.workers}

    def run(self, tasks: list[ShardTask] | list[Any], fn: Callable[[Any], dict] = build_shard) -> Iterator[dict]:
        """`fn(task)` for every task (a module-level function, so spawned workers can import it)."""
        if self.in_process:
            for task in tasks:
                yield fn(task)
            return
        from distributed import as_completed

        self.futures = self.client.map(fn, tasks, pure=False)
        for future in as_completed(self.futures):
            yield future.result()

    def stop(self) -> None:
        if self.in_process:
            return
        from distributed import wait

        if self.stop_file is not None:
            self.stop_file.touch()
        wait(self.futures)
