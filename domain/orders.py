"""Checkout orders as the order system hands them over (`ordercancel orders load FILE.json`).

The order system owns orders; this service reads them. The file format is these models; its JSON
Schema is exported by `ordercancel orders schema`. Coupon discounts are allocated to lines here,
the way the order system does at checkout (largest remainder on minor units), so each sub-order
knows the cash paid for it.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field, model_validator

from domain.models import (
    CaptureState,
    Currency,
    FreeText,
    Identifier,
    MinorUnits,
    PaymentMethod,
    PaymentValidation,
    Strict,
    SubOrderStatus,
)
from domain.rules import allocate_largest_remainder


class OrderLine(Strict):
    sku: Identifier
    quantity: int = Field(ge=1, le=10_000)
    unit_price_minor: MinorUnits
    description: FreeText = ""

    @property
    def gross_minor(self) -> int:
        return self.quantity * self.unit_price_minor


class SubOrderIn(Strict):
    seller_id: Identifier
    lines: list[OrderLine] = Field(min_length=1, max_length=500)
    shipping_minor: MinorUnits = 0
    # Whether the seller already accepted the order. With an unvalidated payment and no
    # acceptance the buyer can cancel instantly (R1).
    seller_accepted: bool = True


class PaymentIn(Strict):
    payment_id: Identifier
    method: PaymentMethod
    validation: PaymentValidation
    capture: CaptureState


class CouponRedemptionIn(Strict):
    redemption_id: Identifier
    coupon_code: Identifier
    discount_minor: int = Field(gt=0, le=10**15)
    expires_at: datetime
    # Seller ids of the sub-orders this coupon paid for.
    footprint: list[Identifier] = Field(min_length=1)


class CheckoutOrderIn(Strict):
    order_id: Identifier
    buyer_id: Identifier
    currency: Currency
    placed_at: datetime
    payment: PaymentIn
    sub_orders: list[SubOrderIn] = Field(min_length=1, max_length=100)
    coupons: list[CouponRedemptionIn] = Field(default_factory=list, max_length=10)

    @model_validator(mode="after")
    def _consistent(self) -> CheckoutOrderIn:
        sellers = [s.seller_id for s in self.sub_orders]
        if len(set(sellers)) != len(sellers):
            raise ValueError("sub_orders: each seller appears once per checkout order")
        covered: set[str] = set()
        for i, coupon in enumerate(self.coupons):
            unknown = sorted(set(coupon.footprint) - set(sellers))
            if unknown:
                raise ValueError(f"coupons[{i}].footprint names unknown sellers: {unknown}")
            if len(set(coupon.footprint)) != len(coupon.footprint):
                raise ValueError(f"coupons[{i}].footprint repeats a seller")
            overlap = covered & set(coupon.footprint)
            if overlap:
                raise ValueError(
                    f"coupons[{i}].footprint overlaps another coupon's on {sorted(overlap)}"
                )
            covered |= set(coupon.footprint)
            gross = sum(
                line.gross_minor
                for sub in self.sub_orders
                if sub.seller_id in coupon.footprint
                for line in sub.lines
            )
            if coupon.discount_minor > gross:
                raise ValueError(
                    f"coupons[{i}].discount_minor ({coupon.discount_minor}) exceeds the items "
                    f"it pays for ({gross})"
                )
        ids = [c.redemption_id for c in self.coupons]
        if len(set(ids)) != len(ids):
            raise ValueError("coupons: redemption_id repeats")
        return self


class OrdersFile(Strict):
    orders: list[CheckoutOrderIn] = Field(min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _unique(self) -> OrdersFile:
        ids = [o.order_id for o in self.orders]
        if len(set(ids)) != len(ids):
            raise ValueError("orders: order_id repeats within the file")
        payments = [o.payment.payment_id for o in self.orders]
        if len(set(payments)) != len(payments):
            raise ValueError("orders: payment_id repeats within the file")
        redemptions = [c.redemption_id for o in self.orders for c in o.coupons]
        if len(set(redemptions)) != len(redemptions):
            raise ValueError("orders: redemption_id repeats within the file")
        return self


# --- what the loader writes --------------------------------------------------------------------


class PricedLine(Strict):
    line_no: int
    sku: str
    quantity: int
    unit_price_minor: int
    discount_minor: int


class PricedSubOrder(Strict):
    seller_id: str
    status: SubOrderStatus
    lines: list[PricedLine]
    items_minor: int
    discount_minor: int
    shipping_minor: int
    cash_minor: int


def price_order(order: CheckoutOrderIn) -> list[PricedSubOrder]:
    """Allocate each coupon over the lines of its footprint and total each sub-order."""
    line_discounts: dict[tuple[str, int], int] = {}
    for coupon in order.coupons:
        keys = [
            (sub.seller_id, n)
            for sub in order.sub_orders
            if sub.seller_id in coupon.footprint
            for n in range(len(sub.lines))
        ]
        weights = [
            line.gross_minor
            for sub in order.sub_orders
            if sub.seller_id in coupon.footprint
            for line in sub.lines
        ]
        for key, share in zip(
            keys, allocate_largest_remainder(coupon.discount_minor, weights), strict=True
        ):
            line_discounts[key] = share

    unvalidated = order.payment.validation is PaymentValidation.UNVALIDATED
    priced: list[PricedSubOrder] = []
    for sub in order.sub_orders:
        lines = [
            PricedLine(
                line_no=n + 1,
                sku=line.sku,
                quantity=line.quantity,
                unit_price_minor=line.unit_price_minor,
                discount_minor=line_discounts.get((sub.seller_id, n), 0),
            )
            for n, line in enumerate(sub.lines)
        ]
        items = sum(line.quantity * line.unit_price_minor for line in lines)
        discount = sum(line.discount_minor for line in lines)
        priced.append(
            PricedSubOrder(
                seller_id=sub.seller_id,
                status=(
                    SubOrderStatus.UNVALIDATED
                    if unvalidated and not sub.seller_accepted
                    else SubOrderStatus.ACCEPTED
                ),
                lines=lines,
                items_minor=items,
                discount_minor=discount,
                shipping_minor=sub.shipping_minor,
                cash_minor=items - discount + sub.shipping_minor,
            )
        )
    return priced
