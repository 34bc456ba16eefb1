"""Drives the units of one side: requests, seller decisions, results, with bounded concurrency.

Both sides are driven the same way. A unit starts its workflow(s); on a path where the seller
decides, the driver waits until the workflow waits for the seller (its history shows the
seller-window timer, read with a long poll that costs the worker nothing) and sends update
`decide` at once, as a seller answering immediately would; then it waits for the result.
`--concurrency` bounds the workflows in flight (a coupon unit holds two), but for a silent
seller's once it waits out its window (the seller's time, not the machine's: its slot goes to the
next unit meanwhile, as a new buyer would not wait for another's seller).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)

from domain.models import Decision, RequestCancellationInput, SellerDecision
from tools.bench.limit_workflow import LIMIT_WORKFLOW, sa_update
from tools.bench.mix import COUPON, DECISIONS, SILENT, Unit
from tools.bench.shape import REFERENCE, Shape, reference_shape

_CLOSED = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
}


@dataclass
class Timing:
    """One cancellation as the driver saw it (wall clock, seconds since the epoch)."""

    path: str
    shape_key: str
    workflow_id: str
    started: float
    window: float = 0.0
    decided: float | None = None
    ended: float | None = None
    status: str | None = None
    error: str | None = None
    rejected_updates: int = 0


def shape_key(unit_path: str, request: RequestCancellationInput) -> str:
    """The shape a request follows: its path, and for coupon orders which of the two sellers."""
    return f"{COUPON}:{request.seller_id}" if unit_path == COUPON else unit_path


class Side(Protocol):
    name: str
    # The decision sent on every path (reference-4 takes one update whatever the path), or
    # None: only where the product's seller decides.
    always_decides: str | None

    async def start(
        self, key: str, request: RequestCancellationInput, unit: Unit
    ) -> WorkflowHandle[Any, Any]: ...

    async def decide(
        self, handle: WorkflowHandle[Any, Any], request: RequestCancellationInput, decision: str
    ) -> None: ...

    async def status(self, result: Any) -> str: ...


class ProductSide:
    """The real thing: `starter.requests.start_cancellation` and update `decide`."""

    name = "product"
    always_decides: str | None = None

    def __init__(self, client: Client, task_queue: str, ledger: Any) -> None:
        self.client = client
        self.task_queue = task_queue
        self.ledger = ledger

    async def start(
        self, key: str, request: RequestCancellationInput, unit: Unit
    ) -> WorkflowHandle[Any, Any]:
        from starter.requests import start_cancellation

        return await start_cancellation(
            self.client, request, task_queue=self.task_queue, ledger=self.ledger
        )

    async def decide(
        self, handle: WorkflowHandle[Any, Any], request: RequestCancellationInput, decision: str
    ) -> None:
        from workflows.order_cancellation import OrderCancellation

        await handle.execute_update(
            OrderCancellation.decide,
            SellerDecision(seller_id=request.seller_id, decision=Decision(decision), reason=""),
        )

    async def status(self, result: Any) -> str:
        return str(result.status.value)


class LimitSide:
    """`BenchLimitShape` started like the product is: same search attributes at start, summary
    and details of the same size, same id policies."""

    name = "limit"
    always_decides: str | None = None

    def __init__(self, client: Client, task_queue: str, shapes: dict[str, Shape], run_id: str):
        self.client = client
        self.task_queue = task_queue
        self.shapes = shapes
        self.run_id = run_id

    async def start(
        self, key: str, request: RequestCancellationInput, unit: Unit
    ) -> WorkflowHandle[Any, Any]:
        shape = self.shapes[key]
        pairs = []
        for attr in shape.start_attrs:
            update = sa_update(attr)
            pairs.append(SearchAttributePair(update.key, update.value))
        return await self.client.start_workflow(
            LIMIT_WORKFLOW,
            shape.limit_input(),
            id=f"bench-limit-{request.order_id}-{request.seller_id}",
            task_queue=self.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            search_attributes=TypedSearchAttributes(pairs),
            static_summary="s" * shape.summary_len if shape.summary_len else None,
            static_details="d" * shape.details_len if shape.details_len else None,
        )

    async def decide(
        self, handle: WorkflowHandle[Any, Any], request: RequestCancellationInput, decision: str
    ) -> None:
        await handle.execute_update(
            "decide", {"seller_id": request.seller_id, "decision": decision, "reason": ""}
        )

    async def status(self, result: Any) -> str:
        return "completed"


class ReferenceSide:
    """`reference-4` (`shape.reference_shape`): `BenchLimitShape` with a fixed shape, the same
    for every path, started with nothing else (no search attributes, summary or details) and
    decided by one update on every path."""

    name = REFERENCE
    always_decides: str | None = "accept"

    def __init__(self, client: Client, task_queue: str, run_id: str):
        self.client = client
        self.task_queue = task_queue
        self.run_id = run_id

    async def start(
        self, key: str, request: RequestCancellationInput, unit: Unit
    ) -> WorkflowHandle[Any, Any]:
        return await self.client.start_workflow(
            LIMIT_WORKFLOW,
            reference_shape(key).limit_input(),
            id=f"bench-ref-{request.order_id}-{request.seller_id}",
            task_queue=self.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        )

    async def decide(
        self, handle: WorkflowHandle[Any, Any], request: RequestCancellationInput, decision: str
    ) -> None:
        await handle.execute_update("decide", {"decision": decision})

    async def status(self, result: Any) -> str:
        return "completed"


async def wait_for_seller_window(handle: WorkflowHandle[Any, Any]) -> bool:
    """Until the workflow's history shows its seller-window timer (False: it closed first)."""
    async for event in handle.fetch_history_events(wait_new_event=True):
        if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED:
            return True
        if event.event_type in _CLOSED:
            return False
    return False


