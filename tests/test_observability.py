"""What operations see, on the real dev server and PostgreSQL: every path of a cancellation,
read back through `describe()` and the `temporal` CLI; the four queries operations run every
day; the worker's JSON log lines; and its Prometheus endpoint (business and SDK metrics).

One worker runs the module's cancellations, started side by side: instant, accepted, rejected,
timed out (a 2 s window), withdrawn, refund failed (the provider refuses for good; two sellers,
so a query can pick one), coupon restored, and two still waiting for their seller.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers.logs import CapturedLogs, captured_logs
from helpers.orders import fast_refund_settings, one_seller_order, orders_file, unique
from helpers.policies import seller_window
from helpers.stacks import run_command
from helpers.wait import eventually, listed, wait_for_status
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowHandle

from devstack.embedded import free_port, temporal_binary
from domain.models import (
    CancellationReason,
    CancellationStatus,
    Decision,
    RequestCancellationInput,
    SellerDecision,
    WithdrawRequest,
)
from domain.rules import cancellation_id
from infra.client import connect
from infra.log_processors import redact_text
from infra.metrics import metrics_runtime
from ledger.db import create_pool
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from payments.provider import SimulatedProvider, SimulatorFaults
from starter.requests import start_cancellation
from workers.worker import build_worker
from workflows import search_attributes as sa
from workflows.order_cancellation import OrderCancellation
from workflows.visibility import STAGE_TEXT

pytestmark = pytest.mark.e2e

Handle = WorkflowHandle[Any, Any]


@dataclass
class Scenario:
    """One cancellation: who, how it is driven, and where it must end."""

    name: str
    order_id: str
    seller_id: str
    buyer_id: str
    final: CancellationStatus
    validated: bool = True
    coupon: bool = False
    window: timedelta | None = None
    handle: Handle | None = None

    @property
    def workflow_id(self) -> str:
        return cancellation_id(self.order_id, self.seller_id)


@dataclass
class World:
    address: str
    client: Client
    task_queue: str
    metrics_url: str
    database_url: str
    logs: CapturedLogs
    started_at: datetime
    scenarios: dict[str, Scenario] = field(default_factory=dict)

    def id(self, name: str) -> str:
        return self.scenarios[name].workflow_id

    def ids(self, *names: str) -> set[str]:
        return {self.id(n) for n in names}

    def scoped(self, query: str) -> str:
        """The query as operations type it, limited to this module's worker (the server may be
        a shared one, see TEMPORAL_ADDRESS)."""
        return f'({query}) AND TaskQueue="{self.task_queue}"'


def scenarios() -> list[Scenario]:
    """Unique ids per run: workflow ids are business keys, and a shared server remembers."""
    seller_a, seller_b = unique("S-OBS-A"), unique("S-OBS-B")
    # The window is the seller's policy (R19): a seller of its own per window.
    seller_2s, seller_20h = unique("S-OBS-T"), unique("S-OBS-L")
    buyer, other_buyer = unique("B-OBS"), unique("B-OBS-2")
    run = uuid.uuid4().hex[:6]
    S = CancellationStatus
    return [
        Scenario("instant", f"OI-{run}", seller_a, buyer, S.COMPLETED, validated=False),
        Scenario("accepted", f"OA-{run}", seller_a, buyer, S.COMPLETED),
        Scenario("rejected", f"OR-{run}", seller_a, other_buyer, S.REJECTED),
        Scenario(
            "timed_out",
            f"OT-{run}",
            seller_2s,
            other_buyer,
            S.COMPLETED,
            window=timedelta(seconds=2),
        ),
        Scenario("withdrawn", f"OW-{run}", seller_a, other_buyer, S.WITHDRAWN),
        Scenario("refund_failed", f"OF-{run}", seller_a, other_buyer, S.REFUND_FAILED),
        Scenario("refund_failed_b", f"OF2-{run}", seller_b, other_buyer, S.REFUND_FAILED),
        Scenario("coupon", f"OC-{run}", seller_a, other_buyer, S.COMPLETED, coupon=True),
        # Opened now with a 20 h window: its deadline is the one of a 48 h request that has
        # been waiting 28 h. The 48 h one has waited only seconds.
        Scenario(
            "waiting_28h",
            f"OL-{run}",
            seller_20h,
            other_buyer,
            S.AWAITING_SELLER,
            window=timedelta(hours=20),
        ),
        Scenario(
            "waiting_new",
            f"ON-{run}",
            seller_b,
            other_buyer,
            S.AWAITING_SELLER,
            window=timedelta(hours=48),
        ),
    ]


@pytest.fixture(scope="module")
async def world(temporal_address: str, e2e_database_url: str) -> AsyncIterator[World]:
    """The product's worker with its metrics on a free port and its logs captured as JSON."""
    port = free_port()
    runtime = metrics_runtime(f"127.0.0.1:{port}")
    client = await connect(temporal_address, runtime=runtime)
    pool = await create_pool(e2e_database_url, min_size=1, max_size=10)
    task_queue = f"obs-{uuid.uuid4().hex[:8]}"
    try:
        with captured_logs() as logs:
            async with build_worker(client, pool, fast_refund_settings(), task_queue=task_queue):
                w = World(
                    address=temporal_address,
                    client=client,
                    task_queue=task_queue,
                    metrics_url=f"http://127.0.0.1:{port}/metrics",
                    database_url=e2e_database_url,
                    logs=logs,
                    started_at=datetime.now(UTC),
                )
                await run_scenarios(w, pool)
                yield w
    finally:
        await pool.close()


