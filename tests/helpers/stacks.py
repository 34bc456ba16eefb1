"""The real servers the end-to-end tests run on: a Temporal dev server, a fresh migrated ledger
database, the API with the product's worker in-process, and commands run as subprocesses.

The fixtures built on these (`temporal_address`, `e2e_database_url`: one per module) are in
tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from fastapi import FastAPI
from temporalio.client import Client
from temporalio.worker import Interceptor

from api.app import borrowed, create_app
from api.keys import KeyStore, generate_key
from devstack.embedded import TemporalDevServer, free_ports
from infra.client import connect
from infra.settings import Settings
from ledger.db import create_pool
from ledger.repository import Ledger
from payments.provider import SimulatedProvider
from workers.worker import build_worker
from workflows.search_attributes import CLI_TYPES

T = TypeVar("T")


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def run_command(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> Ran:
    """A subprocess that does not block the event loop: the worker answering it runs here."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def with_database(url: str, database: str) -> str:
    """Point a postgres URL (TCP or unix-socket form) at another database."""
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


# --- servers ---------------------------------------------------------------------------------


@asynccontextmanager
async def dev_server(data_dir: Path, *, ui: bool = False) -> AsyncIterator[TemporalDevServer]:
    """A Temporal dev server (with its Web UI when `ui`), the search attributes registered."""
    port, ui_port = free_ports(2)  # distinct: the Web UI's cannot be the server's
    server = TemporalDevServer(
        port=port,
        ui_port=ui_port if ui else None,
        db_file=data_dir / "temporal.db",
        search_attributes=CLI_TYPES,
    )
    await server.start()
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@asynccontextmanager
async def fresh_database(postgres_url: str, template: str) -> AsyncIterator[str]:
    """A new database copied from the migrated template; dropped afterwards."""
    name = "e2e_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await admin.close()
    try:
        yield with_database(postgres_url, name)
    finally:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@dataclass
class ApiStack:
    """The API app served in-process over its own pool and client, the product's worker on the
    same task queue, and a key for each principal."""

    app: FastAPI
    http: httpx.AsyncClient
    keys: dict[str, str]
    pool: asyncpg.Pool
    client: Client


@asynccontextmanager
async def api_stack(
    temporal_address: str,
    database_url: str,
    settings: Settings,
    *,
    principals: tuple[str, ...],
    webhook_secret: str,
    interceptors: Sequence[Interceptor] = (),
) -> AsyncIterator[ApiStack]:
    """The app with its lifespan and the worker, as `ordercancel api` and `ordercancel worker`
    run them, over one pool and one client; requests go through ASGI, no port. `interceptors`
    go to the worker."""
    client = await connect(temporal_address)
    pool = await create_pool(database_url, min_size=1, max_size=10)
    keys = {principal: generate_key() for principal in principals}
    app = create_app(
        settings,
        resources=borrowed(pool, client),
        keys=KeyStore.from_keys(keys),
        webhook_secret=webhook_secret,
    )
    try:
        async with (
            build_worker(client, pool, settings, interceptors=interceptors),
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://api.test", timeout=30
            ) as http,
        ):
            yield ApiStack(app, http, keys, pool, client)
    finally:
        await pool.close()


@dataclass
class WorkerStack:
    """The product's worker on a task queue of its own, on the module's servers."""

    client: Client
    pool: asyncpg.Pool
    ledger: Ledger
    provider: SimulatedProvider
    task_queue: str


@asynccontextmanager
async def worker_stack(
    temporal_address: str, database_url: str, settings: Settings, *, name: str, max_size: int = 8
) -> AsyncIterator[WorkerStack]:
    """A worker (`build_worker`) with the simulated provider, on the task queue `name-<uuid>`."""
    client = await connect(temporal_address)
    pool = await create_pool(database_url, min_size=1, max_size=max_size)
    provider = SimulatedProvider(pool)
    task_queue = f"{name}-{uuid.uuid4()}"
    try:
        async with build_worker(client, pool, settings, provider=provider, task_queue=task_queue):
            yield WorkerStack(client, pool, Ledger(pool), provider, task_queue)
    finally:
        await pool.close()
