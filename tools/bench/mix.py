"""The cancellation mix and the orders it needs, made up for each run (unique ids).

A *unit* is what one buyer asks at once: one cancellation, or for `coupon` the two sub-orders of
a two-seller order paid partly with a coupon, cancelled concurrently. `--count` counts
cancellations (workflows); the shares of the mix are shares of cancellations, so a count of
100 with the default mix makes 30 instant, 45 accepted, 10 rejected, 5 silent and 10 coupon
cancellations (5 orders of two).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from domain.models import (
    CancellationReason,
    CaptureState,
    PaymentMethod,
    PaymentValidation,
    RequestCancellationInput,
)
from domain.orders import CheckoutOrderIn, CouponRedemptionIn, OrderLine, PaymentIn, SubOrderIn

INSTANT, ACCEPT, REJECT, SILENT, COUPON = "instant", "accept", "reject", "silent", "coupon"
PATHS = (INSTANT, ACCEPT, REJECT, SILENT, COUPON)
DEFAULT_MIX: dict[str, float] = {
    INSTANT: 0.30,
    ACCEPT: 0.45,
    REJECT: 0.10,
    SILENT: 0.05,
    COUPON: 0.10,
}
# The paths whose seller decides (update `decide`), and how.
DECISIONS = {ACCEPT: "accept", REJECT: "reject", COUPON: "accept"}
SELLERS = ("S-1", "S-2")
# The silent path's seller: its window (the bench's silent window) is its policy (R19), set by
# the run before it starts (`set_policy`), with the workers' floor below it.
SILENT_SELLER = "S-SILENT"


def parse_mix(text: str) -> dict[str, float]:
    """`instant=30,accept=45,...` (weights, normalised) -> shares."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in PATHS:
            raise ValueError(f"unknown path {name!r} in the mix; use {', '.join(PATHS)}")
        weights[name] = float(value)
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("the mix has no weight")
    return {p: weights.get(p, 0.0) / total for p in PATHS}


def allocate(count: int, mix: dict[str, float]) -> dict[str, int]:
    """Cancellations per path: coupon ones in pairs, the rest by largest remainder; with 6 or
    more cancellations every path of the mix gets at least one (two for coupon)."""
    coupon = 2 * math.floor(count * mix.get(COUPON, 0.0) / 2 + 0.5) if count >= 2 else 0
    coupon = min(coupon, count - count % 2)
    rest = count - coupon
    others = [p for p in PATHS if p != COUPON]
    weight = sum(mix.get(p, 0.0) for p in others)
    exact = {p: (rest * mix.get(p, 0.0) / weight if weight else 0.0) for p in others}
    got = {p: math.floor(v) for p, v in exact.items()}
    for p in sorted(others, key=lambda p: exact[p] - got[p], reverse=True)[
        : rest - sum(got.values())
    ]:
        got[p] += 1
    got[COUPON] = coupon
    if count >= 6:
        for p in PATHS:
            need = 2 if p == COUPON else 1
            while mix.get(p, 0.0) > 0 and got[p] < need:
                donor = max((q for q in others if got[q] > 1), key=lambda q: got[q])
                got[donor] -= 1
                got[p] += 1
    return {p: got[p] for p in PATHS}


@dataclass
class Unit:
    index: int
    path: str
    requests: list[RequestCancellationInput] = field(default_factory=list)
    # The silent path's window (its seller's policy); 0 otherwise.
    window: timedelta = timedelta(0)


