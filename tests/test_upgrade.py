"""Changing the workflow while cancellations are running (docs/operations.md, "Rolling out a
workflow change").

The memo with the amounts (`MEMO_PATCH`) was added to `OrderCancellation` after cancellations
were already in flight. A cancellation started by the code before that change, parked waiting
for its seller, must finish on the new code; the same change without its `workflow.patched`
guard must not (it would fail every such cancellation's next workflow task with a
non-determinism error). Both are shown here, on the time-skipping server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker
from temporalio.workflow import NondeterminismError
from test_workflow import FakeActivities, accept, status_of

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


@workflow.defn(name="OrderCancellation", sandboxed=False)
class BeforeTheMemo(OrderCancellation):
    """The workflow as it was before the memo was added."""

    @workflow.run
    async def run(self, request: RequestCancellationInput) -> CancellationResult:
        return await super().run(request)

    def _record_memo(self, opened: OpenCancellationResult) -> None:
        return None


@workflow.defn(name="OrderCancellation", sandboxed=False)
class MemoWithoutGuard(OrderCancellation):
    """The same change made carelessly: the memo recorded unconditionally."""

    @workflow.run
    async def run(self, request: RequestCancellationInput) -> CancellationResult:
        return await super().run(request)

    def _record_memo(self, opened: OpenCancellationResult) -> None:
        workflow.upsert_memo({"amount_minor": opened.amount.amount_minor})


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
    request = RequestCancellationInput(
        order_id=f"O-{uuid.uuid4().hex[:8]}",
        seller_id="S-7",
        buyer_id="B-1",
        reason=CancellationReason.OUT_OF_STOCK,
    )
    async with worker(env, queue, BeforeTheMemo, fakes):
        handle = await env.client.start_workflow(
            BeforeTheMemo.run,
            request,
            id=cancellation_id(request.order_id, request.seller_id),
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
    # Deployed: the current code, with the guarded change, picks the cancellation up.
    async with worker(time_skipping_env, queue, OrderCancellation, fakes):
        await handle.execute_update(OrderCancellation.decide, accept())
        result = await handle.result()
    assert result.status is CancellationStatus.COMPLETED
    # It took the old path: no memo for a cancellation that had passed that point.
    assert await (await handle.describe()).memo() == {}
    # New cancellations get the memo.
    fresh_fakes = FakeActivities()
    async with worker(time_skipping_env, queue, OrderCancellation, fresh_fakes):
        request = RequestCancellationInput(
            order_id=f"O-{uuid.uuid4().hex[:8]}",
            seller_id="S-7",
            buyer_id="B-1",
            reason=CancellationReason.OUT_OF_STOCK,
        )
        fresh = await time_skipping_env.client.start_workflow(
            OrderCancellation.run,
            request,
            id=cancellation_id(request.order_id, request.seller_id),
            task_queue=queue,
        )
        memo: Mapping[str, Any] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not memo:
            assert loop.time() < deadline
            memo = await (await fresh.describe()).memo()
            await asyncio.sleep(0.05)
        assert memo["amount_minor"] == 2540 and memo["currency"] == "EUR"
        await fresh.execute_update(OrderCancellation.decide, accept())
        await fresh.result()


async def test_the_same_change_without_the_guard_breaks_them(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    queue = f"upgrade-{uuid.uuid4()}"
    fakes = FakeActivities()
    handle = await pending_on_old_code(time_skipping_env, queue, fakes)
    history = await handle.fetch_history()
    # The guarded change replays the in-flight history; the careless one cannot.
    await Replayer(
        workflows=[OrderCancellation],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    ).replay_workflow(history)
    with pytest.raises(NondeterminismError):
        await Replayer(
            workflows=[MemoWithoutGuard], data_converter=pydantic_data_converter
        ).replay_workflow(history)
    await handle.terminate("test done")
