"""Record one `OrderCancellation` history per path into tests/histories/ for the replay test.

    .venv/bin/python -m tests.record_histories                   # refuses to overwrite
    .venv/bin/python -m tests.record_histories --tag <patch-id>  # instant.<patch-id>.json, ...
    .venv/bin/python -m tests.record_histories --missing         # only paths with no file yet

Starts its own headless Temporal dev server and embedded PostgreSQL in a temporary directory,
runs the product's worker (`workers.worker.build_worker`) against them, drives one cancellation
down each path and saves its history (`handle.fetch_history().to_json()`). Nothing is left
running. When to record, and why never over a file already there: docs/workflow-changes.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from temporalio.client import Client, WorkflowHandle

from devstack.embedded import EmbeddedPostgres, TemporalDevServer, free_port
from domain.models import (
    CancellationReason,
    CancellationResult,
    CancellationStatus,
    CancellationView,
    CaptureState,
    Decision,
    OperatorDecision,
    PaymentEvent,
    PaymentEventType,
    PaymentMethod,
    PaymentValidation,
    RequestCancellationInput,
    RetryRefundRequest,
    SellerDecision,
    TimeoutPolicy,
    WithdrawRequest,
)
from domain.orders import CheckoutOrderIn, OrderLine, OrdersFile, PaymentIn, SubOrderIn
from infra.client import connect
from infra.settings import Settings
from ledger.db import create_pool, migrate
from ledger.orders import load_orders
from ledger.policies import set_policy
from ledger.repository import Ledger
from payments.provider import SimulatedProvider, SimulatorFaults
from starter.payment_events import forward_payment_event
from starter.requests import start_cancellation
from workers.worker import build_worker
from workflows.order_cancellation import OrderCancellation
from workflows.search_attributes import CLI_TYPES

HISTORIES = Path(__file__).resolve().parent / "histories"

# The paths the replay test requires (tests/test_replay.py imports this).
PATHS = (
    "instant",
    "accepted_update",
    "accepted_signal",
    "rejected",
    "timed_out",
    "withdrawn",
    "escalated_resolved",
    "refund_failed_retried",
    "refused_signal",
    "pending_then_webhook",
    "reversed_reopened",
    "withdrawn_then_decided",
)

SELLER = "S-1"
BUYER = "B-1"
WINDOW = timedelta(seconds=2)
# The seller of the paths that wait out the window: WINDOW is its policy (R19), not the request's.
SLOW_SELLER = "S-2"
SLOW_PATHS = ("timed_out", "escalated_resolved")


def _seller(path: str) -> str:
    return SLOW_SELLER if path in SLOW_PATHS else SELLER


# The provider's poll interval on the slow-poll queue: only its webhook ends the wait early.
SLOW_POLL = timedelta(hours=1)

Handle = WorkflowHandle[Any, CancellationResult]


def _order(path: str) -> CheckoutOrderIn:
    instant = path == "instant"
    return CheckoutOrderIn(
        order_id=f"H-{path}",
        buyer_id=BUYER,
        currency="EUR",
        placed_at=datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
        payment=PaymentIn(
            payment_id=f"P-{path}",
            method=PaymentMethod.CARD,
            validation=PaymentValidation.UNVALIDATED if instant else PaymentValidation.VALIDATED,
            capture=CaptureState.AUTHORIZED if instant else CaptureState.CAPTURED,
        ),
        sub_orders=[
            SubOrderIn(
                seller_id=_seller(path),
                seller_accepted=not instant,
                shipping_minor=300,
                lines=[OrderLine(sku="SKU-1", quantity=1, unit_price_minor=1999)],
            )
        ],
    )


class Recorder:
    def __init__(
        self,
        client: Client,
        pool: asyncpg.Pool,
        queue: str,
        escalate_queue: str,
        slow_poll_queue: str,
        settings: Settings | None = None,
    ):
        self.client = client
        self.pool = pool
        self.settings = settings or Settings()
        self.provider = SimulatedProvider(pool)
        self.ledger = Ledger(pool)
        self.queue = queue
        self.escalate_queue = escalate_queue
        self.slow_poll_queue = slow_poll_queue

    async def start(self, path: str, *, queue: str | None = None, **kw: Any) -> Handle:
        request = RequestCancellationInput(
            order_id=f"H-{path}",
            seller_id=_seller(path),
            buyer_id=BUYER,
            reason=CancellationReason.OUT_OF_STOCK,
            **kw,
        )
        return await start_cancellation(self.client, request, task_queue=queue or self.queue)

    @staticmethod
    async def until(handle: Handle, status: CancellationStatus, timeout: float = 30) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            view: CancellationView = await handle.query(OrderCancellation.status)
            if view.status is status:
                return
            if loop.time() >= deadline:
                raise TimeoutError(f"{handle.id} is {view.status.value}, not {status.value}")
            await asyncio.sleep(0.1)

    @staticmethod
    async def until_timer(handle: Handle, duration: timedelta, timeout: float = 30) -> None:
        """Until the workflow has started a durable timer of `duration`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            history = await handle.fetch_history()
            if any(
                e.HasField("timer_started_event_attributes")
                and e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta() == duration
                for e in history.events
            ):
                return
            if loop.time() >= deadline:
                raise TimeoutError(f"{handle.id} started no timer")
            await asyncio.sleep(0.1)

    # --- one coroutine per path; each returns the handle of a finished cancellation -------

    async def instant(self) -> Handle:
        return await self.start("instant")

    async def accepted_update(self) -> Handle:
        handle = await self.start("accepted_update")
        await self.until(handle, CancellationStatus.AWAITING_SELLER)
        await handle.execute_update(
            OrderCancellation.decide,
            SellerDecision(seller_id=SELLER, decision=Decision.ACCEPT, reason="out of stock"),
        )
        return handle

    async def accepted_signal(self) -> Handle:
        handle = await self.start("accepted_signal")
        await self.until(handle, CancellationStatus.AWAITING_SELLER)
        await handle.signal(
            OrderCancellation.seller_decision,
            SellerDecision(seller_id=SELLER, decision=Decision.ACCEPT, reason="ok"),
        )
        return handle

    async def rejected(self) -> Handle:
        handle = await self.start("rejected")
        await self.until(handle, CancellationStatus.AWAITING_SELLER)
        await handle.execute_update(
            OrderCancellation.decide,
            SellerDecision(seller_id=SELLER, decision=Decision.REJECT, reason="already shipped"),
        )
        return handle

    async def timed_out(self) -> Handle:
        return await self.start("timed_out")

    async def withdrawn(self) -> Handle:
        handle = await self.start("withdrawn")
        await self.until(handle, CancellationStatus.AWAITING_SELLER)
        await handle.signal(
            OrderCancellation.withdraw, WithdrawRequest(buyer_id=BUYER, reason="found it")
        )
        return handle

    async def escalated_resolved(self) -> Handle:
        handle = await self.start("escalated_resolved", queue=self.escalate_queue)
        await self.until(handle, CancellationStatus.ESCALATED)
        await handle.execute_update(
            OrderCancellation.resolve_escalation,
            OperatorDecision(operator_id="OP-1", decision=Decision.ACCEPT, reason="seller away"),
        )
        return handle

    async def refund_failed_retried(self) -> Handle:
        payment = "P-refund_failed_retried"
        await self.provider.set_faults(payment, SimulatorFaults(final_failure="card_closed"))
        handle = await self.start("refund_failed_retried")
        await self.until(handle, CancellationStatus.AWAITING_SELLER)
        await handle.execute_update(
            OrderCancellation.decide,
            SellerDecision(seller_id=SELLER, decision=Decision.ACCEPT, reason="ok"),
        )
        await self.until(handle, CancellationStatus.REFUND_FAILED)
        await self.provider.set_faults(payment, SimulatorFaults())
        await handle.execute_update(
            OrderCancellation.retry_refund,
            RetryRefundRequest(operator_id="OP-1", reason="card replaced"),
        )
        return handle

    async def pending_then_webhook(self) -> Handle:
        # The provider answers "pending" once; the workflow's hour-long wait is cut short by
        # the provider's webhook event.
        payment = "P-pending_then_webhook"
        await self.provider.set_faults(payment, SimulatorFaults(confirm_after_polls=1))
        handle = await self.start("pending_then_webhook", queue=self.slow_poll_queue)
        await self.until(handle, CancellationStatus.AWAITING_SELLER)
        await handle.execute_update(
            OrderCancellation.decide,
            SellerDecision(seller_id=SELLER, decision=Decision.ACCEPT, reason="ok"),
        )
        await self.until(handle, CancellationStatus.REFUND_SUBMITTED)
        # Sent once the hour-long wait has begun: sent earlier, the event would find the
        # provider's "pending" answer still on its way and no wait would start at all.
        await self.until_timer(handle, SLOW_POLL)
        refund = await self.ledger.get_refund(cancellation_id=handle.id)
        await handle.signal(
            OrderCancellation.payment_event,
            PaymentEvent(
                event_id="evt_pending_then_webhook",
                type=PaymentEventType.REFUND_CONFIRMED,
                provider_ref=refund.view.provider_ref,
            ),
        )
        return handle

    async def reversed_reopened(self) -> Handle:
        # Completed, then the provider reverses the refund: a new run parks it, an operator
        # retries, a second refund completes it. The new run's history is the one kept.
        payment = "P-reversed_reopened"
        await self.provider.set_faults(payment, SimulatorFaults(fail_after_success=True))
        first = await self.start("reversed_reopened")
        await self.until(first, CancellationStatus.AWAITING_SELLER)
        await first.execute_update(
            OrderCancellation.decide,
            SellerDecision(seller_id=SELLER, decision=Decision.ACCEPT, reason="ok"),
        )
        await first.result()
        refund = await self.ledger.get_refund(cancellation_id=first.id)
        await forward_payment_event(
            self.client,
            self.ledger,
            PaymentEvent(
                event_id="evt_reversed_reopened",
                type=PaymentEventType.REFUND_REVERSED,
                provider_ref=refund.view.provider_ref,
                failure_code="card_closed",
            ),
            task_queue=self.queue,
        )
        reopened = self.client.get_workflow_handle_for(OrderCancellation.run, first.id)
        await self.until(reopened, CancellationStatus.REFUND_FAILED)
        await reopened.execute_update(
            OrderCancellation.retry_refund,
            RetryRefundRequest(operator_id="OP-1", reason="new card"),
        )
        return reopened

    async def withdrawn_then_decided(self) -> Handle:
        """The buyer's withdrawal and the seller's acceptance in one workflow task: withdrawn,
        the acceptance refused. Both signals are sent while no worker polls its queue, so the
        next task sees them together."""
        queue = f"{self.queue}-paused"
        handle = await self.start("withdrawn_then_decided", queue=queue)
        async with build_worker(self.client, self.pool, self.settings, task_queue=queue):
            await self.until(handle, CancellationStatus.AWAITING_SELLER)
        await handle.signal(
            OrderCancellation.withdraw, WithdrawRequest(buyer_id=BUYER, reason="found it")
        )
        await handle.signal(
            OrderCancellation.seller_decision,
            SellerDecision(seller_id=SELLER, decision=Decision.ACCEPT, reason="too late"),
        )
        async with build_worker(self.client, self.pool, self.settings, task_queue=queue):
            await asyncio.wait_for(handle.result(), 60)
        return handle

    async def refused_signal(self) -> Handle:
        handle = await self.start("refused_signal")
        await self.until(handle, CancellationStatus.AWAITING_SELLER)
        # Another seller, then a malformed payload: both recorded and ignored.
        await handle.signal(
            OrderCancellation.seller_decision,
            SellerDecision(seller_id="S-OTHER", decision=Decision.ACCEPT, reason="not mine"),
        )
        await handle.signal("seller_decision", {"seller_id": SELLER, "decision": "maybe"})
        await handle.signal(
            OrderCancellation.seller_decision,
            SellerDecision(seller_id=SELLER, decision=Decision.ACCEPT, reason="ok"),
        )
        return handle