async def run_scenarios(w: World, pool: Any) -> None:
    all_ = scenarios()
    text = orders_file(
        *(
            one_seller_order(
                s.order_id,
                buyer_id=s.buyer_id,
                seller_id=s.seller_id,
                validated=s.validated,
                coupon=s.coupon,
            )
            for s in all_
        )
    )
    await load_orders(pool, parse_orders_file(text))
    for s in all_:
        if s.final is CancellationStatus.REFUND_FAILED:
            await SimulatedProvider(pool).set_faults(
                f"P-{s.order_id}", SimulatorFaults(final_failure="card_closed")
            )
    for s in all_:
        if s.window is not None:
            await seller_window(pool, s.seller_id, s.window)
    for s in all_:
        s.handle = await start_cancellation(
            w.client,
            RequestCancellationInput(
                order_id=s.order_id,
                seller_id=s.seller_id,
                buyer_id=s.buyer_id,
                reason=CancellationReason.OUT_OF_STOCK,
            ),
            task_queue=w.task_queue,
            ledger=Ledger(pool),
        )
        w.scenarios[s.name] = s

    async def drive(s: Scenario) -> None:
        assert s.handle is not None
        if s.validated and s.name not in ("timed_out", "waiting_28h", "waiting_new"):
            await wait_for_status(s.handle, CancellationStatus.AWAITING_SELLER)
            if s.name == "withdrawn":
                await s.handle.signal(
                    OrderCancellation.withdraw,
                    WithdrawRequest(buyer_id=s.buyer_id, reason="found it cheaper"),
                )
            else:
                decision = Decision.REJECT if s.name == "rejected" else Decision.ACCEPT
                await s.handle.execute_update(
                    OrderCancellation.decide,
                    SellerDecision(seller_id=s.seller_id, decision=decision, reason="ok"),
                )
        await wait_for_status(s.handle, s.final, timeout=30)
        if s.final.is_terminal:
            # The status shows before the last ledger write (and its metrics) is done.
            await asyncio.wait_for(s.handle.result(), 30)

    await asyncio.gather(*(drive(s) for s in all_))


async def cli_list(w: World, query: str) -> set[str]:
    ran = await run_command(
        temporal_binary(),
        "workflow",
        "list",
        "--address",
        w.address,
        "--query",
        query,
        "--output",
        "json",
    )
    assert ran.returncode == 0, ran.stderr
    text = ran.stdout.strip()
    if not text:
        return set()
    rows = json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines()]
    return {row["execution"]["workflowId"] for row in rows}


async def assert_found(w: World, query: str, expected: set[str]) -> None:
    """Exactly `expected`, through the SDK and through `temporal workflow list`."""
    scoped = w.scoped(query)

    async def check() -> None:
        assert set(await listed(w.client, scoped)) == expected, query
        assert await cli_list(w, scoped) == expected, query

    await eventually(check)


async def current_details(handle: Handle) -> str:
    """What the Web UI shows as current details (`temporal workflow metadata` reads the same)."""
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return metadata.current_details


# --- search attributes and details, through describe() and the CLI ---------------------------


EXPECTED_ATTRIBUTES: dict[str, tuple[CancellationStatus, int, str | None, bool]] = {
    # name: (CancellationStatus, RefundStage, CouponOutcome, SellerDeadline set)
    "instant": (CancellationStatus.COMPLETED, 3, "no_coupon", False),
    "accepted": (CancellationStatus.COMPLETED, 3, "no_coupon", True),
    "rejected": (CancellationStatus.REJECTED, 0, None, True),
    "timed_out": (CancellationStatus.COMPLETED, 3, "no_coupon", True),
    "withdrawn": (CancellationStatus.WITHDRAWN, 0, None, True),
    "refund_failed": (CancellationStatus.REFUND_FAILED, 1, None, True),
    "coupon": (CancellationStatus.COMPLETED, 3, "restored", True),
    "waiting_28h": (CancellationStatus.AWAITING_SELLER, 0, None, True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ATTRIBUTES))
