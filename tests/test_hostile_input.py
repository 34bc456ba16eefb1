"""Hostile input (issue 6): what arrives from outside is random, malformed, duplicated, late or
for someone else, and nothing of it may fail a workflow task, wedge a cancellation or give a
caller a vague answer.

Property-based (hypothesis), beyond what tests/test_rules.py covers (allocation, ETA, the
coupon decision's restore-iff, price_order):

- the pure rules under arbitrary input: decision and withdrawal checks, durations, every
  message model and the workflow's own parser, the coupon outcome's reasons;
- refund amount = sub-order cash, through the real ledger, over random multi-seller,
  multi-coupon orders cancelled in part or in full, and each coupon restored iff its whole
  footprint was refunded, once;
- random and malformed payloads sent as signals and updates straight through a Temporal client
  (time-skipping server, the real workflow, the fake activities of tests/test_workflow.py) and
  through the `temporal` CLI (dev server): 0 workflow task failures, 0 stuck workflows (a valid
  decision afterwards still decides), every update refusal an ApplicationError whose type is a
  RefusalCode, every refused signal recorded with one.

Payloads with a missing or extra argument are refused as `invalid_payload` like any other
malformed payload (they used to fail every workflow task: docs/reliability.md, Findings).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import asyncpg
import pytest
from helpers.stacks import dev_server
from helpers.time_skipping import time_skipping_server
from helpers.workflow_fakes import FakeActivities, wait_for_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from devstack.embedded import temporal_binary
from domain.errors import DecisionRefused, RefusalCode
from domain.models import (
    CancellationReason,
    CancellationResult,
    CancellationStatus,
    CouponOutcomeKind,
    OperatorDecision,
    PaymentEvent,
    RequestCancellationInput,
    RetryRefundRequest,
    SellerDecision,
    TimeoutPolicy,
    TransitionInput,
    WithdrawRequest,
)
from domain.orders import CheckoutOrderIn, price_order
from domain.rules import (
    DEFAULT_ETA_TABLE,
    cancellation_id,
    check_seller_decision,
    check_withdrawal,
    decide_coupon,
    parse_duration,
)
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from tools.chaos.checks import workflow_task_failures
from workers.worker import workflow_runner
from workflows.messages import parse
from workflows.order_cancellation import OrderCancellation

T = TypeVar("T")
CODES = {code.value for code in RefusalCode}
SELLER, BUYER = "S-7", "B-1"

# How many hostile inputs each test sent (printed at the end with -s; docs/reliability.md).
TRIED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_inputs_tried() -> Iterator[None]:
    yield
    if TRIED:
        print("\nhostile inputs tried: " + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items())))


def on_loop(loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[T]]) -> T:
    """From hypothesis's thread: run a coroutine on the test's event loop (where the clients and
    pools live) and wait for it."""

    async def run() -> T:
        return await make()

    return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=120)


# --- strategies ------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=10,
)
# Large enough to exceed every field limit, small enough for a payload.
HUGE = st.sampled_from(["x" * 2_001, "é" * 40_000, SELLER * 10_000, "\x00\n\r\t'\"" * 400])
IDENTIFIERS = st.one_of(
    st.sampled_from([SELLER, "S-8", "S-99", "", " S-7", "S-7 ", "s-7", "S-7\n", BUYER, "B-2"]),
    st.from_regex(r"[SB]-[0-9]{1,5}", fullmatch=True),
    HUGE,
    JSON,
)
TEXT = st.text(max_size=60) | HUGE | JSON
DECISIONS = st.sampled_from(["accept", "reject", "maybe", "ACCEPT", "", "accept ", None, 1, True])


def _decision_payloads() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {},
        optional={
            "seller_id": IDENTIFIERS,
            "decision": DECISIONS | JSON,
            "reason": TEXT,
            "amount": JSON,
        },
    )


def _withdraw_payloads() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {}, optional={"buyer_id": IDENTIFIERS, "reason": TEXT, "seller_id": IDENTIFIERS}
    )


def _operator_payloads() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {},
        optional={"operator_id": IDENTIFIERS, "decision": DECISIONS, "reason": TEXT, "x": JSON},
    )


def _payment_events() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {},
        optional={
            "event_id": st.text(max_size=300) | JSON,
            "type": st.sampled_from(["refund_confirmed", "refund_failed", "refund_reversed", "x"]),
            "provider_ref": st.text(max_size=40) | JSON,
            "refund_key": st.text(max_size=40) | JSON,
            "failure_code": TEXT,
            "occurred_at": st.sampled_from(["2026-01-01T00:00:00Z", "yesterday", 0]) | JSON,
        },
    )


def _valid(model: type[BaseModel], payload: Any) -> BaseModel | None:
    try:
        return model.model_validate(payload)
    except ValidationError:
        return None


def decides(payload: Any) -> bool:
    """The right seller's well-formed decision: it would decide, so it is no noise."""
    decision = _valid(SellerDecision, payload)
    return isinstance(decision, SellerDecision) and decision.seller_id == SELLER


