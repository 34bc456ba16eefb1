"""Starting a cancellation (one workflow per sub-order, joined if it exists): what the API,
the CLI and the tools call."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from domain.errors import SubOrderNotFound
from domain.models import (
    CancellationResult,
    CancellationStatus,
    CancellationView,
    Money,
    PaymentMethod,
    RequestCancellationInput,
    SubOrderStatus,
)
from domain.rules import cancellation_id
from infra.settings import TASK_QUEUE
from ledger.order_events import refuse_if_shipped_else_amount
from ledger.repository import Ledger
from starter.order_events import OrderRefused
from workflows import search_attributes as sa
from workflows.order_cancellation import OrderCancellation
from workflows.visibility import escape_markdown


async def check_cancellable(pool: asyncpg.Pool, request: RequestCancellationInput) -> None:
    """Refuse what the workflow would fail on, before it exists (the API and `ordercancel
    request` both ask this): `OrderRefused` with `sub_order_not_found` (404; the same for a
    wrong buyer as for no order: it reveals nothing about whose order it is, as the workflow
    does), `already_shipped` (409, R14) or `sub_order_already_cancelled` (409)."""
    row = await pool.fetchrow(
        """
        SELECT o.buyer_id, s.status, c.cancellation_id, s.shipped_at IS NOT NULL AS shipped
        FROM sub_orders s
        JOIN checkout_orders o ON o.order_id = s.order_id
        LEFT JOIN cancellations c ON c.order_id = s.order_id AND c.seller_id = s.seller_id
        WHERE s.order_id = $1 AND s.seller_id = $2
        """,
        request.order_id,
        request.seller_id,
    )
    sub_order = f"{request.order_id}/{request.seller_id}"
    if row is None or row["buyer_id"] != request.buyer_id:
        raise OrderRefused(
            404,
            "sub_order_not_found",
            f"order {request.order_id} has no sub-order of seller {request.seller_id} for"
            f" buyer {request.buyer_id}",
        )
    if row["shipped"] and row["cancellation_id"] is None:
        raise OrderRefused(
            409,
            "already_shipped",
            f"sub-order {sub_order} has shipped: it cannot be cancelled here (a return or a"
            " dispute can) (R14)",
        )
    if row["status"] == SubOrderStatus.CANCELLED.value and row["cancellation_id"] is None:
        raise OrderRefused(
            409,
            "sub_order_already_cancelled",
            f"sub-order {sub_order} was cancelled by the order system",
        )


def summary(
    request: RequestCancellationInput, amount: tuple[Money, PaymentMethod] | None = None
) -> str:
    """The one line operators see in the workflow list, e.g.
    "Cancel order O-1001 / seller S-7: 25.40 EUR, card (out_of_stock)"."""
    money = f"{amount[0]}, {amount[1].value.replace('_', ' ')} " if amount else ""
    return (
        f"Cancel order {request.order_id} / seller {request.seller_id}: "
        f"{money}({request.reason.value}, {request.reason.fault.value} fault)"
    )


def details(request: RequestCancellationInput) -> str:
    """The static details (Markdown) operators see on the workflow's page: who asked what."""
    return (
        f"**Order** {request.order_id}  \n**Seller** {request.seller_id}  \n"
        f"**Buyer** {request.buyer_id}  \n**Reason** {request.reason.value} "
        f"({request.reason.fault.value} fault)"
        + (f"  \n> {escape_markdown(request.reason_text)}" if request.reason_text else "")
    )


def start_attributes(request: RequestCancellationInput) -> TypedSearchAttributes:
    """Every attribute a cancellation has from its first moment, set with the start (free):
    the workflow then upserts none of them again (workflows.order_cancellation, A1)."""
    return TypedSearchAttributes(
        [
            SearchAttributePair(sa.ORDER_ID, request.order_id),
            SearchAttributePair(sa.SELLER_ID, request.seller_id),
            SearchAttributePair(sa.BUYER_ID, request.buyer_id),
            SearchAttributePair(sa.CANCELLATION_STATUS, CancellationStatus.OPENING.value),
            SearchAttributePair(sa.REFUND_STAGE, 0),
        ]
    )


async def start_cancellation(
    client: Client,
    request: RequestCancellationInput,
    *,
    task_queue: str = TASK_QUEUE,
    ledger: Ledger | None = None,
) -> WorkflowHandle[Any, CancellationResult]:
    """Start the cancellation of one sub-order, or return the one that already exists.

    With `ledger`, the one-line summary names the amount and the payment method.

    One cancellation per sub-order: a running one is joined (USE_EXISTING); an ended one is
    returned rather than started again (a new run is allowed only after a failure or a
    termination, when the first one never completed).
    """
    workflow_id = cancellation_id(request.order_id, request.seller_id)
    # R14: a shipped sub-order is refused before a workflow exists for it; the amount for the
    # summary comes with that look (one round trip).
    amount = (
        await refuse_if_shipped_else_amount(
            ledger.pool, order_id=request.order_id, seller_id=request.seller_id
        )
        if ledger is not None
        else None
    )
    try:
        handle = await client.start_workflow(
            OrderCancellation.run,
            request,
            id=workflow_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            search_attributes=start_attributes(request),
            static_summary=summary(request, amount),
            static_details=details(request),
        )
    except WorkflowAlreadyStartedError:
        handle = client.get_workflow_handle(workflow_id, result_type=CancellationResult)
    else:
        response = getattr(handle, "_start_workflow_response", None)
        if response is not None and getattr(response, "started", False):
            return handle  # ours, with this request
    # Joined a running cancellation or found an ended one: only its own buyer may (R20).
    owner = await _buyer_of(handle)
    if owner is not None and owner != request.buyer_id:
        raise SubOrderNotFound(
            f"order {request.order_id} has no sub-order of seller {request.seller_id}"
            f" for buyer {request.buyer_id}"
        )
    return handle


async def _buyer_of(handle: WorkflowHandle[Any, CancellationResult]) -> str | None:
    """The buyer of an existing cancellation: its `BuyerId` attribute (set with the start, or by
    the workflow once the ledger took the request), else its own status query."""
    description = await handle.describe()
    buyer = description.typed_search_attributes.get(sa.BUYER_ID)
    if buyer is not None:
        return buyer
    if description.status != WorkflowExecutionStatus.RUNNING:
        return None
    try:
        view: CancellationView = await handle.query(
            OrderCancellation.status, rpc_timeout=timedelta(seconds=5)
        )
    except (WorkflowQueryFailedError, WorkflowQueryRejectedError, RPCError):
        return None
    return view.buyer_id
