"""The rule book's pure functions (domain/rules.py, price_order): examples and properties."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import DecisionRefused, RefusalCode
from domain.models import (
    CancellationStatus,
    CaptureState,
    CouponOutcomeKind,
    Decision,
    PaymentMethod,
    RefundKind,
    SubOrderStatus,
    TimeoutPolicy,
)
from domain.orders import CheckoutOrderIn, price_order
from domain.rules import (
    add_business_days,
    allocate_largest_remainder,
    cancellation_id,
    check_seller_decision,
    check_withdrawal,
    decide_coupon,
    parse_duration,
    refund_eta,
    refund_idempotency_key,
    refund_kind,
    timeout_outcome,
)

# Enough examples to find edge cases, few enough to keep the whole file to a couple of seconds.
PROPERTY = settings(max_examples=150, deadline=None)

# --- allocate_largest_remainder ------------------------------------------------------------------


def test_allocation_example_gives_leftover_units_to_largest_remainders() -> None:
    # 1000 over 1999, 2550, 1249, 1298, 5490 (sum 12586): floors 158, 202, 99, 103, 436 = 998;
    # remainders 10412, 7628, 2986, 1642, 2504 -> the 2 left go to the first two lines.
    assert allocate_largest_remainder(1000, [1999, 2550, 1249, 1298, 5490]) == [
        159,
        203,
        99,
        103,
        436,
    ]


def test_allocation_ties_go_to_the_earlier_weight() -> None:
    assert allocate_largest_remainder(1, [1, 1, 1]) == [1, 0, 0]
    assert allocate_largest_remainder(2, [1, 1, 1]) == [1, 1, 0]
    assert allocate_largest_remainder(10, [3, 3, 3]) == [4, 3, 3]


def test_allocation_edge_cases() -> None:
    assert allocate_largest_remainder(0, []) == []
    assert allocate_largest_remainder(0, [0, 0]) == [0, 0]
    assert allocate_largest_remainder(7, [0, 5, 0]) == [0, 7, 0]
    assert allocate_largest_remainder(0, [3, 4]) == [0, 0]


@pytest.mark.parametrize(
    ("total", "weights", "message"),
    [
        (1, [0, 0], "zero weights"),
        (1, [], "zero weights"),
        (-1, [1], "total must not be negative"),
        (1, [2, -1], "weights must not be negative"),
    ],
)
def test_allocation_refuses_impossible_splits(total: int, weights: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        allocate_largest_remainder(total, weights)


@PROPERTY
@given(
    total=st.integers(min_value=0, max_value=10**9),
    weights=st.lists(st.integers(min_value=0, max_value=10**7), min_size=1, max_size=30).filter(
        lambda ws: sum(ws) > 0
    ),
)
def test_allocation_properties(total: int, weights: list[int]) -> None:
    parts = allocate_largest_remainder(total, weights)
    assert len(parts) == len(weights)
    assert sum(parts) == total
    assert all(p >= 0 for p in parts)
    weight_sum = sum(weights)
    for part, weight in zip(parts, weights, strict=True):
        exact = Fraction(total * weight, weight_sum)
        assert abs(part - exact) < 1  # floor or floor + 1 of the exact share
        if weight == 0:
            assert part == 0
        if total <= weight_sum:
            assert part <= weight  # a line is never discounted below zero


# --- refund_eta (R8) -----------------------------------------------------------------------------

FRIDAY = datetime(2026, 3, 6, 10, 0, tzinfo=UTC)  # Friday 6 March 2026
SATURDAY = FRIDAY + timedelta(days=1)


def weekdays_between(start: date, end: date) -> int:
    """Mon-Fri days in (start, end]."""
    return sum(
        1 for n in range(1, (end - start).days + 1) if (start + timedelta(days=n)).weekday() < 5
    )


def test_friday_card_refund_counts_business_days_only() -> None:
    assert FRIDAY.weekday() == 4
    eta = refund_eta(PaymentMethod.CARD, RefundKind.REFUND, FRIDAY)
    # Mon 9, Tue 10, Wed 11 -> earliest Wednesday; 20 business days = 4 weeks -> Fri 3 April.
    assert eta.earliest == datetime(2026, 3, 11, 10, 0, tzinfo=UTC)
    assert eta.latest == datetime(2026, 4, 3, 10, 0, tzinfo=UTC)
    assert eta.earliest.weekday() < 5 and eta.latest.weekday() < 5


def test_bank_transfer_takes_7_to_10_business_days() -> None:
    eta = refund_eta(PaymentMethod.BANK_TRANSFER, RefundKind.REFUND, FRIDAY)
    assert eta.earliest == datetime(2026, 3, 17, 10, 0, tzinfo=UTC)  # Tuesday
    assert eta.latest == datetime(2026, 3, 20, 10, 0, tzinfo=UTC)  # Friday
    assert weekdays_between(FRIDAY.date(), eta.earliest.date()) == 7
    assert weekdays_between(FRIDAY.date(), eta.latest.date()) == 10


def test_weekend_submission_counts_from_monday() -> None:
    # The documented convention: a submission on a weekend is processed on Monday, which is
    # day 0 of the count, so Saturday gives the same ETA as Monday.
    monday = SATURDAY + timedelta(days=2)
    assert refund_eta(PaymentMethod.CARD, RefundKind.REFUND, SATURDAY) == refund_eta(
        PaymentMethod.CARD, RefundKind.REFUND, monday
    )
    assert refund_eta(PaymentMethod.CARD, RefundKind.REFUND, SATURDAY).earliest == datetime(
        2026, 3, 12, 10, 0, tzinfo=UTC
    )


@pytest.mark.parametrize("method", [PaymentMethod.WALLET, PaymentMethod.BALANCE])
def test_wallet_and_balance_refunds_land_within_a_day(method: PaymentMethod) -> None:
    eta = refund_eta(method, RefundKind.REFUND, SATURDAY)  # calendar days: weekends count
    assert eta.earliest == SATURDAY
    assert eta.latest == SATURDAY + timedelta(days=1)


@pytest.mark.parametrize("method", list(PaymentMethod))
def test_a_void_lands_within_a_day_whatever_the_method(method: PaymentMethod) -> None:
    eta = refund_eta(method, RefundKind.VOID, FRIDAY)
    assert (eta.earliest, eta.latest) == (FRIDAY, FRIDAY + timedelta(days=1))


def test_eta_table_is_configuration() -> None:
    table = {"card": (1, 2, False)}
    eta = refund_eta(PaymentMethod.CARD, RefundKind.REFUND, FRIDAY, table)
    assert (eta.earliest, eta.latest) == (FRIDAY + timedelta(days=1), FRIDAY + timedelta(days=2))


@PROPERTY
@given(
    submitted=st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=9))]
        ),
    ),
    method=st.sampled_from(list(PaymentMethod)),
    kind=st.sampled_from(list(RefundKind)),
)
def test_eta_properties(submitted: datetime, method: PaymentMethod, kind: RefundKind) -> None:
    eta = refund_eta(method, kind, submitted)
    assert submitted <= eta.earliest <= eta.latest
    # Time of day and zone are kept: an ETA is a whole number of days after submission.
    assert (eta.earliest - submitted) % timedelta(days=1) == timedelta(0)
    assert (eta.latest - submitted) % timedelta(days=1) == timedelta(0)
    if kind is RefundKind.REFUND and method in (PaymentMethod.CARD, PaymentMethod.BANK_TRANSFER):
        low, high = (3, 20) if method is PaymentMethod.CARD else (7, 10)
        assert eta.earliest.weekday() < 5 and eta.latest.weekday() < 5
        start = submitted.date()
        if submitted.weekday() < 5:
            assert weekdays_between(start, eta.earliest.date()) == low
            assert weekdays_between(start, eta.latest.date()) == high
        else:  # weekend: Monday is day 0, so one weekday more is crossed
            assert weekdays_between(start, eta.earliest.date()) == low + 1
            assert weekdays_between(start, eta.latest.date()) == high + 1
    else:
        assert eta.earliest == submitted
        assert eta.latest == submitted + timedelta(days=1)


@PROPERTY
@given(
    start=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1)),
    days=st.integers(min_value=0, max_value=60),
)
def test_add_business_days_is_monotonic(start: datetime, days: int) -> None:
    assert add_business_days(start, days) <= add_business_days(start, days + 1)
    assert add_business_days(start, days + 1).weekday() < 5


# --- decide_coupon (R11) -------------------------------------------------------------------------

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
LATER = datetime(2030, 1, 1, tzinfo=UTC)


def test_coupon_restored_when_every_footprint_sub_order_is_done() -> None:
    outcome = decide_coupon(
        redemption_id="R-2001",
        footprint_fully_refunded={"S-7": True, "S-8": True},
        expires_at=LATER,
        now=NOW,
    )
    assert outcome.outcome is CouponOutcomeKind.RESTORED
    assert outcome.redemption_id == "R-2001"
    assert outcome.active_sub_orders == []


def test_coupon_partial_names_the_active_sellers_sorted() -> None:
    outcome = decide_coupon(
        redemption_id="R-2002",
        footprint_fully_refunded={"S-9": False, "S-7": True, "S-10": False, "S-8": False},
        expires_at=LATER,
        now=NOW,
    )
    assert outcome.outcome is CouponOutcomeKind.PARTIAL_REFUND
    assert outcome.active_sub_orders == ["S-10", "S-8", "S-9"]
    assert "S-10, S-8, S-9" in outcome.reason


def test_coupon_expired() -> None:
    for expires_at in (NOW - timedelta(days=1), NOW):  # expiring this instant is expired
        outcome = decide_coupon(
            redemption_id="R-1",
            footprint_fully_refunded={"S-7": True},
            expires_at=expires_at,
            now=NOW,
        )
        assert outcome.outcome is CouponOutcomeKind.EXPIRED
        assert expires_at.isoformat() in outcome.reason


def test_no_coupon() -> None:
    outcome = decide_coupon(
        redemption_id=None, footprint_fully_refunded={}, expires_at=None, now=NOW
    )
    assert outcome.outcome is CouponOutcomeKind.NO_COUPON
    assert outcome.redemption_id is None


@PROPERTY
@given(
    footprint=st.dictionaries(
        st.from_regex(r"S-[0-9]{1,3}", fullmatch=True), st.booleans(), min_size=1, max_size=6
    ),
    expiry_offset=st.integers(min_value=-10_000, max_value=10_000),
)
def test_coupon_restored_iff_all_done_and_not_expired(
    footprint: dict[str, bool], expiry_offset: int
) -> None:
    expires_at = NOW + timedelta(minutes=expiry_offset)
    outcome = decide_coupon(
        redemption_id="R-1", footprint_fully_refunded=footprint, expires_at=expires_at, now=NOW
    )
    all_done = all(footprint.values())
    assert (outcome.outcome is CouponOutcomeKind.RESTORED) == (all_done and expires_at > NOW)
    if not all_done:
        assert outcome.outcome is CouponOutcomeKind.PARTIAL_REFUND
        assert outcome.active_sub_orders == sorted(s for s, done in footprint.items() if not done)
    elif expires_at <= NOW:
        assert outcome.outcome is CouponOutcomeKind.EXPIRED


# --- decisions and withdrawals (R3, R4, R5) ------------------------------------------------------


def test_the_right_seller_may_decide_a_pending_request() -> None:
    check_seller_decision(
        status=CancellationStatus.AWAITING_SELLER,
        expected_seller="S-7",
        seller_id="S-7",
        already_decided=False,
    )


@pytest.mark.parametrize(
    ("status", "seller_id", "already_decided", "code"),
    [
        (CancellationStatus.AWAITING_SELLER, "S-8", False, RefusalCode.WRONG_SELLER),
        # Another seller is told it is not theirs, even after the request ended.
        (CancellationStatus.COMPLETED, "S-8", True, RefusalCode.WRONG_SELLER),
        (CancellationStatus.AWAITING_SELLER, "S-7", True, RefusalCode.ALREADY_DECIDED),
        (CancellationStatus.APPROVED, "S-7", True, RefusalCode.ALREADY_DECIDED),
        *(
            (status, "S-7", False, RefusalCode.NOT_PENDING)
            for status in CancellationStatus
            if status is not CancellationStatus.AWAITING_SELLER
        ),
    ],
)
def test_seller_decision_refusals(
    status: CancellationStatus, seller_id: str, already_decided: bool, code: RefusalCode
) -> None:
    with pytest.raises(DecisionRefused) as err:
        check_seller_decision(
            status=status,
            expected_seller="S-7",
            seller_id=seller_id,
            already_decided=already_decided,
        )
    assert err.value.code is code
    assert err.value.message == str(err.value)
    assert err.value.message


# A request is pending while the seller (or, once escalated, an operator) has not decided.
WITHDRAWABLE = (CancellationStatus.AWAITING_SELLER, CancellationStatus.ESCALATED)


@pytest.mark.parametrize("status", WITHDRAWABLE)
def test_the_buyer_may_withdraw_a_pending_request(status: CancellationStatus) -> None:
    check_withdrawal(status=status, expected_buyer="B-1", buyer_id="B-1")


@pytest.mark.parametrize(
    ("status", "buyer_id", "code"),
    [
        (CancellationStatus.AWAITING_SELLER, "B-2", RefusalCode.WRONG_BUYER),
        *(
            (status, "B-1", RefusalCode.NOT_PENDING)
            for status in CancellationStatus
            if status not in WITHDRAWABLE
        ),
    ],
)
def test_withdrawal_refusals(status: CancellationStatus, buyer_id: str, code: RefusalCode) -> None:
    with pytest.raises(DecisionRefused) as err:
        check_withdrawal(status=status, expected_buyer="B-1", buyer_id=buyer_id)
    assert err.value.code is code
    assert status.value in err.value.message or code is RefusalCode.WRONG_BUYER


def test_timeout_policy_outcomes() -> None:
    assert timeout_outcome(TimeoutPolicy.AUTO_APPROVE) is Decision.ACCEPT
    assert timeout_outcome(TimeoutPolicy.AUTO_REJECT) is Decision.REJECT
    assert timeout_outcome(TimeoutPolicy.ESCALATE) is None


def test_void_before_refund_and_deterministic_keys() -> None:
    assert refund_kind(CaptureState.AUTHORIZED) is RefundKind.VOID
    assert refund_kind(CaptureState.CAPTURED) is RefundKind.REFUND
    cid = cancellation_id("O-2001", "S-7")
    assert cid == "cancel-O-2001~S-7"
    assert refund_idempotency_key(cid) == refund_idempotency_key(cid) == f"{cid}:refund-submit"


# --- parse_duration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48h", timedelta(hours=48)),
        ("5s", timedelta(seconds=5)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("2d", timedelta(days=2)),
        ("10", timedelta(seconds=10)),
        ("1.5", timedelta(seconds=1.5)),
        (" 30M ", timedelta(minutes=30)),
        ("1m5s", timedelta(minutes=1, seconds=5)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "5x", "h5", "-1s", "1h 30m", "1.5h", "s", "5s!"])
def test_parse_duration_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@PROPERTY
@given(
    parts=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=1000), st.sampled_from(["d", "h", "m", "s", "ms"])
        ),
        min_size=1,
        max_size=5,
    )
)
def test_parse_duration_adds_its_parts(parts: list[tuple[int, str]]) -> None:
    unit = {
        "d": timedelta(days=1),
        "h": timedelta(hours=1),
        "m": timedelta(minutes=1),
        "s": timedelta(seconds=1),
        "ms": timedelta(milliseconds=1),
    }
    text = "".join(f"{n}{u}" for n, u in parts)
    expected = sum((n * unit[u] for n, u in parts), timedelta(0))
    assert abs(parse_duration(text) - expected) < timedelta(microseconds=1)


# --- price_order ---------------------------------------------------------------------------------


@st.composite
def checkout_orders(draw: st.DrawFn) -> CheckoutOrderIn:
    """Random valid checkout orders: 1-4 sellers, 1-5 lines each, 0-2 coupons with disjoint
    footprints whose discount does not exceed the items they pay for."""
    sellers = draw(
        st.lists(st.sampled_from(["S-1", "S-2", "S-3", "S-4"]), min_size=1, max_size=4, unique=True)
    )
    sub_orders: list[dict[str, Any]] = [
        {
            "seller_id": seller,
            "shipping_minor": draw(st.integers(min_value=0, max_value=3000)),
            "seller_accepted": draw(st.booleans()),
            "lines": [
                {
                    "sku": f"{seller}-{n}",
                    "quantity": draw(st.integers(min_value=1, max_value=20)),
                    "unit_price_minor": draw(st.integers(min_value=0, max_value=200_000)),
                }
                for n in range(draw(st.integers(min_value=1, max_value=5)))
            ],
        }
        for seller in sellers
    ]
    gross = {
        s["seller_id"]: sum(line["quantity"] * line["unit_price_minor"] for line in s["lines"])
        for s in sub_orders
    }
    # Deal each seller to coupon 0, coupon 1 or no coupon.
    assignment = draw(
        st.lists(st.sampled_from([0, 1, None]), min_size=len(sellers), max_size=len(sellers))
    )
    coupons = []
    for c in (0, 1):
        footprint = [s for s, a in zip(sellers, assignment, strict=True) if a == c]
        covered = sum(gross[s] for s in footprint)
        if not footprint or covered == 0:
            continue
        coupons.append(
            {
                "redemption_id": f"R-{c}",
                "coupon_code": "SPRING10",
                "discount_minor": draw(st.integers(min_value=1, max_value=covered)),
                "expires_at": "2030-01-01T00:00:00Z",
                "footprint": footprint,
            }
        )
    return CheckoutOrderIn.model_validate(
        {
            "order_id": "O-1",
            "buyer_id": "B-1",
            "currency": "EUR",
            "placed_at": "2026-01-01T00:00:00Z",
            "payment": {
                "payment_id": "P-1",
                "method": "card",
                "validation": draw(st.sampled_from(["validated", "unvalidated"])),
                "capture": "captured",
            },
            "sub_orders": sub_orders,
            "coupons": coupons,
        }
    )


@settings(max_examples=200, deadline=None)
@given(order=checkout_orders())
def test_price_order_properties(order: CheckoutOrderIn) -> None:
    priced = price_order(order)
    by_seller = {s.seller_id: s for s in priced}
    assert [s.seller_id for s in priced] == [s.seller_id for s in order.sub_orders]

    # Each coupon is allocated exactly over the lines of its footprint.
    for coupon in order.coupons:
        allocated = sum(
            line.discount_minor for seller in coupon.footprint for line in by_seller[seller].lines
        )
        assert allocated == coupon.discount_minor
    covered = {seller for c in order.coupons for seller in c.footprint}

    for sub_in, sub in zip(order.sub_orders, priced, strict=True):
        assert sub.items_minor == sum(line.gross_minor for line in sub_in.lines)
        assert sub.discount_minor == sum(line.discount_minor for line in sub.lines)
        assert sub.cash_minor == sub.items_minor - sub.discount_minor + sub.shipping_minor
        assert sub.cash_minor >= sub.shipping_minor == sub_in.shipping_minor
        for line in sub.lines:
            assert 0 <= line.discount_minor <= line.quantity * line.unit_price_minor
        if sub.seller_id not in covered:
            assert sub.discount_minor == 0
        instant = order.payment.validation.value == "unvalidated" and not sub_in.seller_accepted
        assert sub.status is (SubOrderStatus.UNVALIDATED if instant else SubOrderStatus.ACCEPTED)

    # The payment (sum of cash) is what the buyer paid: items - coupons + shipping.
    payment_total = sum(s.cash_minor for s in priced)
    assert payment_total == (
        sum(s.items_minor for s in priced)
        - sum(c.discount_minor for c in order.coupons)
        + sum(s.shipping_minor for s in priced)
    )
