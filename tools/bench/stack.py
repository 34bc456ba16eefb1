"""The servers a bench runs against: its own (a headless dev server per side, an embedded
PostgreSQL in a temporary directory) unless TEMPORAL_ADDRESS / DATABASE_URL name the user's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil

from devstack.embedded import EmbeddedPostgres
from infra.client import load_profile
from infra.settings import Settings
from tools.bench.procs import Probe
from tools.servers import dev_server, migrate_database, start_postgres


@dataclass
class Database:
    dsn: str
    probe: Probe
    embedded: bool


@dataclass
class Temporal:
    address: str
    namespace: str
    probe: Probe
    embedded: bool


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        psutil.Process(pid)
        return pid
    except (OSError, ValueError, psutil.Error):
        return None


@asynccontextmanager
async def database(settings: Settings, workdir: Path) -> AsyncIterator[Database]:
    """The ledger's PostgreSQL, migrated: DATABASE_URL, or an embedded one under `workdir`."""
    async with AsyncExitStack() as stack:
        if settings.database_url is not None:
            dsn = settings.database_dsn()
            probe = Probe(None)
            embedded = False
        else:
            postgres = EmbeddedPostgres(workdir / "pg")
            dsn = await start_postgres(postgres)
            stack.callback(postgres.stop)
            probe = Probe(_postmaster_pid(postgres.data_dir), tree=True)
            embedded = True
        await migrate_database(dsn)
        yield Database(dsn=dsn, probe=probe, embedded=embedded)


@asynccontextmanager
async def temporal(
    settings: Settings, workdir: Path, name: str, *, server_db: str = "file"
) -> AsyncIterator[Temporal]:
    """TEMPORAL_ADDRESS (or the client profile's), or a fresh headless dev server for `name`
    (tools.servers) with its SQLite file under `workdir` (`server_db="memory"`: no file)."""
    profile = load_profile()
    configured = settings.temporal_address or profile.address
    if configured is not None:
        yield Temporal(configured, settings.temporal_namespace, Probe(None), embedded=False)
        return
    server = dev_server(
        db_file=(workdir / f"temporal-{name}.db") if server_db == "file" else None,
        log_file=workdir / f"temporal-{name}.log",
        namespace=settings.temporal_namespace,
    )
    await server.start()
    try:
        assert server.pid is not None
        yield Temporal(
            server.address, settings.temporal_namespace, Probe(server.pid, tree=True), True
        )
    finally:
        await asyncio.to_thread(server.stop)


async def pg_commits(dsn: str) -> dict[str, int] | None:
    """This database's committed and rolled-back transactions so far (pg_stat_database)."""
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError):
        return None
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    return (
        {"commits": int(row["xact_commit"]), "rollbacks": int(row["xact_rollback"])}
        if row
        else None
    )
