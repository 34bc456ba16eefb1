"""What each endpoint does, over the Temporal client and the ledger; HTTP-free but for the
refusals it raises (`ApiError`). The workflow stays the judge of every decision: the checks here
only spare a round trip or give a precise answer where a signal could not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import structlog
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from api.errors import ApiError
from api.schemas import CancellationAccepted, CancellationDetails, WithdrawalReceipt
from api.stores import SubOrders
from domain.errors import (
    OrderConflict,
    RefusalCode,
    SubOrderAlreadyShipped,
)
from domain.models import (
    CancellationPath,
    CancellationResult,
    CancellationStatus,
    DecisionReceipt,
    MessageAuthor,
    MessageReceipt,
    MessageRequest,
    OperatorDecision,
    PaymentEvent,
    RequestCancellationInput,
    RetryRefundRequest,
    SellerDecision,
    WithdrawRequest,
)
from domain.order_events import OrderAccepted, OrderEventIn, OrderEventResult
from domain.orders import CheckoutOrderIn
from domain.rules import cancellation_id as cancellation_id_of
from ledger.inbox import (
    CancellationPage,
    InvalidCursor,
    OrderView,
    list_cancellations,
    order_view,
)
from ledger.order_events import post_order
from ledger.repository import Ledger
from ledger.stuck import StuckCancellation, stuck_cancellations
from starter import cancellations
from starter.cancellations import (
    QUERY_TIMEOUT,
    Ended,
    Located,
    NoAnswer,
    Refused,
    StatusUnavailable,
)
from starter.order_events import NotTold, OrderRefused, deliver_order_event, refusal_of
from starter.payment_events import ForwardResult, forward_payment_event
from starter.requests import check_cancellable, start_cancellation
from starter.stripe_events import StripeWebhookResult, forward_stripe_event

log = structlog.get_logger("api")

# How long a withdrawal waits to see the workflow apply it.
WITHDRAW_WAIT = 3.0
_POLL = 0.1
PENDING = (CancellationStatus.AWAITING_SELLER, CancellationStatus.ESCALATED)
SHIPPED_TYPE = SubOrderAlreadyShipped.error_type


def details(located: Located) -> CancellationDetails:
    return CancellationDetails(
        **located.view.model_dump(), running=located.running, source=located.source
    )


def not_found() -> ApiError:
    """The one answer for a cancellation the caller may not know about: no such id, or another
    seller's (the same body, so that neither can be told from the other)."""
    return ApiError(404, "not_found", "no such cancellation")


@contextlib.contextmanager
def _as_api_errors(ended: str) -> Iterator[None]:
    """The client-side service's outcomes as HTTP refusals; `ended`: the code for a
    cancellation that has ended since it was located."""
    try:
        yield
    except Refused as err:
        bad_body = err.code in (RefusalCode.INVALID_PAYLOAD, RefusalCode.MESSAGE_TOO_LONG)
        status = 422 if bad_body else 409
        raise ApiError(status, err.code, err.message) from None
    except NoAnswer:
        raise ApiError(
            504,
            "workflow_timeout",
            "the cancellation did not answer in time; read its status before retrying",
        ) from None
    except Ended:
        raise ApiError(409, ended, "the cancellation has ended") from None


