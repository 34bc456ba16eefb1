"""The endpoints. Each one: who may call it, the body model, then one service call."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable
from typing import Annotated, Any

import stripe
import structlog
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ValidationError

from api.deps import Context, allow, checked_id, checked_idempotency_key, json_body
from api.errors import ApiError, problem_responses
from api.keys import Principal, Role
from api.schemas import (
    CancellationAccepted,
    CancellationDetails,
    EscalationDecisionBody,
    Health,
    MessageBody,
    Readiness,
    RetryRefundBody,
    WithdrawalReceipt,
)
from api.service import details, not_found, workflow_id_for
from api.signing import SIGNATURE_HEADER, SignatureRefused, verify_signature
from api.stores import request_hash
from domain.models import (
    WINDOW_NOT_ALLOWED,
    CancellationStatus,
    DecisionReceipt,
    MessageAuthor,
    MessageReceipt,
    OperatorDecision,
    PaymentEvent,
    RequestCancellationInput,
    RetryRefundRequest,
    SellerDecision,
    WithdrawRequest,
)
from domain.order_events import OrderAccepted, OrderEventIn, OrderEventResult
from domain.orders import CheckoutOrderIn
from domain.rules import parse_duration
from ledger.inbox import LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, CancellationPage, OrderView
from ledger.stuck import StuckCancellation
from starter.cancellations import Located
from starter.payment_events import ForwardResult
from starter.stripe_events import StripeWebhookResult

log = structlog.get_logger("api")

router = APIRouter()

READY_TIMEOUT = 2.0

# Request bodies are parsed by `json_body` (after the key and role checks), so FastAPI does not
# see them; the OpenAPI document names them here (api.app adds their schemas).
BODY_MODELS: list[type[BaseModel]] = [
    RequestCancellationInput,
    SellerDecision,
    WithdrawRequest,
    RetryRefundBody,
    EscalationDecisionBody,
    PaymentEvent,
    CheckoutOrderIn,
    OrderEventIn,
    MessageBody,
]


def _body(model: type[BaseModel], **extra: Any) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        },
        **extra,
    }


BuyerService = Annotated[
    Principal, Depends(allow(Role.BUYER_SERVICE, action="request or withdraw cancellations"))
]
Seller = Annotated[Principal, Depends(allow(Role.SELLER, action="decide on cancellations"))]
Reader = Annotated[
    Principal,
    Depends(allow(Role.BUYER_SERVICE, Role.SELLER, Role.SRE, action="read cancellations")),
]
Writer = Annotated[
    Principal,
    Depends(allow(Role.BUYER_SERVICE, Role.SELLER, action="write messages on requests")),
]
OrderReader = Annotated[
    Principal,
    Depends(allow(Role.BUYER_SERVICE, Role.SELLER, Role.SRE, action="read orders")),
]
Sre = Annotated[Principal, Depends(allow(Role.SRE, action="retry refunds"))]
SreOperator = Annotated[Principal, Depends(allow(Role.SRE, action="resolve escalations"))]
SreReader = Annotated[Principal, Depends(allow(Role.SRE, action="list stuck requests"))]
OrderSystem = Annotated[
    Principal, Depends(allow(Role.ORDER_SYSTEM, action="post orders and order events"))
]
Provider = Annotated[
    Principal, Depends(allow(Role.PAYMENT_PROVIDER, action="deliver payment events"))
]


def _ensure_own(principal: Principal, located: Located) -> None:
    """A seller key acts on its own sub-orders only. Another seller's cancellation is answered
    exactly as one that does not exist: a seller learns nothing about other sellers'."""
    if principal.role is Role.SELLER and located.view.seller_id != principal.seller_id:
        log.warning(
            "api_foreign_sub_order",
            principal=str(principal),
            cancellation_id=located.view.cancellation_id,
        )
        raise not_found()


