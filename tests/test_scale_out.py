"""Scale-out and shutdown, with real `ordercancel worker` processes on one task queue of a real
Temporal dev server and a real PostgreSQL (issue 8, "proven here").

1. Two worker processes share a batch of cancellations; both run activities. One is killed
   (SIGKILL) mid-batch while it holds an activity and the workflows it has cached; the other
   finishes everything, and every cancellation is refunded exactly once (ledger and provider).
   Worker A connects through TEMPORAL_ADDRESS, worker B through a client profile file only.
2. SIGTERM while a provider call runs: the worker drains it within the grace period, exits 0,
   and the refund is submitted once; a new worker finishes the cancellation without a second one.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers.wait import eventually
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowHandle

from domain.models import (
    CancellationReason,
    CancellationResult,
    CancellationStatus,
    Decision,
    RequestCancellationInput,
    SellerDecision,
)
from domain.rules import cancellation_id
from infra.client import connect
from ledger.db import create_pool
from ledger.orders import load_orders, parse_orders_file
from starter.requests import start_cancellation
from tools.worker_process import WorkerProcess, ordercancel_worker
from workers.worker import GRACEFUL_SHUTDOWN
from workflows.order_cancellation import OrderCancellation

pytestmark = pytest.mark.e2e

BATCH = 30  # half instant path, half accepted by the seller


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class Cluster:
    address: str
    client: Client
    tmp: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    async def start_worker(
        self, name: str, database_url: str, task_queue: str, **env: str
    ) -> WorkerProcess:
        """A ready worker on `task_queue`; `env` adds or overrides settings, an empty value
        removes one. Nothing is inherited from this process's TEMPORAL_*/ORDERCANCEL_*."""
        worker = ordercancel_worker(
            name,
            log_dir=self.tmp,
            settings={
                "DATABASE_URL": database_url,
                "TEMPORAL_ADDRESS": self.address,
                "ORDERCANCEL_TASK_QUEUE": task_queue,
                "ORDERCANCEL_REFUND_POLL_INTERVAL": "200ms",
                "ORDERCANCEL_SIM_CONFIRM_AFTER_POLLS": "0",
                **env,
            },
        )
        self.workers.append(worker)
        return await worker.start(ready_within=30)


@pytest.fixture
async def cluster(temporal_address: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(temporal_address, await connect(temporal_address), tmp_path)
    try:
        yield cluster
    finally:
        for worker in cluster.workers:
            await worker.kill()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=8)
    try:
        yield pool
    finally:
        await pool.close()


def order(order_id: str, *, instant: bool) -> dict[str, Any]:
    """One checkout order, one seller: unvalidated and not accepted -> instant path (R1);
    validated and captured -> the seller decides."""
    return {
        "order_id": order_id,
        "buyer_id": f"B-{order_id}",
        "currency": "EUR",
        "placed_at": "2026-03-10T10:00:00Z",
        "payment": {
            "payment_id": f"P-{order_id}",
            "method": "card",
            "validation": "unvalidated" if instant else "validated",
            "capture": "authorized" if instant else "captured",
        },
        "sub_orders": [
            {
                "seller_id": "S-1",
                "seller_accepted": not instant,
                "shipping_minor": 300,
                "lines": [{"sku": "SKU-1", "quantity": 1, "unit_price_minor": 1999}],
            }
        ],
    }


async def load(pool: asyncpg.Pool, orders: list[dict[str, Any]]) -> None:
    await load_orders(pool, parse_orders_file(json.dumps({"orders": orders})))


async def start(
    client: Client, order_id: str, task_queue: str
) -> WorkflowHandle[Any, CancellationResult]:
    request = RequestCancellationInput(
        order_id=order_id,
        seller_id="S-1",
        buyer_id=f"B-{order_id}",
        reason=CancellationReason.ORDERED_BY_MISTAKE,
    )
    return await start_cancellation(client, request, task_queue=task_queue)


async def count(client: Client, query: str) -> int:
    return (await client.count_workflows(query)).count


async def activity_starts(handle: WorkflowHandle[Any, Any]) -> list[tuple[str, str, int]]:
    """(activity type, worker identity, attempt) of each activity the history records as run."""
    history = await handle.fetch_history()
    scheduled: dict[int, str] = {}
    starts = []
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            scheduled[event.event_id] = attrs.activity_type.name
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            starts.append(
                (scheduled[started.scheduled_event_id], started.identity, started.attempt)
            )
    return starts


