"""The one way the tests wait: `eventually` retries a check until it stops failing.

Visibility, status queries and the ledger lag behind what a test just did; a test states what
must become true and `eventually` gives it a bounded time to, instead of sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowHandle

from domain.models import CancellationStatus, CancellationView
from workflows.order_cancellation import OrderCancellation

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], *, timeout: float = 15, interval: float = 0.1
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


async def status_of(handle: WorkflowHandle[Any, Any]) -> CancellationView:
    return await handle.query(OrderCancellation.status)


async def wait_for_status(
    handle: WorkflowHandle[Any, Any], status: CancellationStatus, timeout: float = 15
) -> CancellationView:
    """The workflow's `status` query, once it reports `status` (within `timeout` seconds)."""

    async def reached() -> CancellationView:
        view = await status_of(handle)
        assert view.status is status, f"status stayed {view.status}, expected {status}"
        return view

    return await eventually(reached, timeout=timeout, interval=0.05)


async def current_details(handle: WorkflowHandle[Any, Any]) -> str:
    """The workflow's current details, as the Web UI shows them."""
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return str(metadata.current_details)