async def test_search_attributes_and_details_follow_each_path(world: World, name: str) -> None:
    s = world.scenarios[name]
    assert s.handle is not None
    status, stage, coupon, has_deadline = EXPECTED_ATTRIBUTES[name]

    async def described() -> Any:
        desc = await s.handle.describe()  # type: ignore[union-attr]
        attrs = desc.typed_search_attributes
        assert attrs.get(sa.CANCELLATION_STATUS) == status.value
        return desc

    desc = await eventually(described)
    attrs = desc.typed_search_attributes
    assert attrs.get(sa.ORDER_ID) == s.order_id
    assert attrs.get(sa.SELLER_ID) == s.seller_id
    assert attrs.get(sa.BUYER_ID) == s.buyer_id
    assert attrs.get(sa.REFUND_STAGE) == stage
    assert attrs.get(sa.COUPON_OUTCOME) == coupon
    deadline = attrs.get(sa.SELLER_DEADLINE)
    assert (deadline is not None) == has_deadline
    if deadline is not None and s.window is not None:
        opened = deadline - s.window
        assert abs(opened - world.started_at) < timedelta(minutes=2)
    # The money at stake, as the ledger has it, and how it was paid.
    summary = await desc.static_summary()
    assert re.fullmatch(
        rf"Cancel order {s.order_id} / seller {s.seller_id}: \d+\.\d\d EUR, card"
        r" \(out_of_stock, seller fault\)",
        summary or "",
    ), summary
    assert f"**Order** {s.order_id}" in (await desc.static_details() or "")

    details = await current_details(s.handle)
    assert details.startswith(f"**{STAGE_TEXT[status][0]}**"), details
    if status is CancellationStatus.AWAITING_SELLER:
        assert "by " in details and "UTC" in details  # the deadline
    if status is CancellationStatus.REFUND_FAILED:
        assert "Last error: RefundRejected" in details, details
    if status is CancellationStatus.COMPLETED:
        assert "stage confirmed (3/3)" in details, details
        assert f"Coupon: {coupon}" in details, details

    # The CLI finds it by the same attributes.
    query = (
        f'CancellationStatus="{status.value}" AND OrderId="{s.order_id}"'
        f' AND SellerId="{s.seller_id}" AND RefundStage={stage}'
    )
    await assert_found(world, query, {s.workflow_id})


# --- the queries operations run every day (docs/observability.md) ----------------------------


async def test_query_refund_failed_of_one_seller(world: World) -> None:
    seller = world.scenarios["refund_failed"].seller_id
    await assert_found(
        world,
        f'CancellationStatus="refund_failed" AND SellerId="{seller}"',
        world.ids("refund_failed"),
    )
    await assert_found(
        world, 'CancellationStatus="refund_failed"', world.ids("refund_failed", "refund_failed_b")
    )