def _order(
    order_id: str, buyer_id: str, *, validated: bool, sellers: tuple[str, ...], coupon: bool
) -> CheckoutOrderIn:
    placed = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)
    return CheckoutOrderIn(
        order_id=order_id,
        buyer_id=buyer_id,
        currency="EUR",
        placed_at=placed,
        payment=PaymentIn(
            payment_id=f"P-{order_id}",
            method=PaymentMethod.CARD,
            validation=PaymentValidation.VALIDATED if validated else PaymentValidation.UNVALIDATED,
            capture=CaptureState.CAPTURED if validated else CaptureState.AUTHORIZED,
        ),
        sub_orders=[
            SubOrderIn(
                seller_id=seller,
                seller_accepted=validated,
                shipping_minor=300,
                lines=[OrderLine(sku=f"SKU-{seller}", quantity=2, unit_price_minor=1250)],
            )
            for seller in sellers
        ],
        coupons=(
            [
                CouponRedemptionIn(
                    redemption_id=f"R-{order_id}",
                    coupon_code="BENCH5",
                    discount_minor=500,
                    expires_at=placed + timedelta(days=3650),
                    footprint=list(sellers),
                )
            ]
            if coupon
            else []
        ),
    )


def unit_count(counts: dict[str, int]) -> int:
    """How many units `counts` makes: one per cancellation, one per coupon pair."""
    return sum(n // (2 if path == COUPON else 1) for path, n in counts.items())


def build_units(
    run_id: str,
    side: str,
    counts: dict[str, int],
    *,
    silent_window: timedelta,
    seed: int = 7,
    rounds: int = 1,
) -> tuple[list[Unit], list[CheckoutOrderIn]]:
    """The units of one side, shuffled (paths interleave as in real traffic), and their orders.

    With `rounds`, the units come in that many consecutive slices of (nearly) equal size, the
    ones `run.split` cuts, and each slice has the mix in the same proportions (each path's
    count differs by at most one between slices): a round's ratio then differs from another's
    by the machine's noise, not by holding more silent sellers or coupon orders. Each slice is
    shuffled on its own, its silent sellers first (their window then runs while the rest of
    the slice does)."""
    units: list[Unit] = []
    orders: list[CheckoutOrderIn] = []
    index = 0
    for path in PATHS:
        n = counts.get(path, 0) // (2 if path == COUPON else 1)
        for _ in range(n):
            order_id = f"B{side[0].upper()}-{run_id}-{index:06d}"
            buyer_id = f"BB-{run_id}-{index:06d}"
            sellers = (
                SELLERS if path == COUPON else (SILENT_SELLER,) if path == SILENT else SELLERS[:1]
            )
            orders.append(
                _order(
                    order_id,
                    buyer_id,
                    validated=path != INSTANT,
                    sellers=sellers,
                    coupon=path == COUPON,
                )
            )
            reason = (
                CancellationReason.ORDERED_BY_MISTAKE
                if path in (INSTANT, COUPON)
                else CancellationReason.OUT_OF_STOCK
            )
            units.append(
                Unit(
                    index=index,
                    path=path,
                    requests=[
                        RequestCancellationInput(
                            order_id=order_id,
                            seller_id=seller,
                            buyer_id=buyer_id,
                            reason=reason,
                        )
                        for seller in sellers
                    ],
                    window=silent_window if path == SILENT else timedelta(0),
                )
            )
            index += 1
    return _stratified(units, rounds, random.Random(seed)), orders


def _stratified(units: list[Unit], rounds: int, rng: random.Random) -> list[Unit]:
    """`units` (grouped by path) dealt into `rounds` slices of `run.split`'s sizes, each slice
    taking every path in proportion, then each slice shuffled, its silent sellers first."""
    n = len(units)
    sizes = [(r + 1) * n // rounds - r * n // rounds for r in range(rounds)]
    # Slot k of the path-grouped order goes to the slice whose share it falls in: the slices'
    # positions interleaved in proportion to their sizes.
    slots = sorted((j / size, r) for r, size in enumerate(sizes) for j in range(size))
    dealt: list[list[Unit]] = [[] for _ in sizes]
    for unit, (_, r) in zip(units, slots, strict=True):
        dealt[r].append(unit)
    ordered: list[Unit] = []
    for part in dealt:
        rng.shuffle(part)
        # The silent sellers first: their window runs while the rest of the slice does, instead
        # of idling the machine at the slice's end (the driver frees their slot meanwhile).
        ordered += sorted(part, key=lambda unit: unit.window <= timedelta(0))
    return ordered
