"""Typed search attributes: what operations filter on in the Web UI and `temporal workflow list`."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

ORDER_ID = SearchAttributeKey.for_keyword("OrderId")
SELLER_ID = SearchAttributeKey.for_keyword("SellerId")
BUYER_ID = SearchAttributeKey.for_keyword("BuyerId")
CANCELLATION_STATUS = SearchAttributeKey.for_keyword("CancellationStatus")
REFUND_STAGE = SearchAttributeKey.for_int("RefundStage")
COUPON_OUTCOME = SearchAttributeKey.for_keyword("CouponOutcome")
SELLER_DEADLINE = SearchAttributeKey.for_datetime("SellerDeadline")

ALL = (
    ORDER_ID,
    SELLER_ID,
    BUYER_ID,
    CANCELLATION_STATUS,
    REFUND_STAGE,
    COUPON_OUTCOME,
    SELLER_DEADLINE,
)

# For `temporal server start-dev --search-attribute NAME=TYPE` and
# `temporal operator search-attribute create --name NAME --type TYPE`.
CLI_TYPES = {
    "OrderId": "Keyword",
    "SellerId": "Keyword",
    "BuyerId": "Keyword",
    "CancellationStatus": "Keyword",
    "RefundStage": "Int",
    "CouponOutcome": "Keyword",
    "SellerDeadline": "Datetime",
}
