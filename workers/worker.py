"""The worker: composition root for `ordercancel worker` (settings -> pool -> client -> worker)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

import asyncpg
import structlog
from temporalio.client import Client
from temporalio.worker import (
    Interceptor,
    PollerBehavior,
    PollerBehaviorAutoscaling,
    PollerBehaviorSimpleMaximum,
    Worker,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.history_activities import HistoryActivities
from activities.ledger_activities import LedgerActivities
from activities.refund_activities import RefundActivities
from infra.log_context import LogContextInterceptor
from infra.metrics import BusinessMetrics
from infra.settings import Settings
from infra.tracing import traced_provider
from ledger.repository import Ledger
from payments.provider import PaymentProvider, SimulatedProvider
from workers.health import serve_health
from workflows.order_cancellation import OrderCancellation

log = structlog.get_logger(__name__)

WORKFLOWS: Sequence[type] = (OrderCancellation,)
# SIGTERM drains: running activities get this long to finish before they are cancelled. The
# deployment's grace period must be longer (deploy/k8s, tests/test_deploy.py).
GRACEFUL_SHUTDOWN = timedelta(seconds=20)

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
    # The tracing interceptor's workflow side (infra/tracing.py) uses the one OpenTelemetry
    # context of the process.
    "opentelemetry",
    # The workflow's helper modules: functions and constants, no state of their own (the
    # workflow's state is its instance's). Not the `workflows` package as a whole: the workflow
    # module itself is the sandbox's to check. The workflow imports them under
    # `imports_passed_through`, but `from workflows import steps` reached them through the
    # package, which the sandbox re-imports per workflow run, and so re-executed them too.
    "workflows.handlers",
    "workflows.messages",
    "workflows.search_attributes",
    "workflows.steps",
    "workflows.visibility",
)


def workflow_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
    )


def build_provider(settings: Settings, pool: asyncpg.Pool) -> PaymentProvider:
    if settings.provider == "stripe":
        from payments.stripe_provider import StripeProvider

        return StripeProvider.from_settings(settings)
    return SimulatedProvider(
        pool,
        latency_seconds=settings.sim_latency.total_seconds(),
        transient_rate=settings.sim_transient_rate,
        confirm_after_polls=settings.sim_confirm_after_polls,
    )


def poller_behavior(pollers: int | Literal["auto"]) -> PollerBehavior:
    """A poller setting (`Settings.worker_*_task_pollers`) as the SDK's behaviour."""
    if pollers == "auto":
        return PollerBehaviorAutoscaling()
    return PollerBehaviorSimpleMaximum(maximum=pollers)


def worker_tuning(settings: Settings) -> dict[str, Any]:
    """The `Worker` options `settings.worker_*` set: cache, pollers, concurrency (unset
    concurrency: the SDK's own)."""
    return {
        "max_cached_workflows": settings.worker_max_cached_workflows,
        "workflow_task_poller_behavior": poller_behavior(settings.worker_workflow_task_pollers),
        "activity_task_poller_behavior": poller_behavior(settings.worker_activity_task_pollers),
        "max_concurrent_workflow_tasks": settings.worker_max_concurrent_workflow_tasks,
        "max_concurrent_activities": settings.worker_max_concurrent_activities,
    }


def build_worker(
    client: Client,
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    provider: PaymentProvider | None = None,
    task_queue: str | None = None,
    interceptors: Sequence[Interceptor] = (),
    metrics: BusinessMetrics | None = None,
) -> Worker:
    """The product's worker. Tuning (cache, pollers, concurrency) from `settings.worker_*`.
    `provider`, `task_queue`: the settings' unless given. `interceptors`: after the log
    context's. `metrics`: by default, through the client's runtime (a no-op unless that runtime
    exports metrics, see infra.metrics)."""
    ledger = Ledger(pool)
    metrics = metrics or BusinessMetrics.for_client(client)
    ledger_activities = LedgerActivities(
        ledger,
        response_window=settings.seller_response_window,
        window_floor=settings.seller_response_window_floor,
        timeout_policy=settings.timeout_policy,
        refund_policy=settings.refund_policy(),
        metrics=metrics,
        client=client,
    )
    history_activities = HistoryActivities(client)
    # While tracing is on (infra.tracing), each provider call is a span.
    refund_activities = RefundActivities(
        ledger, traced_provider(provider or build_provider(settings, pool)), metrics=metrics
    )
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=list(WORKFLOWS),
        activities=[
            ledger_activities.open_cancellation,
            history_activities.signals_before,
            ledger_activities.record_transition,
            ledger_activities.record_event,
            ledger_activities.request_refund,
            ledger_activities.record_refund_failed,
            ledger_activities.restore_coupon,
            ledger_activities.approve_and_request_refund,
            ledger_activities.complete_with_coupon,
            refund_activities.submit_refund_and_confirm,
            refund_activities.submit_refund,
            refund_activities.confirm_refund,
            refund_activities.verify_reversal,
        ],
        workflow_runner=workflow_runner(),
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        # Every log line of an activity or workflow carries the cancellation's ids.
        interceptors=[LogContextInterceptor(), *interceptors],
        **worker_tuning(settings),
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
    log.info("worker_started", task_queue=settings.task_queue, namespace=client.namespace)
    # Probes (workers/health.py) answer through the drain: ready only while polling, not stopping.
    async with serve_health(lambda: worker.is_running and not stop.is_set()), worker:
        await stop.wait()
        log.info("worker_draining")
    log.info("worker_stopped")