async def assert_refunded_once(pool: asyncpg.Pool, ids: list[str]) -> None:
    """One refund per cancellation in the ledger, one at the provider per idempotency key, and
    no audit event twice."""
    ledger = await pool.fetch(
        "SELECT cancellation_id, idempotency_key, provider_ref, stage FROM refunds"
        " WHERE cancellation_id = ANY($1::text[])",
        ids,
    )
    assert sorted(r["cancellation_id"] for r in ledger) == sorted(ids)
    assert {r["stage"] for r in ledger} == {"confirmed"}
    keys = [r["idempotency_key"] for r in ledger]
    provider = await pool.fetch(
        "SELECT idempotency_key, provider_ref FROM provider_sim.refunds"
        " WHERE idempotency_key = ANY($1::text[])",
        keys,
    )
    assert sorted(p["idempotency_key"] for p in provider) == sorted(keys)
    assert {p["provider_ref"] for p in provider} == {r["provider_ref"] for r in ledger}
    twice = await pool.fetch(
        "SELECT cancellation_id, kind, count(*) FROM cancellation_events"
        " WHERE cancellation_id = ANY($1::text[]) GROUP BY 1, 2 HAVING count(*) > 1",
        ids,
    )
    assert not twice, twice


# --- two workers, one killed -----------------------------------------------------------------