def _operator_id(principal: Principal, claimed: str | None) -> str:
    """The operator an SRE key acts as; a body that names another is refused."""
    if claimed is not None and claimed != principal.operator_id:
        raise ApiError(
            403,
            "operator_mismatch",
            f"{principal} acts as operator {principal.operator_id!r}, not {claimed!r}: the"
            " operator is the API key's (omit operator_id)",
        )
    return principal.operator_id


_request_body = json_body(RequestCancellationInput)


async def request_body(request: Request) -> RequestCancellationInput:
    """R19: a request that names its own seller window is refused with a code of its own (422
    `window_not_allowed`): the window is the seller's policy. Nothing is started or written."""
    try:
        return await _request_body(request)
    except ApiError as err:
        if err.status == 422 and any(WINDOW_NOT_ALLOWED in e.msg for e in err.errors):
            raise ApiError(
                422, "window_not_allowed", WINDOW_NOT_ALLOWED, errors=err.errors
            ) from None
        raise


# --- cancellations ------------------------------------------------------------------------------


@router.post(
    "/v1/cancellations",
    response_model=CancellationAccepted,
    status_code=200,
    summary="Request the cancellation of one sub-order (idempotent)",
    description=(
        "Starts the cancellation, or returns the one that exists for the sub-order. 200 with"
        " `outcome` when it has ended (an instant-path cancellation usually ends within the"
        " request), 202 while it goes on (the seller decides, or the refund is under way)."
        " An `Idempotency-Key` replayed with the same body returns the same cancellation;"
        " with another body it is refused (422 `idempotency_key_reused`)."
    ),
    responses={
        202: {"model": CancellationAccepted, "description": "Accepted, still in progress"},
        **problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
    },
    openapi_extra=_body(RequestCancellationInput),
)
async def request_cancellation(
    ctx: Context,
    principal: BuyerService,
    request: Annotated[RequestCancellationInput, Depends(request_body)],
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Any 1-255 printable characters; scoped to the caller's key",
        ),
    ] = None,
) -> CancellationAccepted:
    key = checked_idempotency_key(idempotency_key)
    # A request that cannot succeed claims no key: the caller may fix it and reuse the key.
    await ctx.service.check_cancellable(request)
    if key is not None:
        first = await ctx.idempotency.claim(
            principal=str(principal),
            key=key,
            request_hash=request_hash(request),
            cancellation_id=workflow_id_for(request),
        )
        if first.request_hash != request_hash(request):
            raise ApiError(
                422,
                "idempotency_key_reused",
                f"Idempotency-Key {key!r} was first used with another request (for"
                f" {first.cancellation_id}); use a new key for a new request",
            )
    accepted = await ctx.service.request(request)
    response.status_code = 200 if accepted.final else 202
    response.headers["Location"] = accepted.status_url
    return accepted


_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")  # domain.models.Identifier


def _filter(name: str, value: str | None) -> str | None:
    if value is not None and not _IDENTIFIER.fullmatch(value):
        raise ApiError(
            400,
            "invalid_filter",
            f"{name}: an identifier ([A-Za-z0-9][A-Za-z0-9_.:-], at most 64 characters)",
        )
    return value


def _limit(value: str | None) -> int:
    if value is None:
        return LIST_LIMIT_DEFAULT
    digits = value.isascii() and value.isdigit() and len(value) <= 6
    if not digits or not 1 <= int(value) <= LIST_LIMIT_MAX:
        raise ApiError(400, "invalid_limit", f"limit: a whole number from 1 to {LIST_LIMIT_MAX}")
    return int(value)


def _status(value: str | None) -> CancellationStatus | None:
    if value is None:
        return None
    try:
        return CancellationStatus(value)
    except ValueError:
        raise ApiError(
            400,
            "invalid_status",
            "status: one of " + ", ".join(s.value for s in CancellationStatus),
        ) from None


