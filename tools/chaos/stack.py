"""The servers and processes a chaos run abuses: an embedded PostgreSQL and a Temporal dev server
that keep their data across restarts, and `ordercancel worker` subprocesses configured through
the environment exactly as in production (DATABASE_URL, TEMPORAL_ADDRESS, ORDERCANCEL_*;
tools.worker_process).

Everything listens on 127.0.0.1 or a Unix socket, on free ports, and is stopped by `close()`.
Workers are started with a parent-death signal, so they go even if this process is killed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.embedded import EmbeddedPostgres, TemporalDevServer
from tools.servers import dev_server, migrate_database, start_postgres
from tools.worker_process import WorkerProcess, ordercancel_worker


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
        # The same SQLite file across restarts: workflows, timers and tasks survive them.
        self.temporal = dev_server(
            db_file=self.root / "temporal.db", log_file=self.root / "temporal.log"
        )

    # --- servers -------------------------------------------------------------------------

    async def start_servers(self) -> None:
        """Both servers, the ledger migrated."""
        self.database_url = await start_postgres(self.postgres)
        await migrate_database(self.database_url)
        await self.temporal.start()

    async def stop_postgres(self) -> None:
        await asyncio.to_thread(self.postgres.stop)

    async def start_postgres(self) -> None:
        url = await start_postgres(self.postgres)
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
        worker = ordercancel_worker(
            f"worker-{self._serial}",
            log_dir=self.root,
            settings={
                **self.worker_env,
                "DATABASE_URL": self.database_url,
                "TEMPORAL_ADDRESS": self.temporal_address,
                "ORDERCANCEL_TASK_QUEUE": self.task_queue,
            },
        )
        self.workers.append(worker)
        return await worker.start(ready_within=ready_within)

    async def close(self) -> None:
        """Stop everything: workers (SIGKILL), Temporal, PostgreSQL. Safe to call twice."""
        for worker in self.workers:
            await worker.kill()
        await self.stop_temporal()
        await self.stop_postgres()
