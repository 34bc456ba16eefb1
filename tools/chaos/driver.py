"""The people around a cancellation during a chaos run: the buyer who asks (and sometimes
withdraws), the seller who decides (by update or by signal), and the payment provider's webhook
that reports a refund reversed after success.

They keep trying through outages, as real callers do: every call is retried while Temporal or
PostgreSQL is restarting, and a retry that finds its first attempt went through (an update
refused as `already_decided`) counts as done. Anything they cannot do is a harness error, which
fails the run like a violation (it would leave a cancellation waiting for nobody).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from temporalio.client import (
    Client,
    RPCTimeoutOrCancelledError,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from domain.models import (
    CancellationStatus,
    PaymentEvent,
    PaymentEventType,
    RequestCancellationInput,
)
from ledger.repository import Ledger
from starter.payment_events import forward_payment_event
from starter.requests import start_cancellation
from tools.chaos.plan import Action, CancellationPlan, OrderPlan
from workflows import search_attributes as sa

if TYPE_CHECKING:
    from tools.chaos.hostile import HostileSender

T = TypeVar("T")

# What an outage looks like to a caller: retry. Anything else is an answer.
_NOT_TRANSIENT = {
    RPCStatusCode.INVALID_ARGUMENT,
    RPCStatusCode.NOT_FOUND,
    RPCStatusCode.ALREADY_EXISTS,
    RPCStatusCode.PERMISSION_DENIED,
    RPCStatusCode.UNIMPLEMENTED,
    RPCStatusCode.UNAUTHENTICATED,
    RPCStatusCode.FAILED_PRECONDITION,
}
TRANSIENT_DB = (
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InterfaceError,
    OSError,
)


class HarnessError(Exception):
    """The chaos run could not do what it planned (not a finding about the product)."""


def transient(err: BaseException) -> bool:
    if isinstance(err, RPCError):
        return err.status not in _NOT_TRANSIENT
    return isinstance(err, (RPCTimeoutOrCancelledError, TimeoutError, *TRANSIENT_DB))


async def persist(
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    within: float = 180,
    attempt_timeout: float = 30,
) -> T:
    """`call()` until it answers, retrying outages for up to `within` seconds."""
    deadline = time.monotonic() + within
    pause = 0.2
    while True:
        try:
            return await asyncio.wait_for(call(), attempt_timeout)
        except Exception as err:
            if not transient(err):
                raise
            if time.monotonic() > deadline:
                raise HarnessError(f"{what}: still failing after {within:.0f}s: {err!r}") from err
        await asyncio.sleep(pause)
        pause = min(pause * 2, 3.0)


@dataclass
class DriverStats:
    started: int = 0
    updates: int = 0
    signals: int = 0
    withdrawals: int = 0
    # Retries that found their first attempt had gone through.
    duplicates_absorbed: int = 0
    reversals_sent: int = 0
    reversals_skipped: int = 0
    errors: list[str] = field(default_factory=list)


class Driver:
    def __init__(
        self,
        client: Client,
        pool: asyncpg.Pool,
        *,
        task_queue: str,
        stats: DriverStats | None = None,
        wait_limit: float = 240,
        hostile: HostileSender | None = None,
    ) -> None:
        self.client = client
        self.hostile = hostile
        self.pool = pool
        self.task_queue = task_queue
        self.stats = stats or DriverStats()
        self.wait_limit = wait_limit

    # --- one order -----------------------------------------------------------------------

    async def run_order(self, order: OrderPlan) -> None:
        """Request every planned cancellation of the order at once; once all await their
        sellers, the sellers decide together (siblings race to the refund and the coupon)."""
        try:
            await asyncio.gather(*(self.request(c) for c in order.cancellations))
            acting = [c for c in order.cancellations if c.action is not Action.NOTHING]
            if acting:
                await asyncio.gather(*(self.awaiting_seller(c) for c in acting))
                if self.hostile is not None:
                    await asyncio.gather(*(self.hostile.before_decision(c) for c in acting))
                await asyncio.sleep(acting[0].delay)
                await asyncio.gather(*(self.act(c) for c in acting))
                if self.hostile is not None:
                    await asyncio.gather(*(self.hostile.after_decision(c) for c in acting))
            for c in order.cancellations:
                if c.reverse:
                    await self.reverse_after_success(c)
        except Exception as err:
            self.stats.errors.append(f"order {order.order_id}: {type(err).__name__}: {err}")

    async def request(self, c: CancellationPlan) -> None:
        request = RequestCancellationInput(
            order_id=c.order_id,
            seller_id=c.seller_id,
            buyer_id=c.buyer_id,
            reason=c.reason,
            reason_text="chaos run",
        )
        await persist(
            f"start {c.workflow_id}",
            lambda: start_cancellation(self.client, request, task_queue=self.task_queue),
        )
        self.stats.started += 1

    async def describe(self, workflow_id: str) -> WorkflowExecutionDescription:
        handle = self.client.get_workflow_handle(workflow_id)
        return await persist(f"describe {workflow_id}", handle.describe)

    async def awaiting_seller(self, c: CancellationPlan) -> None:
        deadline = time.monotonic() + self.wait_limit
        while True:
            described = await self.describe(c.workflow_id)
            status = described.typed_search_attributes.get(sa.CANCELLATION_STATUS)
            if status == CancellationStatus.AWAITING_SELLER.value:
                return
            if status not in (None, CancellationStatus.OPENING.value) or (
                described.status is not WorkflowExecutionStatus.RUNNING
            ):
                raise HarnessError(f"{c.workflow_id}: expected awaiting_seller, found {status}")
            if time.monotonic() > deadline:
                raise HarnessError(f"{c.workflow_id}: never awaited its seller ({status})")
            await asyncio.sleep(0.3)

    async def act(self, c: CancellationPlan) -> None:
        handle = self.client.get_workflow_handle(c.workflow_id)
        if c.action is Action.WITHDRAW:
            payload: dict[str, Any] = {"buyer_id": c.buyer_id, "reason": "changed my mind"}
            await self._signal(c, "withdraw", payload)
            self.stats.withdrawals += 1
            return
        decision = (
            "accept" if c.action in (Action.ACCEPT_UPDATE, Action.ACCEPT_SIGNAL) else "reject"
        )
        payload = {"seller_id": c.seller_id, "decision": decision, "reason": "chaos seller"}
        if c.action in (Action.ACCEPT_SIGNAL, Action.REJECT_SIGNAL):
            await self._signal(c, "seller_decision", payload)
            self.stats.signals += 1
            return

        async def update() -> None:
            try:
                await handle.execute_update("decide", payload)
            except WorkflowUpdateFailedError as err:
                cause = err.cause
                if isinstance(cause, ApplicationError) and cause.type == "already_decided":
                    # An earlier attempt went through before the connection broke.
                    self.stats.duplicates_absorbed += 1
                    return
                raise HarnessError(f"{c.workflow_id}: decide refused: {cause}") from err

        try:
            await persist(f"decide {c.workflow_id}", update)
        except RPCError as err:
            if err.status is not RPCStatusCode.NOT_FOUND or not await self._closed(c):
                raise
            self.stats.duplicates_absorbed += 1  # decided, refunded and closed meanwhile
        self.stats.updates += 1

    async def _signal(self, c: CancellationPlan, name: str, payload: dict[str, Any]) -> None:
        handle = self.client.get_workflow_handle(c.workflow_id)
        try:
            await persist(f"{name} {c.workflow_id}", lambda: handle.signal(name, payload))
        except RPCError as err:
            if err.status is not RPCStatusCode.NOT_FOUND or not await self._closed(c):
                raise
            self.stats.duplicates_absorbed += 1

    async def _closed(self, c: CancellationPlan) -> bool:
        described = await self.describe(c.workflow_id)
        return described.status is not WorkflowExecutionStatus.RUNNING

    # --- the provider's webhook: a refund reversed after success ---------------------------

    async def reverse_after_success(self, c: CancellationPlan) -> None:
        """Once the cancellation completes, the provider reports its refund failed (its
        simulator flips a `fail_after_success` refund the next time it is asked): the webhook
        goes through `forward_payment_event`, as the API's does."""
        deadline = time.monotonic() + self.wait_limit
        while True:
            described = await self.describe(c.workflow_id)
            status = described.typed_search_attributes.get(sa.CANCELLATION_STATUS)
            if described.status is WorkflowExecutionStatus.COMPLETED:
                break
            if status == CancellationStatus.REFUND_FAILED.value:
                # Parked first (an outage exhausted its retries): the operator retry comes
                # at the end, and the reversal is not sent.
                self.stats.reversals_skipped += 1
                return
            if time.monotonic() > deadline:
                self.stats.reversals_skipped += 1
                return
            await asyncio.sleep(0.5)
        row = await persist(
            f"refund of {c.workflow_id}",
            lambda: self.pool.fetchrow(
                "SELECT provider_ref FROM refunds WHERE cancellation_id = $1"
                " AND stage = 'confirmed'",
                c.workflow_id,
            ),
        )
        if row is None or row["provider_ref"] is None:
            self.stats.reversals_skipped += 1
            return
        event = PaymentEvent(
            event_id=f"chaos-reversal-{c.workflow_id}",
            type=PaymentEventType.REFUND_REVERSED,
            provider_ref=row["provider_ref"],
            failure_code="card_closed_after_refund",
        )
        await persist(
            f"reversal of {c.workflow_id}",
            lambda: forward_payment_event(
                self.client, Ledger(self.pool), event, task_queue=self.task_queue
            ),
        )
        self.stats.reversals_sent += 1