def withdraws(payload: Any) -> bool:
    request = _valid(WithdrawRequest, payload)
    return isinstance(request, WithdrawRequest) and request.buyer_id == BUYER


@dataclass(frozen=True)
class Message:
    kind: str  # "signal" or "update"
    name: str
    payload: Any


SIGNAL_NAMES = ("seller_decision", "withdraw", "payment_event")
UPDATE_NAMES = ("decide", "resolve_escalation", "retry_refund")
_PAYLOADS = {
    "seller_decision": _decision_payloads(),
    "decide": _decision_payloads(),
    "withdraw": _withdraw_payloads(),
    "payment_event": _payment_events(),
    "resolve_escalation": _operator_payloads(),
    "retry_refund": _operator_payloads(),
}


@st.composite
def noise(draw: st.DrawFn) -> Message:
    """A message that must change nothing: malformed, for someone else, or not allowed now."""
    kind = draw(st.sampled_from(["signal", "update"]))
    name = draw(st.sampled_from(SIGNAL_NAMES if kind == "signal" else UPDATE_NAMES))
    payload = draw(_PAYLOADS[name] | JSON | HUGE)
    if name in ("seller_decision", "decide") and decides(payload):
        payload = {**cast(dict[str, Any], payload), "seller_id": "S-8"}
    if name == "withdraw" and withdraws(payload):
        payload = {**cast(dict[str, Any], payload), "buyer_id": "B-2"}
    return Message(kind, name, payload)


FINAL = {
    "accept": (
        Message("update", "decide", {"seller_id": SELLER, "decision": "accept"}),
        CancellationStatus.COMPLETED,
    ),
    "reject": (
        Message(
            "signal", "seller_decision", {"seller_id": SELLER, "decision": "reject", "reason": "r"}
        ),
        CancellationStatus.REJECTED,
    ),
    "withdraw": (Message("signal", "withdraw", {"buyer_id": BUYER}), CancellationStatus.WITHDRAWN),
}


# --- pure rules under arbitrary input ---------------------------------------------------------

PROPERTY = settings(max_examples=200, deadline=None)


@PROPERTY
@given(
    status=st.sampled_from(list(CancellationStatus)),
    expected=st.text(max_size=20),
    seller=st.text(max_size=20) | HUGE,
    decided=st.booleans(),
)
def test_seller_check_refuses_with_the_first_reason_that_applies(
    status: CancellationStatus, expected: str, seller: str, decided: bool
) -> None:
    TRIED["rules"] += 1
    try:
        check_seller_decision(
            status=status, expected_seller=expected, seller_id=seller, already_decided=decided
        )
    except DecisionRefused as err:
        want = (
            RefusalCode.WRONG_SELLER
            if seller != expected
            else RefusalCode.ALREADY_DECIDED
            if decided
            else RefusalCode.NOT_PENDING
        )
        assert err.code is want and err.message
    else:
        assert seller == expected and not decided and status is CancellationStatus.AWAITING_SELLER


@PROPERTY
@given(
    status=st.sampled_from(list(CancellationStatus)),
    expected=st.text(max_size=20),
    buyer=st.text(max_size=20) | HUGE,
)
def test_withdrawal_check_refuses_with_a_code(
    status: CancellationStatus, expected: str, buyer: str
) -> None:
    TRIED["rules"] += 1
    pending = status in (CancellationStatus.AWAITING_SELLER, CancellationStatus.ESCALATED)
    try:
        check_withdrawal(status=status, expected_buyer=expected, buyer_id=buyer)
    except DecisionRefused as err:
        assert err.code is (
            RefusalCode.WRONG_BUYER if buyer != expected else RefusalCode.NOT_PENDING
        )
    else:
        assert buyer == expected and pending


@PROPERTY
@given(text=st.text(max_size=40) | st.from_regex(r"[0-9]{1,4}(ms|s|m|h|d)[0-9]{0,3}[a-z ]{0,3}"))
def test_any_text_is_a_duration_or_a_clear_value_error(text: str) -> None:
    TRIED["durations"] += 1
    try:
        parsed = parse_duration(text)
    except ValueError as err:
        assert "not a duration" in str(err)
    else:
        assert parsed >= timedelta(0)


MESSAGE_MODELS: list[type[BaseModel]] = [
    SellerDecision,
    WithdrawRequest,
    OperatorDecision,
    RetryRefundRequest,
    PaymentEvent,
    RequestCancellationInput,
]