async def test_query_awaiting_a_seller_for_more_than_24h(world: World) -> None:
    """With the 48 h window, waiting more than 24 h means the deadline is less than 24 h
    away: `SellerDeadline < now + 24h`."""
    cutoff = (datetime.now(UTC) + timedelta(hours=24)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await assert_found(
        world,
        f'CancellationStatus="awaiting_seller" AND SellerDeadline < "{cutoff}"',
        world.ids("waiting_28h"),
    )
    await assert_found(
        world, 'CancellationStatus="awaiting_seller"', world.ids("waiting_28h", "waiting_new")
    )


async def test_query_cancellations_of_one_buyer(world: World) -> None:
    buyer = world.scenarios["instant"].buyer_id
    await assert_found(world, f'BuyerId="{buyer}"', world.ids("instant", "accepted"))


async def test_query_completed_today_with_coupon_not_restored(world: World) -> None:
    midnight = world.started_at.replace(hour=0, minute=0, second=0, microsecond=0)
    today = midnight.strftime("%Y-%m-%dT%H:%M:%SZ")
    await assert_found(
        world,
        f'CancellationStatus="completed" AND CouponOutcome!="restored" AND CloseTime>="{today}"',
        world.ids("instant", "accepted", "timed_out"),
    )


# --- logs ------------------------------------------------------------------------------------


async def test_worker_log_lines_carry_the_cancellation_ids(world: World) -> None:
    lines = world.logs.lines()  # each one is a JSON object, or this fails
    ids = {"order_id", "seller_id", "workflow_id", "run_id"}
    failed = world.scenarios["refund_failed"]

    in_activities = [ln for ln in lines if ln.get("activity")]
    assert in_activities
    for line in in_activities:
        assert ids <= line.keys(), line
        assert isinstance(line["attempt"], int), line
        assert line["workflow_id"] == cancellation_id(line["order_id"], line["seller_id"]), line
    opened = [ln for ln in in_activities if ln["event"] == "cancellation_opened"]
    assert {ln["workflow_id"] for ln in opened} == {s.workflow_id for s in world.scenarios.values()}

    # The SDK's own warning about the refused refund, in the activity's task.
    sdk = [
        ln
        for ln in lines
        if ln.get("logger") == "temporalio.activity"
        and ln.get("activity") in ("submit_refund", "submit_refund_and_confirm")
    ]
    assert any(ln["order_id"] == failed.order_id for ln in sdk), sdk

    # workflow.logger: the SDK's context as fields, not printed into the message.
    parked = [ln for ln in lines if ln["event"].startswith("refund parked in refund_failed")]
    assert {ln["workflow_id"] for ln in parked} == world.ids("refund_failed", "refund_failed_b")
    for line in parked:
        assert line["logger"] == "temporalio.workflow"
        assert ids <= line.keys(), line
        assert line["workflow_type"] == "OrderCancellation"
        assert "{" not in line["event"], line


async def test_each_status_change_is_one_log_line(world: World) -> None:
    """The accepted cancellation's status changes, each logged once: by the activity that
    records it, or by the workflow where no activity does (awaiting the seller)."""
    accepted = world.id("accepted")
    changes = [
        (ln["status"], ln["logger"])
        for ln in world.logs.lines()
        if ln.get("workflow_id") == accepted and "status" in ln
    ]
    S = CancellationStatus
    assert sorted(changes) == sorted(
        [
            (S.AWAITING_SELLER.value, "temporalio.workflow"),
            (S.APPROVED.value, "activities.ledger_activities"),
            (S.REFUND_REQUESTED.value, "activities.ledger_activities"),
            (S.REFUND_SUBMITTED.value, "activities.refund_activities"),
            (S.REFUND_CONFIRMED.value, "activities.refund_activities"),
            (S.COMPLETED.value, "activities.ledger_activities"),
        ]
    ), changes


async def test_no_secret_in_any_log_line(world: World) -> None:
    text = world.logs.text
    assert text
    assert world.database_url not in text
    assert "password" not in text.lower()
    # Nothing left that the redactor would mask: no URL password, no card number.
    assert redact_text(text) == text


# --- metrics ---------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format: samples by metric name, each with its labels."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if line.startswith("#") or match is None:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        samples.setdefault(match["name"], []).append((labels, float(match["value"])))
    return samples


def total(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(k) == v for k, v in labels.items())
    )


async def test_metrics_endpoint_counts_what_happened(world: World) -> None:
    samples = await asyncio.to_thread(scrape, world.metrics_url)

    assert total(samples, "ordercancel_cancellations_started", path="instant") == 1
    assert total(samples, "ordercancel_cancellations_started", path="request") == 9
    assert total(samples, "ordercancel_cancellation_outcomes", status="completed") == 4
    assert total(samples, "ordercancel_cancellation_outcomes", status="rejected") == 1
    assert total(samples, "ordercancel_cancellation_outcomes", status="withdrawn") == 1
    assert total(samples, "ordercancel_coupon_outcomes", outcome="restored") == 1
    assert total(samples, "ordercancel_coupon_outcomes", outcome="no_coupon") == 3
    assert total(samples, "ordercancel_refund_failures", reason="RefundRejected") == 2
    assert total(samples, "ordercancel_refunds_parked", reason="RefundRejected") == 2

    decisions = "ordercancel_seller_decision_seconds_count"
    assert total(samples, decisions, decision="approved", decided_by="seller") == 4
    assert total(samples, decisions, decision="rejected", decided_by="seller") == 1
    assert total(samples, decisions, decision="approved", decided_by="timer") == 1
    # The timer decided after the 2 s window; the histogram has the hour-scale buckets.
    assert total(samples, "ordercancel_seller_decision_seconds_sum", decided_by="timer") >= 2
    assert total(samples, "ordercancel_seller_decision_seconds_bucket", le="172800") == 6

    stages = "ordercancel_refund_stage_seconds_count"
    assert total(samples, stages, stage="submitted") == 4
    assert total(samples, stages, stage="submitted", kind="void") == 1
    assert total(samples, stages, stage="confirmed") == 4

    # No label carries an id.
    for name, rows in samples.items():
        if name.startswith("ordercancel_"):
            for labels, _ in rows:
                assert not any(v.startswith(("O", "S-", "B-", "cancel-")) for v in labels.values())

    # The SDK's own metrics come out of the same endpoint.
    assert total(samples, "temporal_workflow_completed", workflow_type="OrderCancellation") >= 6
    assert total(samples, "temporal_activity_execution_latency_count") > 0
    assert total(samples, "temporal_worker_task_slots_available") > 0
