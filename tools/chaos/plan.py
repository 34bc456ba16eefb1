"""What a chaos run does, decided up front from a seed: the orders, each cancellation's path and
what its buyer or seller will do, and the faults the payment provider injects per payment.

Pure (no I/O): the same seed gives the same plan, so a failing run can be replayed with
`python -m tools.chaos --seed N --count M`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import StrEnum
from typing import Any

from domain.models import CancellationReason, CancellationStatus
from domain.rules import cancellation_id
from payments.provider import SimulatorFaults


class Scenario(StrEnum):
    """The paths a cancellation takes (the table's "cancellations by path")."""

    INSTANT = "instant"
    ACCEPTED_UPDATE = "accepted (update)"
    ACCEPTED_SIGNAL = "accepted (signal)"
    REJECTED = "rejected"
    TIMED_OUT = "timed out"
    WITHDRAWN = "withdrawn"
    REVERSED = "reversed after success"
    SIBLINGS = "multi-seller + coupon, all at once"
    SIBLINGS_PARTIAL = "multi-seller + coupon, partly cancelled"
    SIBLINGS_INSTANT = "multi-seller instant, two coupons"
    PROBE = "probe (after a restart)"


class Action(StrEnum):
    """What the driver does once the request awaits the seller."""

    NOTHING = "nothing"  # instant path, or a silent seller (the window times out)
    ACCEPT_UPDATE = "accept_update"
    ACCEPT_SIGNAL = "accept_signal"
    REJECT_UPDATE = "reject_update"
    REJECT_SIGNAL = "reject_signal"
    WITHDRAW = "withdraw"


# Single-seller and multi-seller scenarios and how often each is drawn.
SCENARIO_WEIGHTS: dict[Scenario, int] = {
    Scenario.INSTANT: 14,
    Scenario.ACCEPTED_UPDATE: 14,
    Scenario.ACCEPTED_SIGNAL: 8,
    Scenario.REJECTED: 8,
    Scenario.TIMED_OUT: 10,
    Scenario.WITHDRAWN: 8,
    Scenario.REVERSED: 5,
    Scenario.SIBLINGS: 17,
    Scenario.SIBLINGS_PARTIAL: 8,
    Scenario.SIBLINGS_INSTANT: 8,
}
MULTI = (Scenario.SIBLINGS, Scenario.SIBLINGS_PARTIAL, Scenario.SIBLINGS_INSTANT)

FINAL_FAILURE_CODE = "card_declined"


class Probe(StrEnum):
    """Hostile messages (R20) a hostile cancellation receives while it awaits its seller, each
    one to be refused: as a signal (recorded, counted) or as an update (refused by its
    validator)."""

    NUL = "NUL in the reason"
    ESCAPE = "ESC in the reason"
    SURROGATE = "lone surrogate (raw JSON)"
    OVERSIZED = "reason over 2,000 characters"
    WRONG_ID = "wrong seller or buyer"
    MALFORMED = "malformed payload"


# Single-seller paths whose request waits for its seller: the hostile ones are drawn from them.
HOSTILE_SCENARIOS = (
    Scenario.ACCEPTED_UPDATE,
    Scenario.ACCEPTED_SIGNAL,
    Scenario.REJECTED,
    Scenario.WITHDRAWN,
)
OWN, OTHER = "own buyer", "another buyer"


@dataclass(frozen=True)
class HostilePlan:
    """What a hostile cancellation receives besides its buyer's and seller's own messages."""

    # Through the Temporal client, while it awaits its seller: signals (refused, counted, a
    # lone surrogate too: infra/converter.py) and updates (refused).
    signals: tuple[Probe, ...]
    updates: tuple[Probe, ...]
    # Through the `temporal` CLI: a signal with control characters while it awaits its seller;
    # a `workflow start` of its id while it runs, and one once it ended (OWN or OTHER buyer's
    # request); the decision again after it was taken (update, then signal).
    cli_signal: bool = False
    cli_start_running: str | None = None
    cli_start_ended: str | None = None
    cli_duplicate_decision: bool = False

    @property
    def counted_signals(self) -> int:
        """Refused signals the workflow must have counted, at least."""
        return len(self.signals) + int(self.cli_signal)


@dataclass(frozen=True)
class CancellationPlan:
    order_id: str
    seller_id: str
    buyer_id: str
    scenario: Scenario
    action: Action
    # The seller response window of this request, its seller's policy (R19): set before the
    # run for the seller (one seller per window, `S-W<seconds>`). None: the worker's, 48 h.
    window: timedelta | None
    # Seconds between "awaiting the seller" and the decision or withdrawal.
    delay: float
    expect: CancellationStatus
    reason: CancellationReason = CancellationReason.OUT_OF_STOCK
    # After it completes, the provider reports the refund failed (a reversal webhook).
    reverse: bool = False
    hostile: HostilePlan | None = None

    @property
    def workflow_id(self) -> str:
        return cancellation_id(self.order_id, self.seller_id)

    @property
    def approved(self) -> bool:
        return self.expect is CancellationStatus.COMPLETED


@dataclass(frozen=True)
class CouponPlan:
    redemption_id: str
    footprint: tuple[str, ...]
    expired: bool
    # Whether the run should end with it restored (every footprint sub-order cancelled and
    # refunded, not expired).
    expect_restored: bool


@dataclass
class OrderPlan:
    order_id: str
    payment_id: str
    scenario: Scenario
    # The orders-file document (docs/orders-format.md).
    document: dict[str, Any]
    cancellations: list[CancellationPlan]
    coupons: list[CouponPlan] = field(default_factory=list)
    faults: SimulatorFaults | None = None
    # Seconds after the start of the run at which its cancellations are requested.
    start_at: float = 0.0

    @property
    def validated(self) -> bool:
        return bool(self.document["payment"]["validation"] == "validated")


@dataclass
class Plan:
    seed: int
    tag: str
    orders: list[OrderPlan]
    probes: list[OrderPlan]

    def cancellations(self) -> list[CancellationPlan]:
        return [c for o in self.orders for c in o.cancellations]

    def all_orders(self) -> list[OrderPlan]:
        return [*self.orders, *self.probes]


@dataclass(frozen=True)
class FaultMix:
    """Per-payment provider faults: the share of payments that get each one."""

    transient: float = 0.25
    lose_response: float = 0.15
    slow_confirm: float = 0.30
    final_failure: float = 0.07


def _lines(rng: random.Random, seller: str) -> list[dict[str, Any]]:
    return [
        {
            "sku": f"{seller}-SKU-{n}",
            "quantity": rng.randint(1, 3),
            "unit_price_minor": rng.randint(300, 15_000),
        }
        for n in range(rng.randint(1, 3))
    ]


def _document(
    rng: random.Random,
    order_id: str,
    sellers: list[str],
    *,
    validated: bool,
    coupons: list[tuple[str, list[str], bool]],
) -> dict[str, Any]:
    """An orders-file order. `coupons`: (redemption id, footprint, expired)."""
    sub_orders: list[dict[str, Any]] = [
        {
            "seller_id": seller,
            "seller_accepted": validated,
            "shipping_minor": rng.choice([0, 199, 499, 799]),
            "lines": _lines(rng, seller),
        }
        for seller in sellers
    ]
    gross = {
        s["seller_id"]: sum(li["quantity"] * li["unit_price_minor"] for li in s["lines"])
        for s in sub_orders
    }
    return {
        "order_id": order_id,
        "buyer_id": f"B-{order_id}",
        "currency": "EUR",
        "placed_at": "2026-03-10T10:00:00Z",
        "payment": {
            "payment_id": f"P-{order_id}",
            "method": rng.choice(["card", "card", "wallet", "balance", "bank_transfer"]),
            "validation": "validated" if validated else "unvalidated",
            "capture": "captured" if validated else "authorized",
        },
        "sub_orders": sub_orders,
        "coupons": [
            {
                "redemption_id": redemption,
                "coupon_code": "CHAOS10",
                "discount_minor": rng.randint(1, min(3_000, sum(gross[s] for s in footprint))),
                "expires_at": "2020-01-01T00:00:00Z" if expired else "2099-01-01T00:00:00Z",
                "footprint": footprint,
            }
            for redemption, footprint, expired in coupons
        ],
    }


def _faults(rng: random.Random, mix: FaultMix, *, reverse: bool) -> SimulatorFaults | None:
    transient = rng.randint(1, 3) if rng.random() < mix.transient else 0
    lose = rng.random() < mix.lose_response
    slow = rng.randint(1, 3) if rng.random() < mix.slow_confirm else 0
    final = None if reverse or rng.random() >= mix.final_failure else FINAL_FAILURE_CODE
    if not (transient or lose or slow or final or reverse):
        return None
    return SimulatorFaults(
        transient_failures=transient,
        lose_response=lose,
        final_failure=final,
        confirm_after_polls=slow,
        fail_after_success=reverse,
    )


def _single(rng: random.Random, order_id: str, scenario: Scenario, mix: FaultMix) -> OrderPlan:
    seller = "S-1"
    instant = scenario in (Scenario.INSTANT, Scenario.PROBE)
    reverse = scenario is Scenario.REVERSED
    # Some single-seller orders carry a coupon too: restored once their one sub-order is
    # refunded (a reversal takes it back until the new refund is confirmed).
    with_coupon = reverse or (scenario is not Scenario.PROBE and rng.random() < 0.3)
    expired = with_coupon and not reverse and rng.random() < 0.2
    action, expect, window = {
        Scenario.INSTANT: (Action.NOTHING, CancellationStatus.COMPLETED, None),
        Scenario.PROBE: (Action.NOTHING, CancellationStatus.COMPLETED, None),
        Scenario.ACCEPTED_UPDATE: (Action.ACCEPT_UPDATE, CancellationStatus.COMPLETED, None),
        Scenario.ACCEPTED_SIGNAL: (Action.ACCEPT_SIGNAL, CancellationStatus.COMPLETED, None),
        Scenario.REVERSED: (Action.ACCEPT_UPDATE, CancellationStatus.COMPLETED, None),
        Scenario.REJECTED: (
            rng.choice([Action.REJECT_UPDATE, Action.REJECT_SIGNAL]),
            CancellationStatus.REJECTED,
            None,
        ),
        Scenario.TIMED_OUT: (
            Action.NOTHING,
            CancellationStatus.COMPLETED,
            timedelta(seconds=rng.randint(3, 12)),
        ),
        Scenario.WITHDRAWN: (Action.WITHDRAW, CancellationStatus.WITHDRAWN, None),
    }[scenario]
    if window is not None:
        seller = f"S-W{int(window.total_seconds())}"
    redemption = f"R-{order_id}"
    document = _document(
        rng,
        order_id,
        [seller],
        validated=not instant,
        coupons=[(redemption, [seller], expired)] if with_coupon else [],
    )
    cancellation = CancellationPlan(
        order_id=order_id,
        seller_id=seller,
        buyer_id=document["buyer_id"],
        scenario=scenario,
        action=action,
        window=window,
        delay=rng.uniform(0, 6),
        expect=expect,
        reason=rng.choice(list(CancellationReason)),
        reverse=reverse,
    )
    coupons = (
        [
            CouponPlan(
                redemption_id=redemption,
                footprint=(seller,),
                expired=expired,
                expect_restored=expect is CancellationStatus.COMPLETED and not expired,
            )
        ]
        if with_coupon
        else []
    )
    return OrderPlan(
        order_id=order_id,
        payment_id=document["payment"]["payment_id"],
        scenario=scenario,
        document=document,
        cancellations=[cancellation],
        coupons=coupons,
        faults=None if scenario is Scenario.PROBE else _faults(rng, mix, reverse=reverse),
    )


def _multi(
    rng: random.Random, order_id: str, scenario: Scenario, size: int, mix: FaultMix
) -> OrderPlan:
    sellers = [f"S-{n}" for n in range(1, size + 1)]
    instant = scenario is Scenario.SIBLINGS_INSTANT
    coupon_specs: list[tuple[str, list[str], bool]]
    if instant and size >= 3:
        # Two coupons with disjoint footprints: both come back once everything is voided.
        coupon_specs = [
            (f"R-{order_id}-A", sellers[:2], False),
            (f"R-{order_id}-B", sellers[2:], False),
        ]
    else:
        expired = scenario is Scenario.SIBLINGS and rng.random() < 0.15
        coupon_specs = [(f"R-{order_id}", list(sellers), expired)]
    document = _document(rng, order_id, sellers, validated=not instant, coupons=coupon_specs)
    buyer = document["buyer_id"]
    # Every sibling decides after the same delay: their refunds and coupon decisions race.
    delay = rng.uniform(0, 5)
    plans: list[CancellationPlan] = []
    if scenario is Scenario.SIBLINGS_PARTIAL:
        # Either one sibling is not cancelled at all, or the seller of one rejects.
        cancelled = sellers if rng.random() < 0.5 else sellers[:-1]
        rejecting = sellers[-1] if cancelled == sellers else None
    else:
        cancelled, rejecting = sellers, None
    for seller in cancelled:
        if instant:
            action, expect = Action.NOTHING, CancellationStatus.COMPLETED
        elif seller == rejecting:
            action, expect = Action.REJECT_UPDATE, CancellationStatus.REJECTED
        else:
            action = rng.choice([Action.ACCEPT_UPDATE, Action.ACCEPT_UPDATE, Action.ACCEPT_SIGNAL])
            expect = CancellationStatus.COMPLETED
        plans.append(
            CancellationPlan(
                order_id=order_id,
                seller_id=seller,
                buyer_id=buyer,
                scenario=scenario,
                action=action,
                window=None,
                delay=delay,
                expect=expect,
                reason=rng.choice(list(CancellationReason)),
            )
        )
    refunded = {p.seller_id for p in plans if p.approved}
    coupons = [
        CouponPlan(
            redemption_id=redemption,
            footprint=tuple(footprint),
            expired=expired,
            expect_restored=not expired and set(footprint) <= refunded,
        )
        for redemption, footprint, expired in coupon_specs
    ]
    return OrderPlan(
        order_id=order_id,
        payment_id=document["payment"]["payment_id"],
        scenario=scenario,
        document=document,
        cancellations=plans,
        coupons=coupons,
        faults=_faults(rng, mix, reverse=False),
    )


def _hostile(rng: random.Random, n: int) -> HostilePlan:
    """The `n`-th hostile cancellation's input; the first six cover every CLI kind."""
    probes = list(Probe)
    return HostilePlan(
        signals=tuple(rng.sample(probes, rng.randint(2, 4))),
        updates=tuple(rng.sample(probes, rng.randint(1, 2))),
        cli_signal=n == 0 or rng.random() < 0.2,
        cli_start_running=(OTHER if n == 1 else OWN if n == 2 or rng.random() < 0.1 else None),
        cli_start_ended=OTHER if n == 3 else OWN if n == 4 or rng.random() < 0.1 else None,
        cli_duplicate_decision=n == 5 or rng.random() < 0.15,
    )


def add_hostile(orders: list[OrderPlan], *, seed: int, share: float) -> None:
    """Make about `share` of the single-seller cancellations that wait for their seller
    hostile. Drawn from a generator of its own, so that the rest of a seed's plan is as it
    was without hostile input."""
    rng = random.Random(seed * 1_000_003 + 18)
    n = 0
    for order in sorted(orders, key=lambda o: o.order_id):
        if order.scenario not in HOSTILE_SCENARIOS or rng.random() >= share:
            continue
        order.cancellations = [replace(c, hostile=_hostile(rng, n)) for c in order.cancellations]
        n += 1


def make_plan(
    count: int,
    *,
    seed: int,
    tag: str,
    start_window: float,
    probes: int = 12,
    mix: FaultMix | None = None,
    hostile_share: float = 0.0,
) -> Plan:
    """About `count` cancellations (exactly `count` when it is at least 3) over every path,
    their requests spread over `start_window` seconds, about `hostile_share` of the
    single-seller ones awaiting their seller also sent hostile input (`HostilePlan`); plus
    `probes` spare instant-path orders the fault loop requests after a restart to see the
    workers recover."""
    if count < 1:
        raise ValueError("count must be at least 1")
    rng = random.Random(seed)
    mix = mix or FaultMix()
    orders: list[OrderPlan] = []
    remaining = count
    n = 0
    # Every path at least once when there is room for it.
    queue: list[Scenario] = list(SCENARIO_WEIGHTS) if count >= 20 else []
    rng.shuffle(queue)
    scenarios, weights = zip(*SCENARIO_WEIGHTS.items(), strict=True)
    while remaining > 0:
        n += 1
        order_id = f"CH{tag}-{n:05d}"
        scenario = queue.pop() if queue else rng.choices(scenarios, weights)[0]
        if scenario in MULTI:
            size = rng.choice([2, 3]) if scenario is not Scenario.SIBLINGS_INSTANT else 3
            if remaining < 2:
                scenario = Scenario.INSTANT
            else:
                order = _multi(rng, order_id, scenario, min(size, remaining), mix)
                # A partly cancelled order may cancel fewer sub-orders than it has.
                orders.append(order)
                remaining -= len(order.cancellations)
                continue
        orders.append(_single(rng, order_id, scenario, mix))
        remaining -= 1
    rng.shuffle(orders)
    add_hostile(orders, seed=seed, share=hostile_share)
    for i, order in enumerate(orders):
        order.start_at = start_window * i / max(1, len(orders))
    probe_orders = [_single(rng, f"CH{tag}-P{i:03d}", Scenario.PROBE, mix) for i in range(probes)]
    return Plan(seed=seed, tag=tag, orders=orders, probes=probe_orders)