class Slots:
    """A semaphore that takes several permits at once (a coupon unit holds two workflows)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.free >= n)
            self.free -= n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.free += n
            self._cond.notify_all()


async def run_request(
    side: Side,
    unit: Unit,
    request: RequestCancellationInput,
    timeout: float,
    *,
    on_waiting: Callable[[], Awaitable[None]] | None = None,
) -> Timing:
    """One cancellation from start to its end. `on_waiting` is awaited once a silent seller's
    workflow waits out its window: the window is the seller's time, not load on the machine,
    so the caller can give its slot to the next cancellation meanwhile."""
    key = shape_key(unit.path, request)
    decision = DECISIONS.get(unit.path) or side.always_decides
    # The silent seller's window, where the timer decides (not on a side that always decides).
    window = unit.window.total_seconds() if unit.path == SILENT and not side.always_decides else 0.0
    timing = Timing(
        path=unit.path, shape_key=key, workflow_id="", started=time.time(), window=window
    )
    try:
        handle = await side.start(key, request, unit)
        timing.workflow_id = handle.id
        if window and on_waiting is not None:
            if not await asyncio.wait_for(wait_for_seller_window(handle), timeout):
                raise RuntimeError("the workflow closed before waiting for the seller")
            await on_waiting()
        if decision is not None:
            if not await asyncio.wait_for(wait_for_seller_window(handle), timeout):
                raise RuntimeError("the workflow closed before waiting for the seller")
            timing.decided = time.time()
            while True:
                try:
                    await side.decide(handle, request, decision)
                    break
                except WorkflowUpdateFailedError:
                    # Refused (not pending yet): counted, since a rejected update is an action.
                    timing.rejected_updates += 1
                    if timing.rejected_updates > 50:
                        raise
                    await asyncio.sleep(0.02)
        result = await asyncio.wait_for(handle.result(), timeout)
        timing.ended = time.time()
        timing.status = await side.status(result)
    except Exception as err:  # reported per side; a failed cancellation must not stop the run
        timing.error = f"{type(err).__name__}: {err}"
    return timing


@dataclass
class SideRun:
    timings: list[Timing] = field(default_factory=list)
    began: float = 0.0
    finished: float = 0.0


async def run_units(
    side: Side,
    units: Sequence[Unit],
    *,
    concurrency: int,
    on_done: Callable[[Timing], None] | None = None,
    timeout: float = 300,
) -> SideRun:
    """Every unit, at most `concurrency` workflows in flight (at least 2, a coupon unit's two);
    interleaved in the given order."""
    slots = Slots(max(concurrency, 2))
    run = SideRun(began=time.time())
    tasks: list[asyncio.Task[None]] = []

    async def one(unit: Unit, request: RequestCancellationInput) -> None:
        held = True

        async def free() -> None:
            nonlocal held
            if held:
                held = False
                await slots.release(1)

        try:
            timing = await run_request(side, unit, request, timeout, on_waiting=free)
            run.timings.append(timing)
            if on_done is not None:
                on_done(timing)
        finally:
            await free()

    async def in_turn(unit: Unit) -> None:
        # A coupon order's sub-orders one after the other: a sibling that decides while the
        # other still refunds waits for it (`coupon_settled`), one that decides after does
        # not, so cancelling both at once would give each a shape that depends on timing,
        # and the limit could not reproduce it. The restore-exactly-once race is the chaos
        # run's and the ledger tests' to prove, not the bench's.
        for request in unit.requests:
            await one(unit, request)

    for unit in units:
        await slots.acquire(len(unit.requests))
        if len(unit.requests) > 1:
            tasks.append(asyncio.create_task(in_turn(unit)))
            continue
        for request in unit.requests:
            tasks.append(asyncio.create_task(one(unit, request)))
    await asyncio.gather(*tasks)
    run.finished = time.time()
    return run
