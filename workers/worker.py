"""The worker: composition root for `ordercancel worker` (settings -> pool -> client -> worker)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from datetime import timedelta

import asyncpg
import structlog
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.ledger_activities import LedgerActivities
from activities.refund_activities import RefundActivities
from infra.settings import Settings
from ledger.repository import Ledger
from payments.provider import PaymentProvider, SimulatedProvider
from workflows.order_cancellation import OrderCancellation

log = structlog.get_logger(__name__)

WORKFLOWS: Sequence[type] = (OrderCancellation,)

# The product's own pure modules and heavy libraries are passed through the sandbox: they are
# deterministic or only used by activities, and re-importing them per workflow costs 5-12x CPU.
PASSTHROUGH = (
    "domain",
    "activities",
    "ledger",
    "payments",
    "pydantic",
    "pydantic_core",
    "asyncpg",
    "structlog",
)


def workflow_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
    )


def build_provider(settings: Settings, pool: asyncpg.Pool) -> PaymentProvider:
    return SimulatedProvider(
        pool,
        latency_seconds=settings.sim_latency.total_seconds(),
        transient_rate=settings.sim_transient_rate,
        confirm_after_polls=settings.sim_confirm_after_polls,
    )


def build_worker(
    client: Client,
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    provider: PaymentProvider | None = None,
    task_queue: str | None = None,
    max_cached_workflows: int = 1000,
) -> Worker:
    ledger = Ledger(pool)
    ledger_activities = LedgerActivities(
        ledger,
        response_window=settings.seller_response_window,
        timeout_policy=settings.timeout_policy,
        refund_policy=settings.refund_policy(),
    )
    refund_activities = RefundActivities(ledger, provider or build_provider(settings, pool))
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=list(WORKFLOWS),
        activities=[
            ledger_activities.open_cancellation,
            ledger_activities.record_transition,
            ledger_activities.record_event,
            ledger_activities.request_refund,
            ledger_activities.record_refund_failed,
            ledger_activities.restore_coupon,
            refund_activities.submit_refund,
            refund_activities.confirm_refund,
        ],
        workflow_runner=workflow_runner(),
        max_cached_workflows=max_cached_workflows,
        # SIGTERM drains: running activities get this long to finish before they are cancelled.
        graceful_shutdown_timeout=timedelta(seconds=20),
    )


async def run_worker(
    settings: Settings, client: Client, pool: asyncpg.Pool, stop: asyncio.Event | None = None
) -> None:
    """Run until `stop` is set, or SIGINT/SIGTERM, then shut down gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    worker = build_worker(client, pool, settings)
    log.info(
        "worker_started", task_queue=settings.task_queue, namespace=settings.temporal_namespace
    )
    async with worker:
        await stop.wait()
        log.info("worker_draining")
    log.info("worker_stopped")