@router.get(
    "/v1/cancellations",
    response_model=CancellationPage,
    summary="List cancellations: a seller's inbox, a search (R17; the ledger's view)",
    description=(
        "Filters `seller_id`, `buyer_id`, `order_id`, `status` (all optional, combined)."
        " Requests awaiting their seller come first, the soonest deadline first; then every"
        " other cancellation, oldest first. A seller key sees only its own sub-orders, whatever"
        " filter it sends (another seller's id gives an empty page). Keyset pagination: pass"
        " `next_cursor` back as `cursor`; new cancellations arriving meanwhile neither repeat"
        f" nor hide a row. `limit`: 1-{LIST_LIMIT_MAX}, default {LIST_LIMIT_DEFAULT}. 400"
        " `invalid_limit`, `invalid_cursor`, `invalid_status`, `invalid_filter`."
    ),
    responses=problem_responses(400, 401, 403, 503),
)
async def list_cancellations(
    ctx: Context,
    principal: Reader,
    seller_id: Annotated[str | None, Query(description="Only this seller's")] = None,
    buyer_id: Annotated[str | None, Query(description="Only this buyer's")] = None,
    order_id: Annotated[str | None, Query(description="Only this checkout order's")] = None,
    status: Annotated[str | None, Query(description="Only in this status")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the last page")] = None,
    limit: Annotated[
        str | None, Query(description=f"1-{LIST_LIMIT_MAX}, default {LIST_LIMIT_DEFAULT}")
    ] = None,
) -> CancellationPage:
    seller = _filter("seller_id", seller_id)
    if principal.role is Role.SELLER:
        if seller is not None and seller != principal.seller_id:
            # Another seller's: nothing, as for a seller with no cancellation.
            return CancellationPage(items=[])
        seller = principal.seller_id
    if cursor is not None and len(cursor) > 1024:
        raise ApiError(400, "invalid_cursor", "cursor: not a cursor this service handed out")
    return await ctx.service.list(
        seller_id=seller,
        buyer_id=_filter("buyer_id", buyer_id),
        order_id=_filter("order_id", order_id),
        status=_status(status),
        cursor=cursor,
        limit=_limit(limit),
    )


@router.get(
    "/v1/orders/{order_id}/cancellations",
    response_model=OrderView,
    summary="The buyer's order view: every sub-order with its cancellation (R17)",
    description=(
        "Every sub-order of the checkout order, each with its cancellation if any: status,"
        " the seller's deadline, the three refund dots each with when it happened, the ETA,"
        " and the coupon outcome as it stands now (a sibling's later restoration included)."
        " From the ledger. A seller key sees its own sub-order only. 404 `order_not_found`."
    ),
    responses=problem_responses(401, 403, 404, 503),
)
async def order_cancellations(ctx: Context, principal: OrderReader, order_id: str) -> OrderView:
    if not _IDENTIFIER.fullmatch(order_id):
        raise ApiError(404, "order_not_found", "no such order")
    view = await ctx.service.order(order_id)
    if principal.role is Role.SELLER:
        own = [s for s in view.sub_orders if s.seller_id == principal.seller_id]
        if not own:
            raise ApiError(404, "order_not_found", f"no order {order_id}")
        view = view.model_copy(update={"sub_orders": own})
    return view


@router.get(
    "/v1/cancellations/{cancellation_id}",
    response_model=CancellationDetails,
    summary="State, the three refund dots with ETA, coupon outcome, audit trail",
    responses=problem_responses(401, 403, 404, 503),
)
async def get_cancellation(
    ctx: Context, principal: Reader, cancellation_id: str
) -> CancellationDetails:
    located = await ctx.service.locate(checked_id(cancellation_id))
    _ensure_own(principal, located)
    return details(located)


@router.post(
    "/v1/cancellations/{cancellation_id}/seller-decision",
    response_model=DecisionReceipt,
    summary="The seller accepts or rejects (workflow update `decide`: the answer is final)",
    description=(
        "`seller_id` must be the calling seller's. 409 with the workflow's refusal code when"
        " the decision is not allowed now: `already_decided`, `not_pending`, `wrong_seller`."
        " Another seller's cancellation is 404, as one that does not exist."
    ),
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503, 504),
    openapi_extra=_body(SellerDecision),
)
async def seller_decision(
    ctx: Context,
    principal: Seller,
    cancellation_id: str,
    decision: Annotated[SellerDecision, Depends(json_body(SellerDecision))],
) -> DecisionReceipt:
    if decision.seller_id != principal.seller_id:
        raise ApiError(
            403,
            "seller_mismatch",
            f"{principal} may not decide for seller {decision.seller_id!r}",
        )
    located = await ctx.service.locate(checked_id(cancellation_id))
    _ensure_own(principal, located)
    return await ctx.service.decide(located, decision)