@PROPERTY
@given(
    model=st.sampled_from(MESSAGE_MODELS),
    payload=JSON | HUGE | _decision_payloads() | _payment_events(),
)
def test_any_payload_is_a_message_or_a_refusal_naming_the_fields(
    model: type[BaseModel], payload: Any
) -> None:
    """What the workflow's handlers do first: `parse` turns anything into the model or an
    `invalid_payload` refusal; never another exception (which would fail the workflow task)."""
    TRIED["payload models"] += 1
    try:
        parsed = parse(model, payload)
    except DecisionRefused as err:
        assert err.code is RefusalCode.INVALID_PAYLOAD
        assert err.message.startswith("invalid payload: ")
        # The refusal names fields, never echoes a huge input back.
        assert len(err.message) < 4_000
    else:
        assert isinstance(parsed, model)
        assert parsed.model_dump(mode="json") == model.model_validate(
            parsed.model_dump()
        ).model_dump(mode="json")


@PROPERTY
@given(
    footprint=st.dictionaries(
        st.from_regex(r"S-[0-9]{1,3}", fullmatch=True), st.booleans(), max_size=6
    ),
    expired=st.booleans(),
    redemption=st.one_of(st.none(), st.just("R-1")),
)
def test_every_coupon_outcome_says_why(
    footprint: dict[str, bool], expired: bool, redemption: str | None
) -> None:
    TRIED["coupon outcomes"] += 1
    now = datetime(2026, 6, 1, tzinfo=UTC)
    expires = now - timedelta(days=1) if expired else now + timedelta(days=1)
    outcome = decide_coupon(
        redemption_id=redemption, footprint_fully_refunded=footprint, expires_at=expires, now=now
    )
    assert outcome.reason
    if redemption is None:
        assert outcome.outcome is CouponOutcomeKind.NO_COUPON and outcome.redemption_id is None
        return
    assert outcome.redemption_id == redemption
    active = sorted(s for s, done in footprint.items() if not done)
    if outcome.outcome is CouponOutcomeKind.PARTIAL_REFUND:
        assert outcome.active_sub_orders == active and active
        # Names every seller still active, in one sentence that reads right for one or many.
        assert outcome.reason.startswith("not restored: the sub-order")
        assert all(seller in outcome.reason for seller in active)
        assert outcome.reason.endswith(
            (" is" if len(active) == 1 else " are") + " not cancelled and fully refunded"
        )
    else:
        assert outcome.active_sub_orders == [] and not active
        if outcome.outcome is CouponOutcomeKind.EXPIRED:
            assert expired and expires.isoformat() in outcome.reason
        else:
            assert outcome.outcome is CouponOutcomeKind.RESTORED and not expired


# --- refund = sub-order cash, through the real ledger ------------------------------------------


@st.composite
def ledger_orders(draw: st.DrawFn) -> tuple[CheckoutOrderIn, list[str]]:
    """A random order of 1-4 sellers with 0-2 coupons (disjoint footprints, some expired), and
    the sellers whose sub-orders are cancelled (some, or all)."""
    tag = uuid.uuid4().hex[:8]
    sellers = draw(
        st.lists(st.sampled_from(["S-1", "S-2", "S-3", "S-4"]), min_size=1, max_size=4, unique=True)
    )
    validated = draw(st.booleans())
    sub_orders: list[dict[str, Any]] = [
        {
            "seller_id": seller,
            "shipping_minor": draw(st.integers(min_value=0, max_value=2_000)),
            "seller_accepted": validated,
            "lines": [
                {
                    "sku": f"{seller}-{n}",
                    "quantity": draw(st.integers(min_value=1, max_value=9)),
                    "unit_price_minor": draw(st.integers(min_value=0, max_value=90_000)),
                }
                for n in range(draw(st.integers(min_value=1, max_value=4)))
            ],
        }
        for seller in sellers
    ]
    gross = {
        s["seller_id"]: sum(li["quantity"] * li["unit_price_minor"] for li in s["lines"])
        for s in sub_orders
    }
    deal = draw(
        st.lists(st.sampled_from([0, 1, None]), min_size=len(sellers), max_size=len(sellers))
    )
    coupons = []
    for c in (0, 1):
        footprint = [s for s, d in zip(sellers, deal, strict=True) if d == c]
        covered = sum(gross[s] for s in footprint)
        if footprint and covered:
            coupons.append(
                {
                    "redemption_id": f"R-{tag}-{c}",
                    "coupon_code": "HOSTILE",
                    "discount_minor": draw(st.integers(min_value=1, max_value=covered)),
                    "expires_at": draw(
                        st.sampled_from(["2020-01-01T00:00:00Z", "2099-01-01T00:00:00Z"])
                    ),
                    "footprint": footprint,
                }
            )
    order = CheckoutOrderIn.model_validate(
        {
            "order_id": f"H-{tag}",
            "buyer_id": f"B-{tag}",
            "currency": "EUR",
            "placed_at": "2026-01-01T00:00:00Z",
            "payment": {
                "payment_id": f"P-{tag}",
                "method": draw(st.sampled_from(["card", "wallet", "bank_transfer", "balance"])),
                "validation": "validated" if validated else "unvalidated",
                "capture": "captured" if validated else "authorized",
            },
            "sub_orders": sub_orders,
            "coupons": coupons,
        }
    )
    cancelled = draw(st.lists(st.sampled_from(sellers), min_size=1, unique=True))
    return order, cancelled


