"""What the end-to-end modules share: a real Temporal dev server, a fresh migrated ledger
database, orders made up on the spot, and helpers that wait for visibility and run commands.

A module that wants a fixture here imports it under its function name, and asks for it by its
fixture name (`e2e_database_url`, `temporal_address`): module scope, so each module gets its own
server and database.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from temporalio.client import Client
from temporalio.worker import Interceptor

from api.app import borrowed, create_app
from api.keys import KeyStore, generate_key
from devstack.embedded import TemporalDevServer, free_port
from infra.client import connect
from infra.settings import Settings
from ledger.db import create_pool
from workers.worker import build_worker
from workflows.search_attributes import CLI_TYPES

T = TypeVar("T")


# --- helpers ---------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T]], *, timeout: float = 15, interval: float = 0.2
) -> T:
    """Retry `check` until it stops raising AssertionError (visibility and status lag), then
    return its value; after `timeout` seconds re-raise the last failure."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if loop.time() >= deadline:
                raise
        await asyncio.sleep(interval)


async def listed(client: Client, query: str) -> list[str]:
    return [wf.id async for wf in client.list_workflows(query)]


async def assert_listed(client: Client, query: str, expected: set[str]) -> None:
    """The visibility query finds exactly `expected` (once each), within a bounded wait."""

    async def check() -> None:
        found = await listed(client, query)
        assert sorted(found) == sorted(expected), query

    await eventually(check)


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


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


def fast_refund_settings(**overrides: Any) -> Settings:
    """The worker's settings with refund timings short enough for a test."""
    return Settings(
        **{
            "refund_poll_interval": timedelta(milliseconds=200),
            "refund_poll_max_interval": timedelta(seconds=1),
            "refund_submit_initial_interval": timedelta(milliseconds=100),
            "refund_submit_max_interval": timedelta(seconds=1),
            **overrides,
        }
    )


def one_seller_order(
    order_id: str,
    *,
    buyer_id: str,
    seller_id: str,
    validated: bool = True,
    coupon: bool = False,
) -> dict[str, Any]:
    """An order of one seller for the orders file. Validated: paid by card and captured, the
    seller has accepted (request path). Not validated: only authorised (instant path). With
    `coupon`, a coupon paid for it (restored when it is cancelled and refunded)."""
    order: dict[str, Any] = {
        "order_id": order_id,
        "buyer_id": buyer_id,
        "currency": "EUR",
        "placed_at": "2026-03-10T10:00:00Z",
        "payment": {
            "payment_id": f"P-{order_id}",
            "method": "card",
            "validation": "validated" if validated else "unvalidated",
            "capture": "captured" if validated else "authorized",
        },
        "sub_orders": [
            {
                "seller_id": seller_id,
                "seller_accepted": validated,
                "shipping_minor": 300,
                "lines": [{"sku": "E2E-SKU", "quantity": 2, "unit_price_minor": 1250}],
            }
        ],
    }
    if coupon:
        order["coupons"] = [
            {
                "redemption_id": f"R-{order_id}",
                "coupon_code": "E2E5",
                "discount_minor": 500,
                "expires_at": "2099-01-01T00:00:00Z",
                "footprint": [seller_id],
            }
        ]
    return order


def orders_file(*orders: dict[str, Any]) -> str:
    return json.dumps({"orders": list(orders)})


def unique(prefix: str) -> str:
    """An id no other run on a shared server has used (workflow ids are business keys)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# --- servers ---------------------------------------------------------------------------------


@asynccontextmanager
async def dev_server(data_dir: Path, *, ui: bool = False) -> AsyncIterator[TemporalDevServer]:
    """A Temporal dev server (with its Web UI when `ui`), the search attributes registered."""
    server = TemporalDevServer(
        port=free_port(),
        ui_port=free_port() if ui else None,
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
        yield _with_database(postgres_url, name)
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


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module", name="e2e_database_url")
async def e2e_database_url_fixture(postgres_url: str, _template_db: str) -> AsyncIterator[str]:
    """A fresh migrated database for the module (the demo's order ids are fixed)."""
    async with fresh_database(postgres_url, _template_db) as url:
        yield url


@pytest.fixture(scope="module", name="temporal_address")
async def temporal_address_fixture(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The user's Temporal (`TEMPORAL_ADDRESS`) or a headless dev server for the module."""
    if os.environ.get("TEMPORAL_ADDRESS"):
        yield os.environ["TEMPORAL_ADDRESS"]
        return
    async with dev_server(tmp_path_factory.mktemp("temporal")) as server:
        yield server.address