async def record(
    out_dir: Path, tag: str | None, overwrite: bool, missing_only: bool = False
) -> list[Path]:
    suffix = f".{tag}" if tag else ""
    targets = {path: out_dir / f"{path}{suffix}.json" for path in PATHS}
    if missing_only:
        targets = {path: target for path, target in targets.items() if not target.exists()}
    existing = [t for t in targets.values() if t.exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"refusing to overwrite {', '.join(t.name for t in existing)}: recorded histories are "
            "kept (docs/workflow-changes.md); use --tag <patch-id> for new files"
        )
    with tempfile.TemporaryDirectory(prefix="record-histories-") as tmp:
        postgres = EmbeddedPostgres(Path(tmp) / "pg")
        url = postgres.start()
        try:
            server = TemporalDevServer(
                port=free_port(), ui_port=None, db_file=None, search_attributes=CLI_TYPES
            )
            async with server:
                return await _record_on(server.address, url, targets)
        finally:
            postgres.stop()


async def _record_on(address: str, url: str, targets: dict[str, Path]) -> list[Path]:
    pool = await create_pool(url, min_size=1, max_size=10)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        await load_orders(pool, OrdersFile(orders=[_order(path) for path in targets]))
        client = await connect(address)
        settings = Settings(
            refund_poll_interval=timedelta(milliseconds=200),
            refund_poll_max_interval=timedelta(seconds=1),
            refund_submit_initial_interval=timedelta(milliseconds=100),
            refund_submit_max_interval=timedelta(milliseconds=500),
            refund_submit_max_attempts=3,
            seller_response_window_floor=WINDOW,
        )
        await set_policy(pool, seller_id=SLOW_SELLER, response_window=WINDOW, floor=WINDOW)
        queue, escalate_queue, slow_poll_queue = (
            f"record-{uuid.uuid4().hex[:8]}" for _ in range(3)
        )
        recorder = Recorder(client, pool, queue, escalate_queue, slow_poll_queue, settings)
        async with (
            build_worker(client, pool, settings, task_queue=queue),
            build_worker(
                client,
                pool,
                settings.model_copy(update={"timeout_policy": TimeoutPolicy.ESCALATE}),
                task_queue=escalate_queue,
            ),
            build_worker(
                client,
                pool,
                settings.model_copy(
                    update={
                        "refund_poll_interval": SLOW_POLL,
                        "refund_poll_max_interval": SLOW_POLL,
                    }
                ),
                task_queue=slow_poll_queue,
            ),
        ):
            scenarios: dict[str, Callable[[], Awaitable[Handle]]] = {
                path: getattr(recorder, path) for path in targets
            }
            handles = await asyncio.gather(*(run() for run in scenarios.values()))
            written = []
            for path, handle in zip(scenarios, handles, strict=True):
                outcome = await asyncio.wait_for(handle.result(), 60)
                history = await handle.fetch_history()
                targets[path].parent.mkdir(parents=True, exist_ok=True)
                targets[path].write_text(history.to_json() + "\n")
                written.append(targets[path])
                print(
                    f"{targets[path].name}: {outcome.status.value} ({len(history.events)} events)"
                )
            return written
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HISTORIES)
    parser.add_argument("--tag", help="save as <path>.<tag>.json, keeping the older files")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files of the same name (only histories no released code produced)",
    )
    parser.add_argument(
        "--missing", action="store_true", help="record only the paths that have no file yet"
    )
    args = parser.parse_args(argv)
    # The refund path fails activities on purpose; their tracebacks are noise here.
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(record(args.out, args.tag, args.overwrite, args.missing))


if __name__ == "__main__":
    main()
