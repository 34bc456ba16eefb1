"""The dev stack's servers: the user's where configured (`DATABASE_URL`, `TEMPORAL_ADDRESS`),
embedded ones otherwise, started from `.data/` and stopped on exit with their data kept.

While it runs, `<data dir>/dev-stack.json` names its PostgreSQL, so that one-off commands in
another terminal (`ordercancel status ...`, infra/stack.py) find it without starting another.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import structlog
from temporalio.runtime import Runtime

from devstack.embedded import EmbeddedPostgres, TemporalDevServer
from infra.settings import Settings
from infra.stack import Stack, connect_stack, dev_stack_file, temporal_target
from workflows.search_attributes import CLI_TYPES

log = structlog.get_logger(__name__)


@asynccontextmanager
async def open_dev_stack(
    settings: Settings, *, runtime: Runtime | None = None
) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as stack:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        ui_url: str | None = None
        if settings.database_url is not None:
            dsn = settings.database_dsn()
        else:
            postgres = EmbeddedPostgres(settings.data_dir / "pg")
            dsn = postgres.start()
            stack.callback(postgres.stop)
            log.info("postgres_started", data_dir=str(postgres.data_dir))
            marker = dev_stack_file(settings)
            # The socket URL of a server only this machine's users reach; no secret in it.
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "database_url": dsn,
                        "pid": os.getpid(),
                        # R19: one-off commands (`ordercancel sellers policy`) check this floor.
                        "window_floor_seconds": (
                            settings.seller_response_window_floor.total_seconds()
                        ),
                    }
                )
            )
            tmp.replace(marker)
            stack.callback(marker.unlink, missing_ok=True)
        configured, namespace = temporal_target(settings)
        if configured is not None:
            address = configured
        else:
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
        async with connect_stack(
            settings, dsn=dsn, address=address, namespace=namespace, runtime=runtime, ui_url=ui_url
        ) as connected:
            yield connected