async def _cancel_refund_and_decide(
    pool: asyncpg.Pool, order: CheckoutOrderIn, cancelled: list[str]
) -> None:
    ledger = Ledger(pool)
    await load_orders(
        pool, parse_orders_file(json.dumps({"orders": [order.model_dump(mode="json")]}))
    )
    priced = {s.seller_id: s for s in price_order(order)}
    payment = order.payment.payment_id
    now = datetime.now(UTC)
    reserved = 0
    for seller in cancelled:
        cid = cancellation_id(order.order_id, seller)
        snapshot = await ledger.open_cancellation(
            cancellation_id=cid,
            request=RequestCancellationInput(
                order_id=order.order_id,
                seller_id=seller,
                buyer_id=order.buyer_id,
                reason=CancellationReason.OTHER,
            ),
        )
        assert snapshot.amount.amount_minor == priced[seller].cash_minor
        if snapshot.path.value == "request":
            await ledger.record_transition(
                TransitionInput(
                    cancellation_id=cid,
                    status=CancellationStatus.APPROVED,
                    actor=f"seller:{seller}",
                    kind="approved",
                    event_key="002-approved",
                    cancel_sub_order=True,
                )
            )
        refund = await ledger.request_refund(
            cancellation_id=cid,
            event_key="003-refund_requested",
            now=now,
            eta_table=DEFAULT_ETA_TABLE,
        )
        # Asked again (a retried activity): the same refund, nothing reserved twice.
        again = await ledger.request_refund(
            cancellation_id=cid,
            event_key="003-refund_requested",
            now=now,
            eta_table=DEFAULT_ETA_TABLE,
        )
        assert again.view.idempotency_key == refund.view.idempotency_key
        assert refund.view.amount.amount_minor == priced[seller].cash_minor
        assert refund.view.amount.currency == order.currency
        reserved += priced[seller].cash_minor
        assert (
            await pool.fetchval(
                "SELECT refunded_minor FROM payments WHERE payment_id = $1", payment
            )
            == reserved
        )
        assert refund.view.eta is not None
        await ledger.record_refund_submitted(
            cancellation_id=cid,
            provider_ref=f"re_{cid}",
            eta=refund.view.eta,
            event_key="004-submitted",
        )
        await ledger.record_refund_confirmed(cancellation_id=cid, event_key="005-confirmed")
    paid = await pool.fetchval("SELECT amount_minor FROM payments WHERE payment_id = $1", payment)
    # The payment is what the buyer paid: items - coupons + shipping, and refunding every
    # sub-order gives exactly that back.
    assert paid == sum(
        li.quantity * li.unit_price_minor for s in order.sub_orders for li in s.lines
    ) - sum(c.discount_minor for c in order.coupons) + sum(
        s.shipping_minor for s in order.sub_orders
    )
    if set(cancelled) == {s.seller_id for s in order.sub_orders}:
        assert reserved == paid

    # Coupons, decided by every cancelled sub-order (in random order): each reason says why.
    done = set(cancelled)
    for seller in cancelled:
        cid = cancellation_id(order.order_id, seller)
        outcome = await ledger.decide_coupon(cancellation_id=cid, event_key="006-coupon")
        coupon = next((c for c in order.coupons if seller in c.footprint), None)
        if coupon is None:
            assert outcome.outcome is CouponOutcomeKind.NO_COUPON
            continue
        assert outcome.redemption_id == coupon.redemption_id
        missing = sorted(set(coupon.footprint) - done)
        if missing:
            assert outcome.outcome is CouponOutcomeKind.PARTIAL_REFUND
            assert outcome.active_sub_orders == missing
        elif coupon.expires_at <= datetime.now(UTC):
            assert outcome.outcome is CouponOutcomeKind.EXPIRED
        else:
            assert outcome.outcome is CouponOutcomeKind.RESTORED
    for coupon in order.coupons:
        due = set(coupon.footprint) <= done and coupon.expires_at > datetime.now(UTC)
        restored = await pool.fetchval(
            "SELECT restored_at IS NOT NULL FROM coupon_redemptions WHERE redemption_id = $1",
            coupon.redemption_id,
        )
        performed = await pool.fetchval(
            "SELECT count(*) FROM coupon_decisions WHERE redemption_id = $1 AND performed_restore",
            coupon.redemption_id,
        )
        assert (restored, performed) == (due, int(due)), coupon.redemption_id