@router.post(
    "/v1/cancellations/{cancellation_id}/messages",
    response_model=MessageReceipt,
    summary="The buyer or the seller writes on a waiting request (update `message`, R18)",
    description=(
        "Who writes is the caller's key: a seller key as its seller (another seller's"
        " cancellation is 404), the buyer service as the cancellation's buyer; never the body."
        " Taken while the request waits for the seller: 409 `already_decided` once answered or"
        " withdrawn, `not_pending` otherwise; 422 `message_too_long` past 500 characters, 409"
        " `too_many_messages` past 20 per cancellation. A refused message changes nothing."
    ),
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503, 504),
    openapi_extra=_body(MessageBody),
)
async def post_message(
    ctx: Context,
    principal: Writer,
    cancellation_id: str,
    body: Annotated[MessageBody, Depends(json_body(MessageBody))],
) -> MessageReceipt:
    located = await ctx.service.locate(checked_id(cancellation_id))
    _ensure_own(principal, located)
    if principal.role is Role.SELLER:
        assert principal.seller_id is not None
        author, author_id = MessageAuthor.SELLER, principal.seller_id
    else:
        author, author_id = MessageAuthor.BUYER, located.view.buyer_id
    return await ctx.service.message(located, author, author_id, body.text)


@router.post(
    "/v1/cancellations/{cancellation_id}/withdraw",
    response_model=WithdrawalReceipt,
    summary="The buyer withdraws a pending request (signal `withdraw`)",
    description=(
        "409 `not_pending` unless the request awaits the seller (or an operator), 409"
        " `wrong_buyer` for another buyer, 409 `already_decided` when a decision won the race."
        " 200 once applied; 202 if the workflow had not applied it within a few seconds."
    ),
    responses={
        202: {"model": WithdrawalReceipt, "description": "Sent, not applied yet"},
        **problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
    },
    openapi_extra=_body(WithdrawRequest),
)
async def withdraw(
    ctx: Context,
    principal: BuyerService,
    cancellation_id: str,
    request: Annotated[WithdrawRequest, Depends(json_body(WithdrawRequest))],
    response: Response,
) -> WithdrawalReceipt:
    located = await ctx.service.locate(checked_id(cancellation_id))
    receipt = await ctx.service.withdraw(located, request)
    response.status_code = 200 if receipt.applied else 202
    return receipt


@router.post(
    "/v1/cancellations/{cancellation_id}/retry-refund",
    response_model=DecisionReceipt,
    summary="Retry a parked refund (update `retry_refund`)",
    description=(
        "The operator recorded is the caller's key (`sre:<operator>`, or `sre`), never the"
        " body's. 409 `not_refund_failed` unless the refund is parked in `refund_failed`."
        " The refund resumes under its idempotency key; one the provider declined or"
        " reversed gets the next generation's key. The receipt's `message` names the key used."
    ),
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503, 504),
    openapi_extra=_body(RetryRefundBody),
)
async def retry_refund(
    ctx: Context,
    principal: Sre,
    cancellation_id: str,
    body: Annotated[RetryRefundBody, Depends(json_body(RetryRefundBody))],
) -> DecisionReceipt:
    request = RetryRefundRequest(
        operator_id=_operator_id(principal, body.operator_id), reason=body.reason
    )
    located = await ctx.service.locate(checked_id(cancellation_id))
    return await ctx.service.retry_refund(located, request)


