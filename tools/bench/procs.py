"""Processes the bench measures: CPU seconds and resident memory (psutil), and the worker
subprocess it drives.

CPU is user + system time of every thread of a process. PostgreSQL is a postmaster with one
backend per connection plus helpers: its CPU is the sum over the live processes of the tree
plus what the postmaster has collected from children that exited (`children_user`/`system`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import psutil

from tools.bench.worker_proc import WorkerConfig

# The checkout this module runs from (tools/bench/procs.py -> the repository root).
REPO_ROOT = Path(__file__).resolve().parents[2]


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


class WorkerProcess:
    """`python -m tools.bench.worker_proc` for one side: start, ask for counters, stop."""

    def __init__(
        self, config: WorkerConfig, log_path: Path, *, pycache: Path | None = None
    ) -> None:
        """`pycache`: where the worker may keep compiled bytecode (PYTHONPYCACHEPREFIX), as an
        installed package has it. None: the environment decides (here PYTHONDONTWRITEBYTECODE=1
        with an editable install means no bytecode at all, and the workflow sandbox compiles
        the workflow module's source again for every workflow it loads)."""
        self.config = config
        self.log_path = log_path
        self.pycache = pycache
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self, timeout: float = 60) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tools.bench.worker_proc",
                self.config.model_dump_json(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=self._env(),
            )
        try:
            ready = await asyncio.wait_for(self._read(), timeout)
        except (TimeoutError, RuntimeError) as err:
            await self.stop()
            raise RuntimeError(
                f"the {self.config.side} worker did not start: {err}; log: {self.log_path}\n"
                + self._log_tail()
            ) from err
        if not ready.get("ready"):
            raise RuntimeError(f"the {self.config.side} worker said {ready}")

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # tools/ is not installed: the worker imports it from this checkout.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        if self.pycache is not None:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(self.pycache)
        return env

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the worker process exited")
        message: dict[str, Any] = json.loads(line)
        return message

    async def _ask(self, command: str) -> dict[str, Any]:
        async with self._lock:
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(command.encode() + b"\n")
            await self._proc.stdin.drain()
            return await asyncio.wait_for(self._read(), 30)

    async def sql(self) -> dict[str, int]:
        answer = await self._ask("stats")
        return {k: int(v) for k, v in answer["sql"].items()}

    async def reset(self) -> None:
        await self._ask("reset")

    async def stop(self, timeout: float = 30) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.write(b"stop\n")
                await proc.stdin.drain()
                proc.stdin.close()
            await asyncio.wait_for(proc.wait(), timeout)
        except (TimeoutError, ConnectionError):
            proc.kill()
            await proc.wait()


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
