"""The servers and processes a chaos run abuses: an embedded PostgreSQL and a Temporal dev server
that keep their data across restarts, and `ordercancel worker` subprocesses configured through
the environment exactly as in production (DATABASE_URL, TEMPORAL_ADDRESS, ORDERCANCEL_*).

Everything listens on 127.0.0.1 or a Unix socket, on free ports, and is stopped by `close()`.
Workers are started with a parent-death signal, so they go even if this process is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.embedded import EmbeddedPostgres, TemporalDevServer, die_with_parent, free_port
from workflows.search_attributes import CLI_TYPES

HOST = socket.gethostname()


def ordercancel_command() -> list[str]:
    """The installed `ordercancel` script beside this interpreter, else the module itself."""
    script = Path(sys.executable).parent / "ordercancel"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from cli.main import main; main()"]


def _die_with_parent() -> Callable[[], None] | None:
    """preexec_fn: the kernel sends SIGKILL to the worker when this process dies, however it
    dies, so no worker outlives a chaos run."""
    return die_with_parent(signal.SIGKILL)


@dataclass
class WorkerProcess:
    """One `ordercancel worker`, its output in a log file."""

    name: str
    proc: asyncio.subprocess.Process
    health_port: int
    log: Path
    started: float = field(default_factory=time.monotonic)
    # Set when the chaos run itself stops it (a kill or a drain): any other exit is unexpected.
    stopped_on_purpose: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def identity(self) -> str:
        """The SDK's default worker identity, `pid@host`, as histories and describe show it."""
        return f"{self.proc.pid}@{HOST}"

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def ready(self) -> bool:
        """`/readyz` answers 200: polling its task queue, not draining."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.health_port), 2
            )
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: chaos\r\n\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.read(), 2)).startswith(b"HTTP/1.1 200")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class WorkerStartError(RuntimeError):
    def __init__(self, message: str, worker: WorkerProcess | None = None) -> None:
        super().__init__(message)
        self.worker = worker


def worker_environment(settings: Mapping[str, str], health_port: int) -> dict[str, str]:
    """This process's environment without its own DATABASE_URL, TEMPORAL_* and ORDERCANCEL_*,
    plus `settings`, a health server on `health_port`, JSON logs and no metrics port. An empty
    value in `settings` removes that variable."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TEMPORAL_", "ORDERCANCEL_")) and k != "DATABASE_URL"
    }
    env = {
        **base,
        "ORDERCANCEL_HEALTH_PORT": str(health_port),
        "ORDERCANCEL_HEALTH_HOST": "127.0.0.1",
        "ORDERCANCEL_METRICS_PORT": "0",
        "ORDERCANCEL_LOG_FORMAT": "json",
        **settings,
    }
    return {k: v for k, v in env.items() if v}


async def start_worker_process(
    name: str, *, log_dir: Path, settings: Mapping[str, str], ready_within: float = 60
) -> WorkerProcess:
    """`ordercancel worker` configured by `settings` (see `worker_environment`), its output in
    `log_dir/<name>.log`, returned once its /readyz answers 200. If it exits first or is not
    ready in time, it is killed and WorkerStartError (carrying it) says why, with its log."""
    health_port = free_port()
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *ordercancel_command(),
            "worker",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=worker_environment(settings, health_port),
            cwd=str(log_dir),
            preexec_fn=_die_with_parent(),
        )
    worker = WorkerProcess(name, proc, health_port, log)
    deadline = time.monotonic() + ready_within
    while not await worker.ready():
        if not worker.alive:
            raise WorkerStartError(f"{name} exited while starting:\n{worker.log_tail()}", worker)
        if time.monotonic() > deadline:
            worker.stopped_on_purpose = True
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
            raise WorkerStartError(
                f"{name} not ready after {ready_within:.0f}s:\n{worker.log_tail()}", worker
            )
        await asyncio.sleep(0.2)
    return worker


@dataclass
class ChaosStack:
    """PostgreSQL, Temporal and the workers of one run, under `root`."""

    root: Path
    task_queue: str
    worker_env: Mapping[str, str]
    postgres: EmbeddedPostgres = field(init=False)
    temporal: TemporalDevServer = field(init=False)
    database_url: str = field(init=False, default="")
    workers: list[WorkerProcess] = field(default_factory=list)
    _serial: int = 0

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.postgres = EmbeddedPostgres(self.root / "pg", timeout=60)
        self.temporal = TemporalDevServer(
            port=free_port(),
            ui_port=None,
            # The same SQLite file across restarts: workflows, timers and tasks survive them.
            db_file=self.root / "temporal.db",
            search_attributes=CLI_TYPES,
            log_file=self.root / "temporal.log",
        )

    # --- servers -------------------------------------------------------------------------

    async def start_servers(self) -> None:
        self.database_url = await asyncio.to_thread(self.postgres.start)
        await self.temporal.start()

    async def stop_postgres(self) -> None:
        await asyncio.to_thread(self.postgres.stop)

    async def start_postgres(self) -> None:
        url = await asyncio.to_thread(self.postgres.start)
        if url != self.database_url:
            raise RuntimeError(f"PostgreSQL came back at another address: {url}")

    async def stop_temporal(self) -> None:
        await asyncio.to_thread(self.temporal.stop)

    async def start_temporal(self) -> None:
        # On this (the event loop's) thread: the server's parent-death signal follows it.
        await self.temporal.start()

    @property
    def temporal_address(self) -> str:
        return self.temporal.address

    # --- workers -------------------------------------------------------------------------

    def alive_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    async def start_worker(self, *, ready_within: float = 60) -> WorkerProcess:
        """A worker polling the run's task queue (its /readyz says so)."""
        self._serial += 1
        try:
            worker = await start_worker_process(
                f"worker-{self._serial}",
                log_dir=self.root,
                ready_within=ready_within,
                settings={
                    **self.worker_env,
                    "DATABASE_URL": self.database_url,
                    "TEMPORAL_ADDRESS": self.temporal_address,
                    "ORDERCANCEL_TASK_QUEUE": self.task_queue,
                },
            )
        except WorkerStartError as error:
            if error.worker is not None:
                self.workers.append(error.worker)
            raise
        self.workers.append(worker)
        return worker

    async def kill(self, worker: WorkerProcess) -> None:
        """SIGKILL: no drain, no goodbye; whatever it was doing is cut off."""
        worker.stopped_on_purpose = True
        if worker.alive:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGKILL)
        await worker.proc.wait()

    async def terminate(self, worker: WorkerProcess, *, within: float) -> tuple[int | None, float]:
        """SIGTERM and wait for the drain: (exit code or None if still running, seconds)."""
        worker.stopped_on_purpose = True
        sent = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(worker.proc.wait(), within)
        except TimeoutError:
            return None, time.monotonic() - sent
        return code, time.monotonic() - sent

    async def close(self) -> None:
        """Stop everything: workers (SIGKILL), Temporal, PostgreSQL. Safe to call twice."""
        for worker in self.workers:
            if worker.alive:
                await self.kill(worker)
        await self.stop_temporal()
        await self.stop_postgres()
