"""Processes the bench measures: CPU seconds and resident memory (psutil), and the worker
subprocesses it drives (tools.worker_process, over their stdin/stdout).

CPU is user + system time of every thread of a process. PostgreSQL is a postmaster with one
backend per connection plus helpers: its CPU is the sum over the live processes of the tree
plus what the postmaster has collected from children that exited (`children_user`/`system`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import psutil

from tools.bench.worker_proc import WorkerConfig
from tools.worker_process import WorkerProcess, checkout_environment, checkout_module_command


class Probe:
    """CPU seconds and RSS of a process (with `tree`, of it and its descendants)."""

    def __init__(self, pid: int | None, *, tree: bool = False) -> None:
        self.pid = pid
        self.tree = tree
        self._proc = psutil.Process(pid) if pid is not None else None

    @property
    def available(self) -> bool:
        return self._proc is not None

    def _procs(self) -> list[psutil.Process]:
        if self._proc is None:
            return []
        procs = [self._proc]
        if self.tree:
            with contextlib.suppress(psutil.Error):
                procs += self._proc.children(recursive=True)
        return procs

    def cpu(self) -> float | None:
        if self._proc is None:
            return None
        total = 0.0
        for proc in self._procs():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
                if self.tree and proc is self._proc:
                    total += t.children_user + t.children_system
        return total

    def threads(self) -> dict[str, float]:
        """CPU seconds of the process's live threads by kind (Linux /proc): `main` (the
        asyncio loop: activities, the SDK's Python side), `rust_core` (the SDK's Rust core,
        threads named tokio-* / temporal-*), `workflow_threads` (the other Python threads:
        workflow activations run there, sandbox included)."""
        found: dict[str, float] = {"main": 0.0, "rust_core": 0.0, "workflow_threads": 0.0}
        if self.pid is None:
            return found
        tick = os.sysconf("SC_CLK_TCK")
        task_dir = Path(f"/proc/{self.pid}/task")
        try:
            tasks = list(task_dir.iterdir())
        except OSError:
            return found
        for task in tasks:
            try:
                comm = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            seconds = (int(fields[11]) + int(fields[12])) / tick
            if task.name == str(self.pid):
                found["main"] += seconds
            elif comm.startswith(("tokio", "temporal")):
                found["rust_core"] += seconds
            else:
                found["workflow_threads"] += seconds
        return found

    def rss(self) -> int | None:
        """Resident bytes (of the top process only: a tree's shared memory would count twice)."""
        if self._proc is None:
            return None
        try:
            return int(self._proc.memory_info().rss)
        except psutil.Error:
            return None


def bench_worker(config: WorkerConfig, log: Path, *, pycache: Path | None = None) -> WorkerProcess:
    """`python -m tools.bench.worker_proc` for one side, from this checkout (`pycache`: see
    `tools.worker_process.checkout_environment`). Start it with `.start()`; `sql_counts` and
    `reset_counts` ask for its statement counters."""
    return WorkerProcess(
        f"the {config.side} worker",
        checkout_module_command("tools.bench.worker_proc", config.model_dump_json()),
        log=log,
        env=checkout_environment(pycache=pycache),
        control=True,
    )


async def sql_counts(worker: WorkerProcess) -> dict[str, int]:
    answer = await worker.ask("stats")
    return {k: int(v) for k, v in answer["sql"].items()}


async def reset_counts(worker: WorkerProcess) -> None:
    await worker.ask("reset")


class Sampler:
    """Samples the RSS of the probes every `interval` seconds and keeps the peaks."""

    def __init__(self, probes: dict[str, Probe], interval: float = 0.5) -> None:
        self.probes = probes
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> dict[str, int | None]:
        now = {name: probe.rss() for name, probe in self.probes.items()}
        for name, value in now.items():
            if value is not None:
                self.peaks[name] = max(self.peaks.get(name, 0), value)
        return now

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sample()