async def test_refunds_are_the_sub_orders_cash_and_coupons_come_back_iff_fully_refunded(
    pool: asyncpg.Pool,
) -> None:
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=ledger_orders())
    def prop(case: tuple[CheckoutOrderIn, list[str]]) -> None:
        TRIED["ledger orders"] += 1
        order, cancelled = case
        on_loop(loop, lambda: _cancel_refund_and_decide(pool, order, cancelled))

    await asyncio.to_thread(prop)


# --- hostile messages through a Temporal client (time-skipping server) -----------------------


@dataclass
class Target:
    client: Client
    task_queue: str
    fakes: FakeActivities
    cached: bool = True
    started: list[WorkflowHandle[Any, Any]] = field(default_factory=list)

    async def start(self) -> WorkflowHandle[Any, CancellationResult]:
        request = RequestCancellationInput(
            order_id=f"HX-{uuid.uuid4().hex[:10]}",
            seller_id=SELLER,
            buyer_id=BUYER,
            reason=CancellationReason.OUT_OF_STOCK,
        )
        handle = await self.client.start_workflow(
            OrderCancellation.run,
            request,
            id=cancellation_id(request.order_id, request.seller_id),
            task_queue=self.task_queue,
        )
        self.started.append(handle)
        return handle

    async def clean_up(self) -> None:
        """Terminate what is still running: a wedged workflow (its task failing for ever) would
        stop the shared time-skipping server from ever skipping time for later tests."""
        for handle in self.started:
            with contextlib.suppress(RPCError):
                if (await handle.describe()).status is WorkflowExecutionStatus.RUNNING:
                    await handle.terminate("hostile-input test over")


