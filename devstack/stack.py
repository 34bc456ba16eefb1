"""The dev stack's servers: the user's where configured (`DATABASE_URL`, `TEMPORAL_ADDRESS`),
embedded ones otherwise, started from `.data/` and stopped on exit with their data kept.

While it runs, `<data dir>/dev-stack.json` names its PostgreSQL, its Temporal server and
namespace (those it started) and its API's URL, so that one-off commands in another terminal
(`ordercancel status ...`, infra/stack.py) find them without starting others, on whatever ports
they run (`ORDERCANCEL_TEMPORAL_PORT`, `ORDERCANCEL_API_PORT`).
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
from infra.stack import (
    Stack,
    connect_stack,
    dev_stack_file,
    dev_stack_record,
    temporal_target,
)
from workflows.search_attributes import CLI_TYPES

log = structlog.get_logger(__name__)


def record_dev_stack(settings: Settings, **fields: object) -> None:
    """Add `fields` to `<data dir>/dev-stack.json` (written whole, then renamed into place, so a
    command in another terminal never reads half a file)."""
    marker = dev_stack_file(settings)
    recorded = dev_stack_record(settings) or {}
    recorded.update(fields)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(recorded))
    tmp.replace(marker)


@asynccontextmanager
async def open_dev_stack(
    settings: Settings, *, runtime: Runtime | None = None
) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as stack:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        marker = dev_stack_file(settings)
        marker.unlink(missing_ok=True)  # a crashed run's record describes servers now gone
        ui_url: str | None = None
        # What one-off commands in another terminal need to find these servers (infra/stack.py).
        record: dict[str, object] = {
            "pid": os.getpid(),
            # R19: one-off commands (`ordercancel sellers policy`) check this floor.
            "window_floor_seconds": settings.seller_response_window_floor.total_seconds(),
        }
        if settings.database_url is not None:
            dsn = settings.database_dsn()  # the user's own: its URL (a secret) is not recorded
        else:
            postgres = EmbeddedPostgres(settings.data_dir / "pg")
            dsn = postgres.start()
            stack.callback(postgres.stop)
            log.info("postgres_started", data_dir=str(postgres.data_dir))
            # The socket URL of a server only this machine's users reach; no secret in it.
            record["database_url"] = dsn
        configured, namespace = temporal_target(settings)
        if configured is not None:
            address = configured  # the user's own, found by them the same way (TEMPORAL_ADDRESS)
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
            record.update(
                temporal_address=address, temporal_namespace=namespace, temporal_ui_url=ui_url
            )
        record_dev_stack(settings, **record)
        stack.callback(marker.unlink, missing_ok=True)
        async with connect_stack(
            settings, dsn=dsn, address=address, namespace=namespace, runtime=runtime, ui_url=ui_url
        ) as connected:
            yield connected
