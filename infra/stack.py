"""The servers a command talks to: PostgreSQL (migrated) and Temporal.

`DATABASE_URL` and `TEMPORAL_ADDRESS` (or the Temporal client profile, infra/client.py) name the
user's own servers. Without `DATABASE_URL`, the PostgreSQL of a running dev stack (`make run`)
is used, and without `TEMPORAL_ADDRESS` (nor a profile address) its Temporal server and
namespace: the dev stack writes their addresses (and its API's URL) to
`<data dir>/dev-stack.json` while it runs, so a command in another terminal reaches the same
servers even when the dev stack was moved to other ports (`ORDERCANCEL_TEMPORAL_PORT`). Nothing
here starts a server (that is devstack/, which the production image does not carry).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import structlog
from temporalio.client import Client
from temporalio.runtime import Runtime

from infra.client import connect, load_profile
from infra.settings import Settings
from ledger.db import create_pool, migrate

log = structlog.get_logger(__name__)

DEV_STACK_FILE = "dev-stack.json"
FLOOR_VARIABLE = "ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR"


@dataclass
class Stack:
    settings: Settings
    pool: asyncpg.Pool
    client: Client
    ui_url: str | None


def dev_stack_file(settings: Settings) -> Path:
    return settings.data_dir / DEV_STACK_FILE


def dev_stack_record(settings: Settings) -> dict[str, object] | None:
    """What the dev stack running from `settings.data_dir` wrote about itself, or None."""
    try:
        recorded = json.loads(dev_stack_file(settings).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def dev_stack_database_url(settings: Settings) -> str:
    """The PostgreSQL of the dev stack running from `settings.data_dir`, or a clear error."""
    path = dev_stack_file(settings)
    recorded = dev_stack_record(settings)
    if recorded is None:
        raise RuntimeError(
            f"DATABASE_URL is not set and no dev stack is running ({path} not found): start"
            " one with `make run` (or `ordercancel dev`), or set DATABASE_URL"
        )
    url = recorded.get("database_url")
    if not isinstance(url, str):
        # The dev stack runs on the user's own PostgreSQL, whose URL (a secret) is not recorded.
        raise RuntimeError(
            f"DATABASE_URL is not set, and the dev stack running from {settings.data_dir} uses"
            " a PostgreSQL of your own: set DATABASE_URL here as you did for it"
        )
    return url


def window_floor(settings: Settings) -> timedelta:
    """R19's floor for a one-off command: the configured one; with no DATABASE_URL and no
    ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR, the running dev stack's (`ordercancel dev` lowers
    it for the demo)."""
    if settings.database_url is not None or FLOOR_VARIABLE in os.environ:
        return settings.seller_response_window_floor
    try:
        recorded = json.loads(dev_stack_file(settings).read_text())["window_floor_seconds"]
        return timedelta(seconds=float(recorded))
    except (OSError, ValueError, KeyError, TypeError):
        return settings.seller_response_window_floor


def temporal_target(settings: Settings) -> tuple[str | None, str]:
    """The Temporal address the user configured (None: none is) and the namespace to use.

    A server named by TEMPORAL_ADDRESS or by the client profile is the user's; so is the
    profile's namespace for it, unless TEMPORAL_NAMESPACE is set."""
    profile = load_profile()
    namespace = settings.temporal_namespace
    configured = settings.temporal_address or profile.address
    if (
        configured is not None
        and "temporal_namespace" not in settings.model_fields_set
        and profile.namespace
    ):
        namespace = profile.namespace
    return configured, namespace


def dev_stack_temporal(settings: Settings) -> tuple[str, str] | None:
    """The address and namespace of the Temporal dev server the running dev stack started, or
    None (no dev stack, or one on a Temporal server of the user's own)."""
    recorded = dev_stack_record(settings)
    if recorded is None:
        return None
    address, namespace = recorded.get("temporal_address"), recorded.get("temporal_namespace")
    if not isinstance(address, str) or not address:
        return None
    return address, namespace if isinstance(namespace, str) and namespace else "default"


def temporal_server(settings: Settings) -> tuple[str, str]:
    """The Temporal address and namespace a command talks to: the user's (TEMPORAL_ADDRESS, the
    client profile), else the running dev stack's (`<data dir>/dev-stack.json`; an explicit
    TEMPORAL_NAMESPACE still wins), else the default dev server's port on this machine."""
    configured, namespace = temporal_target(settings)
    if configured is not None:
        return configured, namespace
    running = dev_stack_temporal(settings)
    if running is not None:
        address, recorded_namespace = running
        if "temporal_namespace" not in settings.model_fields_set:
            namespace = recorded_namespace
        return address, namespace
    return f"127.0.0.1:{settings.temporal_port}", namespace


async def _ledger_pool(settings: Settings, dsn: str, *, max_size: int) -> asyncpg.Pool:
    """A pool on `dsn` with the ledger migrated; a clear error when PostgreSQL is out of reach."""
    try:
        pool = await create_pool(
            dsn, min_size=min(settings.db_pool_min, max_size), max_size=max_size
        )
    except (OSError, asyncpg.PostgresError) as err:
        where = "DATABASE_URL" if settings.database_url else str(dev_stack_file(settings))
        raise RuntimeError(
            f"cannot reach PostgreSQL (from {where}): {err}. Start the stack with `make run`"
            " / `ordercancel dev`, or set DATABASE_URL."
        ) from err
    try:
        async with pool.acquire() as conn:
            applied = await migrate(conn)
    except BaseException:
        await pool.close()
        raise
    if applied:
        log.info("ledger_migrated", versions=applied)
    return pool


def _ledger_dsn(settings: Settings) -> str:
    return settings.database_dsn() if settings.database_url else dev_stack_database_url(settings)


@asynccontextmanager
async def open_ledger(settings: Settings, *, max_size: int = 4) -> AsyncIterator[asyncpg.Pool]:
    """The configured ledger, or the running dev stack's, migrated; for commands that need no
    Temporal. Closed on exit."""
    pool = await _ledger_pool(settings, _ledger_dsn(settings), max_size=max_size)
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def connect_stack(
    settings: Settings,
    *,
    dsn: str,
    address: str,
    namespace: str,
    runtime: Runtime | None = None,
    ui_url: str | None = None,
) -> AsyncIterator[Stack]:
    """A pool on `dsn` (the ledger migrated) and a client of `address`; closed on exit."""
    async with AsyncExitStack() as stack:
        pool = await _ledger_pool(settings, dsn, max_size=settings.db_pool_max)
        stack.push_async_callback(pool.close)
        try:
            client = await connect(address, namespace, runtime=runtime)
        except Exception as err:
            raise RuntimeError(
                f"cannot reach Temporal at {address} (namespace {namespace}):"
                f" {err}. Start the stack with `make run` / `ordercancel dev`, or set"
                " TEMPORAL_ADDRESS."
            ) from err
        yield Stack(settings=settings, pool=pool, client=client, ui_url=ui_url)


@asynccontextmanager
async def open_stack(settings: Settings, *, runtime: Runtime | None = None) -> AsyncIterator[Stack]:
    """The configured servers, or those of the running dev stack."""
    dsn = _ledger_dsn(settings)
    address, namespace = temporal_server(settings)
    async with connect_stack(
        settings, dsn=dsn, address=address, namespace=namespace, runtime=runtime
    ) as stack:
        yield stack