@pytest.fixture(scope="module")
async def own_time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of this module's own, not the session's: noise sent here must not
    be able to change how time passes for other tests. (A workflow whose task keeps failing
    stops that server from ever skipping time again, even once terminated, which is why the
    wrong-arity tests run on the dev server.)"""
    async with time_skipping_server() as env:
        yield env


@pytest.fixture(params=[1000, 0], ids=["cached", "replay-every-task"])
async def target(
    request: pytest.FixtureRequest, own_time_skipping: WorkflowEnvironment
) -> AsyncIterator[Target]:
    fakes = FakeActivities()
    task_queue = f"hostile-{uuid.uuid4()}"
    async with Worker(
        own_time_skipping.client,
        task_queue=task_queue,
        workflows=[OrderCancellation],
        activities=fakes.activities(),
        workflow_runner=workflow_runner(),
        max_cached_workflows=int(request.param),
    ):
        target = Target(own_time_skipping.client, task_queue, fakes, cached=request.param > 0)
        try:
            yield target
        finally:
            await target.clean_up()


async def send(
    handle: WorkflowHandle[Any, Any], message: Message, *, args: list[Any] | None = None
) -> str | None:
    """Send one message. Returns the update's refusal type (None when a signal, or an update
    that was accepted); a workflow that has ended answers NOT_FOUND ("ended")."""
    call_args = [message.payload] if args is None else args
    try:
        if message.kind == "signal":
            await handle.signal(message.name, args=call_args)
            return None
        await handle.execute_update(message.name, args=call_args)
        return None
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        assert isinstance(cause, ApplicationError), f"{message.name}: {cause!r}"
        assert cause.type in CODES, f"{message.name} refused vaguely: {cause.type}: {cause}"
        return cause.type
    except RPCError as err:
        assert err.status is RPCStatusCode.NOT_FOUND, err
        return "ended"


async def assert_healthy(handle: WorkflowHandle[Any, Any]) -> None:
    failures = workflow_task_failures(await handle.fetch_history())
    assert not failures, failures


async def attack(
    target: Target, early: list[Message], noise_: list[Message], final: str, late: list[Message]
) -> None:
    handle = await target.start()
    # Out of order: messages before the request is even open.
    for message in early:
        await send(handle, message)
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    for message in noise_:
        refusal = await send(handle, message)
        if message.kind == "update":
            assert refusal is not None, f"noise accepted: {message}"
            if message.name == "decide" and _valid(SellerDecision, message.payload) is None:
                assert refusal == RefusalCode.INVALID_PAYLOAD.value
    # Nothing moved: still waiting for the seller, who can still decide.
    view = await handle.query(OrderCancellation.status)
    assert view.status is CancellationStatus.AWAITING_SELLER, view.status
    decisive, expected = FINAL[final]
    assert await send(handle, decisive) is None
    # Late: duplicates and contradictions once the decision has taken effect. (Arriving in
    # the same workflow task as a withdrawal, an acceptance wins today: see
    # test_a_withdrawal_and_an_acceptance_together_the_first_one_wins.)
    await _eventually(lambda: _left_awaiting(handle), timeout=15)
    for message in late:
        await send(handle, message)
    result = await asyncio.wait_for(handle.result(), 30)
    assert result.status is expected
    await assert_healthy(handle)
    # Every signal refused while the request was open is in the audit trail, with its code.
    refused = [e for e in target.fakes.args("record_event") if e.cancellation_id == handle.id]
    signals_before = sum(1 for m in [*early, *noise_] if m.kind == "signal")
    assert len(refused) >= signals_before, (len(refused), signals_before)
    for event in refused:
        assert event.detail.split(":", 1)[0] in CODES, event.detail
        assert event.kind.endswith("_refused")
    TRIED["messages via client"] += len(early) + len(noise_) + 1 + len(late)


LATE = st.lists(
    st.sampled_from(
        [
            Message("update", "decide", {"seller_id": SELLER, "decision": "accept"}),
            Message("update", "decide", {"seller_id": SELLER, "decision": "reject"}),
            Message("signal", "seller_decision", {"seller_id": SELLER, "decision": "accept"}),
            Message("signal", "withdraw", {"buyer_id": BUYER}),
            Message("update", "retry_refund", {"operator_id": "sre-1"}),
            Message("update", "resolve_escalation", {"operator_id": "o", "decision": "accept"}),
        ]
    ),
    max_size=4,
)


async def test_noise_through_the_client_fails_no_task_and_wedges_nothing(target: Target) -> None:
    loop = asyncio.get_running_loop()
    # Replaying every task re-reads the whole (noisy) history each time: fewer examples there.
    examples = 25 if target.cached else 10

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        early=st.lists(noise(), max_size=2),
        noise_=st.lists(noise(), min_size=1, max_size=8),
        duplicate=st.booleans(),
        final=st.sampled_from(sorted(FINAL)),
        late=LATE,
    )
    def prop(
        early: list[Message],
        noise_: list[Message],
        duplicate: bool,
        final: str,
        late: list[Message],
    ) -> None:
        # Duplicates: every noisy message sent twice.
        batch = [m for m in noise_ for _ in range(2 if duplicate else 1)]
        on_loop(loop, lambda: attack(target, early, batch, final, late))

    await asyncio.to_thread(prop)


async def test_operators_messages_out_of_turn_are_refused_specifically(
    own_time_skipping: WorkflowEnvironment,
) -> None:
    """Escalated (timeout policy `escalate`): sellers are late, operators' malformed or repeated
    decisions are refused with a code, a valid one decides; nothing fails a task."""
    fakes = FakeActivities(timeout_policy=TimeoutPolicy.ESCALATE)
    task_queue = f"hostile-esc-{uuid.uuid4()}"
    async with Worker(
        own_time_skipping.client,
        task_queue=task_queue,
        workflows=[OrderCancellation],
        activities=fakes.activities(),
        workflow_runner=workflow_runner(),
        max_cached_workflows=0,
    ):
        handle = await Target(own_time_skipping.client, task_queue, fakes).start()
        await own_time_skipping.sleep(timedelta(hours=49))
        await wait_for_status(handle, CancellationStatus.ESCALATED)
        expectations = [
            (
                Message("update", "decide", {"seller_id": SELLER, "decision": "accept"}),
                "not_pending",
            ),
            (
                Message(
                    "update", "resolve_escalation", {"operator_id": "ops 1", "decision": "accept"}
                ),
                "invalid_payload",
            ),
            (Message("update", "resolve_escalation", {"operator_id": "ops-1"}), "invalid_payload"),
            (Message("update", "resolve_escalation", ["ops-1", "accept"]), "invalid_payload"),
            (Message("update", "retry_refund", {"operator_id": "ops-1"}), "not_refund_failed"),
            (
                Message(
                    "update", "resolve_escalation", {"operator_id": "ops-1", "decision": "reject"}
                ),
                None,
            ),
            (
                Message(
                    "update", "resolve_escalation", {"operator_id": "ops-2", "decision": "accept"}
                ),
                "not_escalated",
            ),
            (
                Message("update", "decide", {"seller_id": SELLER, "decision": "accept"}),
                "already_decided",
            ),
        ]
        for message, want in expectations:
            got = await send(handle, message)
            assert got == want or (want is not None and got == "ended"), (message, got)
            TRIED["messages via client"] += 1
        assert (await handle.result()).status is CancellationStatus.REJECTED
        await assert_healthy(handle)


WRONG_ARITY = [
    Message("signal", "seller_decision", None),
    Message("signal", "withdraw", None),
    Message("signal", "payment_event", None),
    Message("update", "decide", None),
    Message("update", "resolve_escalation", None),
    Message("update", "retry_refund", None),
]


# --- hostile messages through the `temporal` CLI (dev server) --------------------------------


@pytest.fixture(scope="module")
async def dev_temporal(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    async with dev_server(tmp_path_factory.mktemp("hostile-temporal")) as server:
        yield server.address


async def cli(address: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        temporal_binary(),
        *args,
        "--address",
        address,
        "--namespace",
        "default",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@asynccontextmanager
async def _dev_worker(address: str, cache: int = 1000) -> AsyncIterator[Target]:
    from infra.client import connect

    client = await connect(address)
    fakes = FakeActivities()
    task_queue = f"hostile-dev-{uuid.uuid4()}"
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[OrderCancellation],
        activities=fakes.activities(),
        workflow_runner=workflow_runner(),
        max_cached_workflows=cache,
    ):
        target = Target(client, task_queue, fakes, cached=cache > 0)
        try:
            yield target
        finally:
            await target.clean_up()


@pytest.fixture
async def dev_target(dev_temporal: str) -> AsyncIterator[Target]:
    async with _dev_worker(dev_temporal) as target:
        yield target


@pytest.fixture(params=[1000, 0], ids=["cached", "replay-every-task"])
async def dev_targets(request: pytest.FixtureRequest, dev_temporal: str) -> AsyncIterator[Target]:
    async with _dev_worker(dev_temporal, int(request.param)) as target:
        yield target


@pytest.mark.parametrize("arguments", [0, 2], ids=["no-argument", "two-arguments"])
@pytest.mark.e2e
async def test_extra_or_missing_arguments_are_refused_not_fatal(
    dev_targets: Target, arguments: int
) -> None:
    target = dev_targets
    handle = await target.start()
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    args = [{"seller_id": SELLER, "decision": "accept"}, "extra"][:arguments]
    for message in WRONG_ARITY:
        if message.kind == "signal":
            TRIED["messages via client"] += 1
            await send(handle, message, args=args)
    await asyncio.sleep(0.5)
    await assert_healthy(handle)
    for message in WRONG_ARITY:
        if message.kind == "update":
            TRIED["messages via client"] += 1
            # Bounded: an update to a wedged workflow would wait for ever.
            refusal = await asyncio.wait_for(send(handle, message, args=args), 15)
            assert refusal == RefusalCode.INVALID_PAYLOAD.value, (message.name, refusal)
    refused = [e for e in target.fakes.args("record_event") if e.cancellation_id == handle.id]
    assert [e.detail.split(":", 1)[0] for e in refused] == ["invalid_payload"] * 3
    assert await asyncio.wait_for(send(handle, FINAL["reject"][0]), 15) is None
    assert (await asyncio.wait_for(handle.result(), 15)).status is CancellationStatus.REJECTED
    await assert_healthy(handle)


CLI_SIGNALS = [
    ("seller_decision", ["--input", '"accept"']),
    ("seller_decision", ["--input", "null"]),
    ("seller_decision", ["--input", '{"seller_id": 7, "decision": "accept"}']),
    ("seller_decision", ["--input", '{"seller_id": "S-99", "decision": "accept"}']),
    ("seller_decision", ["--input", '{"seller_id": "S-7", "decision": "maybe"}']),
    (
        "seller_decision",
        [
            "--input",
            json.dumps({"seller_id": SELLER, "decision": "accept", "reason": "r" * 50_000}),
        ],
    ),
    ("withdraw", ["--input", "[1, 2, 3]"]),
    ("withdraw", ["--input", '{"buyer_id": "B-2"}']),
    (
        "payment_event",
        ["--input", '{"event_id": "e", "type": "refund_confirmed", "provider_ref": "re_nope"}'],
    ),
    ("payment_event", ["--input", "{}"]),
    # Not JSON at all: a binary payload.
    (
        "seller_decision",
        ["--input", "aGVsbG8=", "--input-base64", "--input-meta", "encoding=binary/plain"],
    ),
]
CLI_UPDATES = [
    ("decide", ["--input", '{"seller_id": "S-99", "decision": "accept"}'], "wrong_seller"),
    ("decide", ["--input", '{"seller_id": "S-7"}'], "invalid_payload"),
    ("decide", ["--input", '"accept"'], "invalid_payload"),
    (
        "decide",
        ["--input", "aGVsbG8=", "--input-base64", "--input-meta", "encoding=binary/plain"],
        "invalid_payload",
    ),
    ("retry_refund", ["--input", '{"operator_id": "sre-1"}'], "not_refund_failed"),
    # (A valid operator decision would decide: operators may decide a waiting request.)
    ("resolve_escalation", ["--input", '{"operator_id": "o"}'], "invalid_payload"),
]


@pytest.mark.e2e
async def test_noise_through_the_temporal_cli(dev_target: Target, dev_temporal: str) -> None:
    handle = await dev_target.start()
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    for name, inputs in CLI_SIGNALS:
        code, out = await cli(
            dev_temporal, "workflow", "signal", "-w", handle.id, "--name", name, *inputs
        )
        assert code == 0, out
        TRIED["messages via CLI"] += 1
    for name, inputs, refusal in CLI_UPDATES:
        code, out = await cli(
            dev_temporal, "workflow", "update", "execute", "-w", handle.id, "--name", name, *inputs
        )
        assert code != 0 and refusal in out, (name, refusal, out)
        TRIED["messages via CLI"] += 1

    async def all_recorded() -> None:
        refused = [
            e for e in dev_target.fakes.args("record_event") if e.cancellation_id == handle.id
        ]
        assert len(refused) == len(CLI_SIGNALS), [e.detail for e in refused]
        assert {e.detail.split(":", 1)[0] for e in refused} <= CODES

    await _eventually(all_recorded)
    assert (
        await handle.query(OrderCancellation.status)
    ).status is CancellationStatus.AWAITING_SELLER
    code, out = await cli(
        dev_temporal,
        "workflow",
        "update",
        "execute",
        "-w",
        handle.id,
        "--name",
        "decide",
        "--input",
        json.dumps({"seller_id": SELLER, "decision": "accept", "reason": "via the CLI"}),
    )
    assert code == 0, out
    assert (await asyncio.wait_for(handle.result(), 30)).status is CancellationStatus.COMPLETED
    await assert_healthy(handle)


@pytest.mark.e2e
async def test_two_inputs_through_the_cli_do_not_wedge_a_cancellation(
    dev_target: Target, dev_temporal: str
) -> None:
    handle = await dev_target.start()
    await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    code, out = await cli(
        dev_temporal,
        "workflow",
        "signal",
        "-w",
        handle.id,
        "--name",
        "seller_decision",
        "--input",
        json.dumps({"seller_id": SELLER, "decision": "accept"}),
        "--input",
        '"and more"',
    )
    assert code == 0, out
    TRIED["messages via CLI"] += 1
    await asyncio.sleep(1)
    await assert_healthy(handle)
    await handle.signal(OrderCancellation.seller_decision, FINAL["reject"][0].payload)
    assert (await asyncio.wait_for(handle.result(), 15)).status is CancellationStatus.REJECTED


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["update", "signal"])
async def test_a_withdrawal_and_an_acceptance_together_the_first_one_wins(
    dev_temporal: str, kind: str
) -> None:
    from infra.client import connect

    client = await connect(dev_temporal)
    fakes = FakeActivities()
    task_queue = f"hostile-race-{uuid.uuid4()}"

    def worker() -> Worker:
        return Worker(
            client,
            task_queue=task_queue,
            workflows=[OrderCancellation],
            activities=fakes.activities(),
            workflow_runner=workflow_runner(),
        )

    async with worker():
        handle = await Target(client, task_queue, fakes).start()
        await wait_for_status(handle, CancellationStatus.AWAITING_SELLER)
    # No worker: the buyer's withdrawal, then the seller's acceptance, both wait for the next
    # workflow task, which sees them in the order they came.
    await handle.signal("withdraw", {"buyer_id": BUYER, "reason": "found it elsewhere"})
    name = "decide" if kind == "update" else "seller_decision"
    accepted = asyncio.create_task(
        send(handle, Message(kind, name, {"seller_id": SELLER, "decision": "accept"}))
    )
    await asyncio.sleep(1)
    async with worker():
        refusal = await asyncio.wait_for(accepted, 30)
        result = await asyncio.wait_for(handle.result(), 30)
    TRIED["messages via client"] += 2
    assert result.status is CancellationStatus.WITHDRAWN
    assert result.refund is None
    if kind == "update":
        assert refusal in (RefusalCode.ALREADY_DECIDED.value, RefusalCode.NOT_PENDING.value)
    else:
        # A signal cannot answer its sender: the refusal is in the audit trail, with its code.
        refused = [e for e in fakes.args("record_event") if e.cancellation_id == handle.id]
        assert [(e.kind, e.detail.split(":", 1)[0]) for e in refused] == [
            ("seller_decision_refused", RefusalCode.ALREADY_DECIDED.value)
        ]
    transitions = [
        t.kind for t in fakes.args("record_transition") if t.cancellation_id == handle.id
    ]
    assert "approved" not in transitions and transitions[-1] == "withdrawn", transitions
    await assert_healthy(handle)


async def _left_awaiting(handle: WorkflowHandle[Any, Any]) -> None:
    view = await handle.query(OrderCancellation.status)
    assert view.status is not CancellationStatus.AWAITING_SELLER


async def _eventually(check: Callable[[], Awaitable[None]], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await check()
            return
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.1)