class CancellationService:
    def __init__(
        self,
        client: Client,
        ledger: Ledger,
        sub_orders: SubOrders,
        *,
        task_queue: str,
        instant_wait: timedelta,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._sub_orders = sub_orders
        self._task_queue = task_queue
        self._instant_wait = instant_wait.total_seconds()

    # --- reading ----------------------------------------------------------------------------

    async def locate(self, cancellation_id: str) -> Located:
        """The cancellation as it stands (starter.cancellations.locate); 404 when neither
        Temporal nor the ledger knows it, 503 while it opens and cannot answer yet."""
        try:
            located = await cancellations.locate(self._client, self._ledger, cancellation_id)
        except StatusUnavailable as err:
            raise ApiError(503, "status_unavailable", str(err)) from None
        if located is None:
            raise not_found()
        return located

    # --- requesting -------------------------------------------------------------------------

    async def check_cancellable(self, request: RequestCancellationInput) -> None:
        """Refuse what the workflow would fail on, before it exists (as `ordercancel request`
        does: starter.requests.check_cancellable)."""
        try:
            await check_cancellable(self._ledger.pool, request)
        except OrderRefused as err:
            raise ApiError(err.status, err.code, err.message) from None

    async def request(self, request: RequestCancellationInput) -> CancellationAccepted:
        """Start the cancellation (or join the one that exists), then read where it stands;
        an instant-path one is given up to `instant_wait` to finish, so the caller gets the
        outcome in the same request."""
        try:
            # With the ledger: the summary names the amount and the method (as the CLI's).
            handle = await start_cancellation(
                self._client, request, task_queue=self._task_queue, ledger=self._ledger
            )
        except SubOrderAlreadyShipped as err:
            # R14 again (one key lookup): shipped since check_cancellable; the same answer.
            raise ApiError(
                409, "already_shipped", str(err).removeprefix("already_shipped: ")
            ) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._instant_wait
        located: Located | None = None
        while True:
            try:
                located = await self.locate(handle.id)
            except ApiError as err:
                if err.status not in (404, 503):
                    raise
                await self._raise_if_failed(handle.id)
            if located is not None:
                view = located.view
                if not located.running:
                    break
                if view.status.is_terminal or view.path is CancellationPath.INSTANT:
                    # Decided (or deciding at once): let the workflow close within the wait,
                    # so that `final: true` is followed by reads from the ledger, not by a
                    # workflow that still runs its last task.
                    await self._until_closed(handle, deadline)
                    located = await self.locate(handle.id)
                    break
                if view.path is CancellationPath.REQUEST:
                    break
            if loop.time() >= deadline:
                break
            await asyncio.sleep(_POLL)
        if located is None:
            return CancellationAccepted(
                cancellation_id=handle.id,
                status=CancellationStatus.OPENING,
                final=False,
                status_url=f"/v1/cancellations/{handle.id}",
            )
        view = located.view
        final = view.status.is_terminal
        return CancellationAccepted(
            cancellation_id=handle.id,
            status=view.status,
            path=view.path,
            final=final,
            outcome=(
                CancellationResult(
                    cancellation_id=handle.id,
                    status=view.status,
                    path=view.path,
                    refund=view.refund,
                    coupon=view.coupon,
                )
                if final and view.path is not None
                else None
            ),
            status_url=f"/v1/cancellations/{handle.id}",
        )

    @staticmethod
    async def _until_closed(handle: WorkflowHandle[Any, Any], deadline: float) -> None:
        """Wait until the workflow closes (however it ends) or the loop time `deadline`
        passes."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining > 0:
            with contextlib.suppress(TimeoutError, WorkflowFailureError):
                await asyncio.wait_for(handle.result(), remaining)

    async def _raise_if_failed(self, cancellation_id: str) -> None:
        """A workflow that failed while opening (e.g. the sub-order changed under us) left no
        ledger row: say why instead of "not found"."""
        handle = self._client.get_workflow_handle(cancellation_id)
        try:
            description = await handle.describe(rpc_timeout=QUERY_TIMEOUT)
        except RPCError:
            return
        if description.status in (
            WorkflowExecutionStatus.FAILED,
            WorkflowExecutionStatus.TERMINATED,
            WorkflowExecutionStatus.TIMED_OUT,
        ):
            reason = description.status.name.lower() if description.status else "ended"
            try:
                await handle.result()
            except WorkflowFailureError as err:
                cause: BaseException | None = err.cause
                while cause is not None and cause.__cause__ is not None:
                    cause = cause.__cause__
                reason = str(cause or err)
                if isinstance(cause, ApplicationError) and cause.type == SHIPPED_TYPE:
                    # R14: shipped between our check and the opening (the opening refused it).
                    raise ApiError(409, "already_shipped", reason) from None
            raise ApiError(409, "cancellation_failed", f"the cancellation could not open: {reason}")

    # --- decisions --------------------------------------------------------------------------

    async def decide(self, located: Located, decision: SellerDecision) -> DecisionReceipt:
        if not located.running:
            raise ApiError(
                409,
                RefusalCode.NOT_PENDING,
                f"this cancellation has ended (status: {located.view.status.value})",
            )
        with _as_api_errors(RefusalCode.NOT_PENDING):
            return await cancellations.decide(self._client, located.view.cancellation_id, decision)

    async def retry_refund(self, located: Located, request: RetryRefundRequest) -> DecisionReceipt:
        if not located.running:
            raise ApiError(
                409,
                RefusalCode.NOT_REFUND_FAILED,
                f"only a cancellation in refund_failed can be retried (status:"
                f" {located.view.status.value})",
            )
        with _as_api_errors(RefusalCode.NOT_REFUND_FAILED):
            return await cancellations.retry_refund(
                self._client, located.view.cancellation_id, request
            )

    async def stuck(self, *, older_than: timedelta, limit: int) -> list[StuckCancellation]:
        """Requests waiting for their seller or escalated, oldest first (ledger.stuck)."""
        return await stuck_cancellations(self._ledger.pool, older_than=older_than, limit=limit)

    async def list(
        self,
        *,
        seller_id: str | None,
        buyer_id: str | None,
        order_id: str | None,
        status: CancellationStatus | None,
        cursor: str | None,
        limit: int,
    ) -> CancellationPage:
        """R17: the ledger's list (ledger.inbox), the caller's scope already applied."""
        try:
            return await list_cancellations(
                self._ledger.pool,
                seller_id=seller_id,
                buyer_id=buyer_id,
                order_id=order_id,
                status=status,
                cursor=cursor,
                limit=limit,
            )
        except InvalidCursor as err:
            raise ApiError(400, "invalid_cursor", f"cursor: {err}") from None

    async def order(self, order_id: str) -> OrderView:
        """R17: the buyer's order view (ledger.inbox)."""
        view = await order_view(self._ledger, order_id=order_id)
        if view is None:
            raise ApiError(404, "order_not_found", f"no order {order_id}")
        return view

    async def message(
        self, located: Located, author: MessageAuthor, author_id: str, text: str
    ) -> MessageReceipt:
        """R18: a message on a waiting request; the workflow's validator judges it."""
        view = located.view
        # One code for a request that was answered, withdrawn or has ended, whether or not its
        # workflow still runs (the workflow's own check says `already_decided` too); an
        # instant-path cancellation never took messages: `not_pending`.
        closed = (
            RefusalCode.ALREADY_DECIDED
            if view.path is not CancellationPath.INSTANT
            else RefusalCode.NOT_PENDING
        )
        if not located.running:
            raise ApiError(
                409,
                closed,
                f"this cancellation has ended (status: {view.status.value}): messages are closed",
            )
        request = MessageRequest(author=author, author_id=author_id, text=text)
        with _as_api_errors(closed):
            return await cancellations.message(
                self._client, self._ledger, view.cancellation_id, request
            )

    async def resolve_escalation(
        self, located: Located, decision: OperatorDecision
    ) -> DecisionReceipt:
        if not located.running:
            raise ApiError(
                409,
                RefusalCode.NOT_ESCALATED,
                f"this cancellation has ended (status: {located.view.status.value})",
            )
        with _as_api_errors(RefusalCode.NOT_ESCALATED):
            return await cancellations.resolve_escalation(
                self._client, located.view.cancellation_id, decision
            )

    async def withdraw(self, located: Located, request: WithdrawRequest) -> WithdrawalReceipt:
        """`withdraw` is a signal (fire-and-forget), so the request is checked first and the
        outcome read after: the caller learns whether the withdrawal took effect."""
        view = located.view
        if not located.running or view.status not in PENDING:
            raise ApiError(
                409,
                RefusalCode.NOT_PENDING,
                f"only a pending request can be withdrawn (status: {view.status.value})",
            )
        if request.buyer_id != view.buyer_id:
            raise ApiError(
                409,
                RefusalCode.WRONG_BUYER,
                f"buyer {request.buyer_id!r} did not request this cancellation",
            )
        with _as_api_errors(RefusalCode.NOT_PENDING):
            await cancellations.withdraw(self._client, view.cancellation_id, request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WITHDRAW_WAIT
        status = view.status
        while loop.time() < deadline:
            await asyncio.sleep(_POLL)
            try:
                status = (await self.locate(view.cancellation_id)).view.status
            except ApiError:
                continue
            if status is CancellationStatus.WITHDRAWN:
                return WithdrawalReceipt(
                    cancellation_id=view.cancellation_id,
                    applied=True,
                    status=status,
                    message="the request is withdrawn; the order goes on",
                )
            if status not in PENDING:
                raise ApiError(
                    409,
                    RefusalCode.ALREADY_DECIDED,
                    f"the request was decided before the withdrawal arrived (status:"
                    f" {status.value})",
                )
        return WithdrawalReceipt(
            cancellation_id=view.cancellation_id,
            applied=False,
            status=status,
            message="withdrawal sent; not applied yet (read the status)",
        )

    # --- the provider's webhook -------------------------------------------------------------

    async def payment_event(self, event: PaymentEvent) -> ForwardResult:
        return await forward_payment_event(
            self._client, self._ledger, event, task_queue=self._task_queue
        )

    # --- the order system (R13, R14) --------------------------------------------------------

    async def post_order(self, order: CheckoutOrderIn) -> OrderAccepted:
        try:
            return await post_order(self._ledger.pool, order)
        except OrderConflict as err:
            refused = refusal_of(err)
            assert refused is not None
            raise ApiError(
                refused.status,
                refused.code,
                f"{refused.message}. An order's state changes through its events, not by"
                f" posting it again: POST /v1/orders/{order.order_id}/events",
            ) from None

    async def order_event(self, order_id: str, event: OrderEventIn) -> OrderEventResult:
        try:
            return await deliver_order_event(self._client, self._ledger.pool, order_id, event)
        except OrderRefused as err:
            raise ApiError(err.status, err.code, err.message) from None
        except NotTold as err:
            log.error("order_shipped_not_told", event_id=event.event_id, reason=str(err))
            raise ApiError(503, "workflow_unavailable", str(err)) from None

    async def stripe_event(self, event: dict[str, Any]) -> StripeWebhookResult:
        return await forward_stripe_event(
            self._client, self._ledger, event, task_queue=self._task_queue
        )


def workflow_id_for(request: RequestCancellationInput) -> str:
    return cancellation_id_of(request.order_id, request.seller_id)
