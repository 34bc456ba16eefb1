"""Changing the workflow while cancellations are running (docs/workflow-changes.md).

A cancellation started by today's `OrderCancellation`, parked waiting for its seller, must finish
on the next version of the code. Here the next version is a test-local change, registered under
the same workflow type: it adds a command (a memo entry) right after opening, guarded by
`workflow.patched(TEST_CHANGE)`. The guarded change picks the running cancellation up and
finishes it on the old path, while new cancellations take the new one; the same change without
its guard cannot replay the running cancellation's history (it would fail its next workflow task
with a non-determinism error). Both are shown here, on the time-skipping server.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from helpers.workflow_fakes import FakeActivities, accept, status_of
from temporalio import workflow
from temporalio.client import WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker
from temporalio.workflow import NondeterminismError

from domain.models import (
    CancellationReason,
    CancellationResult,
    CancellationStatus,
    OpenCancellationResult,
    RequestCancellationInput,
)
from domain.rules import cancellation_id
from workers.worker import workflow_runner
from workflows.order_cancellation import OrderCancellation

TEST_CHANGE = "test-change-memo-after-opening"


@workflow.defn(name="OrderCancellation", sandboxed=False)
class GuardedChange(OrderCancellation):
    """The next version, done right: the new command only where the history has none."""

    @workflow.run
    async def run(self, *args: Any) -> CancellationResult:
        return await super().run(*args)

    async def _open(self, request: RequestCancellationInput) -> OpenCancellationResult:
        opened = await super()._open(request)
        if workflow.patched(TEST_CHANGE):
            workflow.upsert_memo({"test_change": "applied"})
        return opened


@workflow.defn(name="OrderCancellation", sandboxed=False)
class UnguardedChange(OrderCancellation):
    """The same change made carelessly: the new command unconditionally."""

    @workflow.run
    async def run(self, *args: Any) -> CancellationResult:
        return await super().run(*args)

    async def _open(self, request: RequestCancellationInput) -> OpenCancellationResult:
        opened = await super()._open(request)
        workflow.upsert_memo({"test_change": "applied"})
        return opened


def request() -> RequestCancellationInput:
    return RequestCancellationInput(
        order_id=f"O-{uuid.uuid4().hex[:8]}",
        seller_id="S-7",
        buyer_id="B-1",
        reason=CancellationReason.OUT_OF_STOCK,
    )


def replayer(workflow_class: type) -> Replayer:
    return Replayer(
        workflows=[workflow_class],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )


def worker(env: WorkflowEnvironment, queue: str, workflow_class: type, fakes: Any) -> Worker:
    return Worker(
        env.client,
        task_queue=queue,
        workflows=[workflow_class],
        activities=fakes.activities(),
        workflow_runner=workflow_runner(),
        # Every task replays the whole history, as after a worker restart.
        max_cached_workflows=0,
    )


async def pending_on_old_code(
    env: WorkflowEnvironment, queue: str, fakes: FakeActivities
) -> WorkflowHandle[Any, Any]:
    """A cancellation started on today's code, waiting for its seller; no worker runs it."""
    started = request()
    async with worker(env, queue, OrderCancellation, fakes):
        handle = await env.client.start_workflow(
            OrderCancellation.run,
            started,
            id=cancellation_id(started.order_id, started.seller_id),
            task_queue=queue,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await status_of(handle)).status is not CancellationStatus.AWAITING_SELLER:
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
    return handle


async def test_a_patched_change_lets_running_cancellations_finish(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    queue = f"upgrade-{uuid.uuid4()}"
    fakes = FakeActivities()
    handle = await pending_on_old_code(time_skipping_env, queue, fakes)
    # Deployed: the next version, with the guarded change, picks the cancellation up. Without
    # the guard its first task would fail on every attempt and the update never complete.
    async with worker(time_skipping_env, queue, GuardedChange, fakes):
        await asyncio.wait_for(handle.execute_update(GuardedChange.decide, accept()), 30)
        result = await asyncio.wait_for(handle.result(), 30)
    assert result.status is CancellationStatus.COMPLETED
    # It kept the old path: no new command for a cancellation already past that point.
    memo = await (await handle.describe()).memo()
    assert memo["amount_minor"] == 2540 and "test_change" not in memo
    # Its whole history replays on the next version, marker-free.
    await replayer(GuardedChange).replay_workflow(await handle.fetch_history())

    # New cancellations take the new path, and their histories carry the patch marker.
    async with worker(time_skipping_env, queue, GuardedChange, FakeActivities()):
        started = request()
        fresh = await time_skipping_env.client.start_workflow(
            GuardedChange.run,
            started,
            id=cancellation_id(started.order_id, started.seller_id),
            task_queue=queue,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await status_of(fresh)).status is not CancellationStatus.AWAITING_SELLER:
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        await fresh.execute_update(GuardedChange.decide, accept())
        await asyncio.wait_for(fresh.result(), 30)
    assert (await (await fresh.describe()).memo())["test_change"] == "applied"
    events = (await fresh.fetch_history()).events
    assert any(e.HasField("marker_recorded_event_attributes") for e in events)


async def test_the_same_change_without_the_guard_breaks_them(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    queue = f"upgrade-{uuid.uuid4()}"
    handle = await pending_on_old_code(time_skipping_env, queue, FakeActivities())
    history = await handle.fetch_history()
    # Today's code and the guarded change replay the in-flight history; the careless one cannot.
    await replayer(OrderCancellation).replay_workflow(history)
    await replayer(GuardedChange).replay_workflow(history)
    with pytest.raises(NondeterminismError):
        await replayer(UnguardedChange).replay_workflow(history)
    await handle.terminate("test done")