@router.post(
    "/v1/cancellations/{cancellation_id}/escalation-decision",
    response_model=DecisionReceipt,
    summary=(
        "An operator decides an escalated request, or one still waiting for its seller"
        " (update `resolve_escalation`)"
    ),
    description=(
        "For a request escalated to operators when the seller's window ran out (timeout"
        " policy `escalate`), or one still `awaiting_seller` that an operator decides instead of"
        " the seller (a stuck request, `GET /v1/stuck`). The operator recorded is the caller's"
        " key (`sre:<operator>`, or `sre`), never the body's. 409 with the workflow's refusal"
        " code when not allowed now: `not_escalated`, `already_decided`."
    ),
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503, 504),
    openapi_extra=_body(EscalationDecisionBody),
)
async def escalation_decision(
    ctx: Context,
    principal: SreOperator,
    cancellation_id: str,
    body: Annotated[EscalationDecisionBody, Depends(json_body(EscalationDecisionBody))],
) -> DecisionReceipt:
    decision = OperatorDecision(
        operator_id=_operator_id(principal, body.operator_id),
        decision=body.decision,
        reason=body.reason,
    )
    located = await ctx.service.locate(checked_id(cancellation_id))
    return await ctx.service.resolve_escalation(located, decision)


@router.get(
    "/v1/stuck",
    response_model=list[StuckCancellation],
    summary="Requests waiting for their seller, or escalated, oldest first (the ledger's view)",
    description=(
        "Requests in `awaiting_seller` or `escalated` requested at least `older_than` ago"
        " (a duration: `24h`, `30m`; default `0s`), oldest first, with how long they have"
        " waited and how long is left until the seller's deadline the ledger recorded"
        " (negative: overdue). An operator may decide one: `escalation-decision`."
    ),
    responses=problem_responses(400, 401, 403, 422, 503),
)
async def stuck(
    ctx: Context,
    principal: SreReader,
    older_than: Annotated[str, Query(max_length=32, description="e.g. 24h, 30m")] = "0s",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[StuckCancellation]:
    try:
        threshold = parse_duration(older_than)
    except ValueError as err:
        raise ApiError(422, "invalid_duration", f"older_than: {err}") from None
    return await ctx.service.stuck(older_than=threshold, limit=limit)


# --- the payment provider's webhook -------------------------------------------------------------


@router.post(
    "/v1/payment-events",
    response_model=ForwardResult,
    summary="The payment provider's refund news (signed; deduplicated by event id)",
    description=(
        f"Needs a `payment-provider` key and an `{SIGNATURE_HEADER}: t=<unix>,v1=<hex>` header:"
        " HMAC-SHA256 of `<t>.<raw body>` with the shared secret, `t` within the tolerance."
        " The answer tells what was done: `delivered`, `reopened`, `ignored`, `unknown_refund`;"
        " `duplicate: true` for an event id seen before (the first answer is repeated)."
    ),
    responses=problem_responses(400, 401, 403, 413, 415, 422, 503),
    openapi_extra=_body(
        PaymentEvent,
        parameters=[
            {
                "name": SIGNATURE_HEADER,
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<raw body>'>",
            }
        ],
    ),
)
async def payment_event(ctx: Context, principal: Provider, request: Request) -> ForwardResult:
    if ctx.webhook_secret is None:
        raise ApiError(503, "webhook_not_configured", "no payment webhook secret is configured")
    body = await request.body()
    try:
        verify_signature(
            ctx.webhook_secret,
            request.headers.get(SIGNATURE_HEADER),
            body,
            now=time.time(),
            tolerance=ctx.settings.webhook_tolerance,
        )
    except SignatureRefused as err:
        status = 400 if err.code == "malformed_signature" else 401
        raise ApiError(status, err.code, err.message) from None
    # Parsed only once the signature proves who sent it.
    event = await json_body(PaymentEvent)(request)
    return await ctx.service.payment_event(event)


# --- the order system (R13, R14) ----------------------------------------------------------------

_ORDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")  # domain.models.Identifier


@router.post(
    "/v1/orders",
    response_model=OrderAccepted,
    summary="One checkout order, in the orders-file format (idempotent by order id)",
    description=(
        "The order as one entry of the orders file (docs/orders-format.md). The same document"
        " again changes nothing (`created: false`); another document under the same order id,"
        " or a payment or redemption id of another order, is refused (409 `order_conflict`)."
    ),
    responses=problem_responses(400, 401, 403, 409, 413, 415, 422, 503),
    openapi_extra=_body(CheckoutOrderIn),
)
async def post_order(
    ctx: Context,
    principal: OrderSystem,
    order: Annotated[CheckoutOrderIn, Depends(json_body(CheckoutOrderIn))],
) -> OrderAccepted:
    return await ctx.service.post_order(order)


@router.post(
    "/v1/orders/{order_id}/events",
    response_model=OrderEventResult,
    summary="What happened to an order: payment validated or captured, seller accepted, shipped",
    description=(
        "Applied once per `event_id` and in causal order whatever the arrival order (R13):"
        " captured implies validated, shipped implies accepted, a late fact already implied"
        " changes nothing (`outcome: unchanged`). The same event again gets the same answer"
        " (`duplicate: true`); another document under the same id is 409 `event_conflict`."
        " 404 `order_not_found` / `sub_order_not_found`; 422 `amount_exceeds_authorisation`"
        " for a capture above the authorisation. A shipment that ends a request waiting for"
        " its seller (`outcome: request_rejected`, R14) is told to its workflow before the"
        " answer; if that fails, 503 `workflow_unavailable` (the event is recorded: deliver it"
        " again)."
    ),
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
    openapi_extra=_body(OrderEventIn),
)
async def order_event(
    ctx: Context,
    principal: OrderSystem,
    order_id: str,
    event: Annotated[OrderEventIn, Depends(json_body(OrderEventIn))],
) -> OrderEventResult:
    if not _ORDER_ID.fullmatch(order_id):
        raise ApiError(404, "order_not_found", "no such order")
    return await ctx.service.order_event(order_id, event)


STRIPE_SIGNATURE_HEADER = "Stripe-Signature"


def _stripe_timestamp(header: str) -> int:
    """The `t` of a Stripe-Signature the SDK has accepted: the first, as the SDK reads it."""
    for item in header.split(","):
        key, _, value = item.partition("=")
        if key == "t":
            try:
                return int(value)
            except ValueError:
                break
    raise ApiError(400, "invalid_signature", f"the {STRIPE_SIGNATURE_HEADER} has no timestamp")


@router.post(
    "/v1/providers/stripe/webhook",
    response_model=StripeWebhookResult,
    summary="Stripe's webhook events, as Stripe sends them (Stripe-Signature; no API key)",
    description=(
        f"Verified with the Stripe SDK: the `{STRIPE_SIGNATURE_HEADER}` header"
        " (`t=<unix>,v1=<hex HMAC-SHA256 of '<t>.<raw body>'>`) against the endpoint secret"
        " (`ORDERCANCEL_STRIPE_WEBHOOK_SECRET`), `t` within the webhook tolerance (in either"
        " direction). Refund"
        " updated / failed, charge refunded, PaymentIntent captured / canceled become the"
        " product's payment events (`forwarded`, each as `/v1/payment-events` answers it;"
        " deduplicated by the Stripe event id); any other type is acknowledged with"
        " `handled: false`. A bad signature is refused (400) and changes nothing."
    ),
    responses=problem_responses(400, 413, 422, 503),
    openapi_extra={
        "parameters": [
            {
                "name": STRIPE_SIGNATURE_HEADER,
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<raw body>'>",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    },
)
async def stripe_webhook(ctx: Context, request: Request) -> StripeWebhookResult:
    if ctx.stripe_webhook_secret is None:
        raise ApiError(
            503, "webhook_not_configured", "no Stripe webhook endpoint secret is configured"
        )
    header = request.headers.get(STRIPE_SIGNATURE_HEADER)
    if not header:
        raise ApiError(400, "missing_signature", f"the {STRIPE_SIGNATURE_HEADER} header is missing")
    body = await request.body()
    try:
        event = stripe.Webhook.construct_event(
            body.decode("utf-8"),
            header,
            ctx.stripe_webhook_secret,
            tolerance=int(ctx.settings.webhook_tolerance.total_seconds()),
        )
    except stripe.SignatureVerificationError:
        raise ApiError(
            400,
            "invalid_signature",
            f"the {STRIPE_SIGNATURE_HEADER} does not match this body and the endpoint secret,"
            " or is too old",
        ) from None
    except (ValueError, TypeError, AttributeError):
        # Not UTF-8, not JSON, or JSON that is no object: signed or not, nothing to do with it.
        raise ApiError(400, "malformed_json", "the body is not a Stripe event (JSON)") from None
    # The SDK refuses only a `t` too far in the past; one too far in the future is refused
    # too, as /v1/payment-events refuses it (a signature made ahead of time is no fresher).
    if _stripe_timestamp(header) > time.time() + ctx.settings.webhook_tolerance.total_seconds():
        raise ApiError(
            400,
            "invalid_signature",
            f"the {STRIPE_SIGNATURE_HEADER} timestamp is more than the webhook tolerance in the"
            " future",
        )
    data = event.to_dict()
    if not isinstance(data.get("id"), str) or not isinstance(data.get("type"), str):
        raise ApiError(400, "invalid_event", "a Stripe event needs an `id` and a `type`")
    try:
        return await ctx.service.stripe_event(data)
    except ValidationError as err:
        # Signed, but an id or code no payment event may carry (a control character, too
        # long): refused before anything is forwarded or recorded.
        raise ApiError(
            422,
            "invalid_event",
            f"the Stripe event cannot be mapped: {err.errors()[0]['msg']}",
        ) from None


# --- operations ---------------------------------------------------------------------------------


@router.get("/healthz", response_model=Health, summary="The process is up (no dependencies)")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Ready when PostgreSQL and Temporal both answer",
    responses={503: {"model": Readiness, "description": "Not ready"}},
)
async def readyz(request: Request, response: Response) -> Readiness:
    ctx = getattr(request.app.state, "ctx", None)
    if ctx is None:
        checks = {"api": "starting or stopping"}
    else:
        checks = {
            "postgres": await _check("postgres", ctx.ping_database()),
            "temporal": await _check("temporal", ctx.client.service_client.check_health()),
        }
    ready = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ready else 503
    return Readiness(status="ready" if ready else "not_ready", checks=checks)


async def _check(name: str, probe: Awaitable[object]) -> str:
    """ "ok" or "unavailable": the caller (anyone, unauthenticated) learns which dependency is
    down, never why; the error, which may name hosts, users or paths, goes to the log."""
    try:
        answer = await asyncio.wait_for(probe, READY_TIMEOUT)
    except Exception as err:  # any failure means "not ready"
        log.warning("readiness_check_failed", check=name, error=f"{type(err).__name__}: {err}")
        return "unavailable"
    if answer is False:
        log.warning("readiness_check_failed", check=name, error="not serving")
        return "unavailable"
    return "ok"