async def test_two_worker_processes_share_a_batch_and_survive_a_kill(
    cluster: Cluster, pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    task_queue = f"scale-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:6]
    held = f"SO-{tag}-HELD"
    instant = [f"SO-{tag}-I{i}" for i in range(BATCH // 2)]
    accepted = [f"SO-{tag}-A{i}" for i in range(BATCH // 2)]
    await load(
        pool,
        [order(held, instant=True)]
        + [order(o, instant=True) for o in instant]
        + [order(o, instant=False) for o in accepted],
    )

    # Worker B alone first, connected through a client profile file (no TEMPORAL_ADDRESS). It
    # takes the first cancellation, whose opening blocks on a row lock this test holds: B will
    # die with that activity in flight.
    profile = tmp_path / "temporal.toml"
    profile.write_text(f'[profile.scale]\naddress = "{cluster.address}"\nnamespace = "default"\n')
    b = await cluster.start_worker(
        "worker-b",
        database_url,
        task_queue,
        TEMPORAL_ADDRESS="",
        TEMPORAL_CONFIG_FILE=str(profile),
        TEMPORAL_PROFILE="scale",
    )
    lock = await pool.acquire()
    lock_tx = lock.transaction()
    await lock_tx.start()
    await lock.execute("SELECT 1 FROM sub_orders WHERE order_id = $1 FOR UPDATE", held)
    held_handle = await start(cluster.client, held, task_queue)

    async def b_holds_the_opening() -> None:
        pending = (await held_handle.describe()).raw_description.pending_activities
        assert [(p.activity_type.name, p.state, p.last_worker_identity) for p in pending] == [
            ("open_cancellation", PendingActivityState.PENDING_ACTIVITY_STATE_STARTED, b.identity)
        ]

    await eventually(b_holds_the_opening, timeout=15)

    # Worker A joins; the batch is shared.
    a = await cluster.start_worker("worker-a", database_url, task_queue)
    handles = [await start(cluster.client, o, task_queue) for o in instant + accepted]
    instant_ids = [cancellation_id(o, "S-1") for o in instant]
    accepted_ids = [cancellation_id(o, "S-1") for o in accepted]

    # Mid-batch: the instant half is done, the other half waits for its sellers (on timers,
    # cached by whichever worker ran them).
    async def half_done() -> None:
        done = await count(
            cluster.client, f'TaskQueue="{task_queue}" AND ExecutionStatus="Completed"'
        )
        waiting = await count(
            cluster.client,
            f'TaskQueue="{task_queue}" AND CancellationStatus="awaiting_seller"',
        )
        assert (done, waiting) == (len(instant), len(accepted))

    await eventually(half_done, timeout=30)
    ran_by = {h.id: {identity for _, identity, _ in await activity_starts(h)} for h in handles}
    assert set().union(*ran_by.values()) == {a.identity, b.identity}, "both ran activities"
    # Cancellations B started and has cached, waiting for their sellers: they must move to A.
    on_b = [wid for wid in accepted_ids if ran_by[wid] == {b.identity}]
    assert on_b, ran_by

    b.proc.send_signal(signal.SIGKILL)
    assert await b.proc.wait() == -signal.SIGKILL
    await lock_tx.rollback()
    await pool.release(lock)

    for order_id in accepted:
        handle = cluster.client.get_workflow_handle(cancellation_id(order_id, "S-1"))
        await handle.signal(
            OrderCancellation.seller_decision,
            SellerDecision(seller_id="S-1", decision=Decision.ACCEPT, reason="sorry"),
        )

    # Everything completes on A alone: B's cached workflows move over (its sticky queue times
    # out), and the opening B held is retried once its start-to-close timeout expires.
    results = await asyncio.wait_for(
        asyncio.gather(held_handle.result(), *(h.result() for h in handles)), timeout=60
    )
    assert {r.status for r in results} == {CancellationStatus.COMPLETED}
    all_ids = [cancellation_id(held, "S-1"), *instant_ids, *accepted_ids]
    await assert_refunded_once(pool, all_ids)

    opening = [s for s in await activity_starts(held_handle) if s[0] == "open_cancellation"]
    assert len(opening) == 1 and opening[0][1] == a.identity and opening[0][2] >= 2, opening
    for wid in on_b:
        starts = await activity_starts(cluster.client.get_workflow_handle(wid))
        identities = [identity for _, identity, _ in starts]
        last_on_b = len(identities) - identities[::-1].index(b.identity)
        after = starts[last_on_b:]  # the refund and the coupon, after the seller accepted
        assert {identity for _, identity, _ in after} == {a.identity}, starts
        # The lean shape (lean-shape-v1): the provider call, and the coupon with the completion.
        assert {"submit_refund_and_confirm", "complete_with_coupon"} <= {
            name for name, _, _ in after
        }, starts
    assert a.proc.returncode is None and await a.ready()


# --- SIGTERM drains ----------------------------------------------------------------------------


async def test_sigterm_drains_a_running_provider_call(
    cluster: Cluster, pool: asyncpg.Pool, database_url: str
) -> None:
    task_queue = f"drain-{uuid.uuid4().hex[:8]}"
    order_id = f"SO-{uuid.uuid4().hex[:6]}-DRAIN"
    await load(pool, [order(order_id, instant=True)])
    slow = await cluster.start_worker(
        "worker-slow", database_url, task_queue, ORDERCANCEL_SIM_LATENCY="3s"
    )
    handle = await start(cluster.client, order_id, task_queue)

    async def submitting() -> None:
        pending = (await handle.describe()).raw_description.pending_activities
        assert [(p.activity_type.name, p.state) for p in pending] == [
            ("submit_refund_and_confirm", PendingActivityState.PENDING_ACTIVITY_STATE_STARTED)
        ]

    await eventually(submitting, timeout=15, interval=0.05)
    sent = time.monotonic()
    slow.proc.send_signal(signal.SIGTERM)
    # Not ready any more while it drains (the rollout and the PDB see it go).

    async def not_ready() -> None:
        assert not await slow.ready()

    await eventually(not_ready, timeout=2, interval=0.05)
    code = await asyncio.wait_for(slow.proc.wait(), GRACEFUL_SHUTDOWN.total_seconds() + 10)
    took = time.monotonic() - sent
    assert code == 0, slow.log_tail()
    assert took < GRACEFUL_SHUTDOWN.total_seconds(), took
    log = slow.log.read_text()
    assert "worker_draining" in log and "worker_stopped" in log

    # The call that was running finished and was recorded, once.
    refund = await pool.fetchrow(
        "SELECT idempotency_key, stage, provider_ref FROM refunds WHERE cancellation_id = $1",
        handle.id,
    )
    # A void: the provider answers at once, so the submit also recorded the confirmation.
    assert refund is not None and refund["stage"] == "confirmed" and refund["provider_ref"]
    calls = await pool.fetch(
        "SELECT outcome FROM provider_sim.calls"
        " WHERE idempotency_key = $1 AND operation = 'create_refund'",
        refund["idempotency_key"],
    )
    assert [c["outcome"] for c in calls] == ["created"]
    submits = [s for s in await activity_starts(handle) if s[0] == "submit_refund_and_confirm"]
    assert submits == [("submit_refund_and_confirm", slow.identity, 1)]

    # A new worker picks the cancellation up where it stopped: no second submission.
    await cluster.start_worker("worker-next", database_url, task_queue)
    result = await asyncio.wait_for(handle.result(), 30)
    assert result.status is CancellationStatus.COMPLETED
    await assert_refunded_once(pool, [handle.id])
    calls = await pool.fetch(
        "SELECT outcome FROM provider_sim.calls"
        " WHERE idempotency_key = $1 AND operation = 'create_refund'",
        refund["idempotency_key"],
    )
    assert [c["outcome"] for c in calls] == ["created"]
