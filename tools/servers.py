"""The embedded servers the tools start (devstack.embedded), set up alike for the bench and the
chaos run: a headless Temporal dev server on a free port with the project's search attributes,
its log in a file; PostgreSQL started off the event loop and migrated."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from devstack.embedded import EmbeddedPostgres, TemporalDevServer, free_port
from ledger.db import migrate
from workflows.search_attributes import CLI_TYPES


def dev_server(
    *, db_file: Path | None, log_file: Path, namespace: str = "default"
) -> TemporalDevServer:
    """A headless dev server (no UI) on a free port; `db_file` None: in memory."""
    return TemporalDevServer(
        port=free_port(),
        ui_port=None,
        db_file=db_file,
        namespace=namespace,
        search_attributes=CLI_TYPES,
        log_file=log_file,
    )


async def start_postgres(postgres: EmbeddedPostgres) -> str:
    """Start it (in a thread: it blocks) and return its DSN."""
    return await asyncio.to_thread(postgres.start)


async def migrate_database(dsn: str) -> None:
    """The ledger's migrations, on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
