"""Reading a cancellation and sending it the messages of its buyer, seller and operators: what
the API and the CLI call, so that both give the same answers.

The workflow stays the judge of every decision. What a caller learns:
- `locate`: the cancellation as it stands, from its running workflow (the `status` query) or,
  once it has ended or while no worker answers, from the ledger; its audit trail is always the
  ledger's, every run's (`one_story`);
- an update (`decide`, `retry_refund`, `resolve_escalation`): the receipt, or `Refused` with the
  workflow's public refusal code, `Ended` when nothing runs to take it, `NoAnswer` when the
  workflow did not answer in time;
- a signal (`seller_decision`, `withdraw`): delivered, or `Ended`.
- `message` (update, R18): the receipt, or `Refused` as for a decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import structlog
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from domain.errors import CancellationNotFound
from domain.models import (
    AuditEntry,
    CancellationView,
    DecisionReceipt,
    MessageReceipt,
    MessageRequest,
    OperatorDecision,
    RetryRefundRequest,
    SellerDecision,
    WithdrawRequest,
)
from domain.rules import MESSAGE_KIND, messages_of
from ledger.repository import Ledger, buyer_dots
from workflows.order_cancellation import OrderCancellation

log = structlog.get_logger(__name__)

QUERY_TIMEOUT = timedelta(seconds=5)
UPDATE_TIMEOUT = timedelta(seconds=10)


# What a running workflow notes that no ledger row records: the messages it took (the seller's
# or an operator's decision as received, the buyer's withdrawal, the provider's event) and a
# reversal check that changed nothing. Every other note of its `status` query is also a ledger
# row, written by the activity that made the change or, for a sibling's coupon, by the ledger;
# and a run only knows its own notes (plus those carried across continue-as-new).
WORKFLOW_ONLY_NOTES = frozenset(
    {
        "decision_accept",
        "decision_reject",
        "withdraw_requested",
        "reversal_not_confirmed",
    }
)


def one_story(ledger_trail: list[AuditEntry], notes: list[AuditEntry]) -> list[AuditEntry]:
    """The audit trail across every run (R12): the ledger's rows in the order it wrote them,
    with the running workflow's notes that no row records put in among them. Nothing else of
    the workflow's notes is taken: the `requested` and `resumed` of a new run (reopened by a
    reversed refund) would repeat or invent a step, and the others are the ledger's rows again.

    The notes are placed by the workflow's own order, not by clock (the workflow's time and
    the database's are different clocks): a note goes right before the ledger row of the next
    note the workflow also recorded, matched by kind from the end, since a run's notes are the
    end of the story. A note with nothing recorded after it goes at the end."""
    placed: dict[int, list[AuditEntry]] = {}
    cursor = len(ledger_trail)
    for note in reversed(notes):
        if note.kind in WORKFLOW_ONLY_NOTES:
            placed.setdefault(cursor, []).insert(0, note)
            continue
        for j in range(cursor - 1, -1, -1):
            if ledger_trail[j].kind == note.kind:
                cursor = j
                break
    story: list[AuditEntry] = []
    for i, row in enumerate(ledger_trail):
        story.extend(placed.get(i, []))
        story.append(row)
    story.extend(placed.get(len(ledger_trail), []))
    return story


@dataclass(frozen=True)
class Located:
    view: CancellationView
    running: bool
    source: Literal["workflow", "ledger"]


class StatusUnavailable(Exception):
    """The workflow runs (it is opening) but neither it nor the ledger can tell its status yet."""


class Refused(Exception):
    """The workflow refused the message; `code` is the public refusal code (docs/contract.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"refused ({code}): {message}")
        self.code = code
        self.message = message


class Ended(Exception):
    """No running cancellation takes the message: unknown, or it has ended."""


class NoAnswer(Exception):
    """The workflow did not answer the update in time; read its status before retrying."""


async def locate(client: Client, ledger: Ledger, cancellation_id: str) -> Located | None:
    """The cancellation as it stands, or None when neither Temporal nor the ledger knows it."""
    handle = client.get_workflow_handle(cancellation_id)
    try:
        description = await handle.describe(rpc_timeout=QUERY_TIMEOUT)
        running = description.status == WorkflowExecutionStatus.RUNNING
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        running = False
    if running:
        try:
            view: CancellationView = await handle.query(
                OrderCancellation.status, rpc_timeout=QUERY_TIMEOUT
            )
        except (WorkflowQueryFailedError, WorkflowQueryRejectedError, RPCError) as err:
            # No worker to answer right now: the ledger still tells the story.
            log.warning("status_query_failed", cancellation_id=cancellation_id, error=str(err))
        else:
            # A coupon a sibling restored later is only known to the ledger; so are the
            # earlier runs' stories (a cancellation reopened by a reversed refund).
            coupon = await ledger.coupon_outcome(cancellation_id=cancellation_id)
            trail = await ledger.story(cancellation_id=cancellation_id)
            story = one_story(trail, view.audit)
            # R17: when each dot happened, as the ledger recorded it.
            times = await ledger.refund_times(cancellation_id=cancellation_id)
            update: dict[str, Any] = {
                "audit": story,
                "messages": messages_of(story),
                "dots": buyer_dots(view.refund, times),
                "payment": await ledger.payment_amounts(cancellation_id=cancellation_id),
                # The buyer's free text, why it was rejected, when it last changed (R17).
                **await ledger.view_extras(cancellation_id=cancellation_id),
            }
            if view.seller_deadline is not None or update.get("seller_deadline") is None:
                # The running workflow's own deadline, unless it has none (a reopened run).
                update["seller_deadline"] = view.seller_deadline
            if coupon is not None:
                update["coupon"] = coupon
            return Located(view.model_copy(update=update), running=True, source="workflow")
    try:
        view = await ledger.view(cancellation_id=cancellation_id)
    except CancellationNotFound:
        if running:
            raise StatusUnavailable(
                f"cancellation {cancellation_id} is opening and its workflow does not answer"
                " yet; retry shortly"
            ) from None
        return None
    return Located(view, running=running, source="ledger")


async def _update(client: Client, cancellation_id: str, update: Any, payload: Any) -> Any:
    handle = client.get_workflow_handle(cancellation_id)
    try:
        return await handle.execute_update(update, payload, rpc_timeout=UPDATE_TIMEOUT)
    except WorkflowUpdateFailedError as err:
        # The workflow's validator said no: its `type` is the public refusal code.
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type:
            raise Refused(cause.type, cause.message) from None
        raise Refused("refused", str(cause or err)) from None
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        raise NoAnswer(
            f"cancellation {cancellation_id} did not answer in time; read its status before"
            " retrying"
        ) from None
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise Ended(
                f"no running cancellation {cancellation_id} (unknown, or it has already ended)"
            ) from None
        raise


async def _signal(client: Client, cancellation_id: str, signal: Any, payload: Any) -> None:
    handle = client.get_workflow_handle(cancellation_id)
    try:
        await handle.signal(signal, payload, rpc_timeout=QUERY_TIMEOUT)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise Ended(
                f"no running cancellation {cancellation_id} (unknown, or it has already ended)"
            ) from None
        raise


async def decide(client: Client, cancellation_id: str, decision: SellerDecision) -> DecisionReceipt:
    """The seller's decision by update: refused at once if not allowed."""
    receipt: DecisionReceipt = await _update(
        client, cancellation_id, OrderCancellation.decide, decision
    )
    return receipt


async def signal_decision(client: Client, cancellation_id: str, decision: SellerDecision) -> None:
    """The seller's decision by signal (fire-and-forget): a refusal lands in the audit trail."""
    await _signal(client, cancellation_id, OrderCancellation.seller_decision, decision)


async def resolve_escalation(
    client: Client, cancellation_id: str, decision: OperatorDecision
) -> DecisionReceipt:
    receipt: DecisionReceipt = await _update(
        client, cancellation_id, OrderCancellation.resolve_escalation, decision
    )
    return receipt


async def retry_refund(
    client: Client, cancellation_id: str, request: RetryRefundRequest
) -> DecisionReceipt:
    receipt: DecisionReceipt = await _update(
        client, cancellation_id, OrderCancellation.retry_refund, request
    )
    return receipt


async def withdraw(client: Client, cancellation_id: str, request: WithdrawRequest) -> None:
    """The buyer's withdrawal (a signal): the caller reads the status to see it applied."""
    await _signal(client, cancellation_id, OrderCancellation.withdraw, request)


async def message(
    client: Client, ledger: Ledger, cancellation_id: str, request: MessageRequest
) -> MessageReceipt:
    """A message of the buyer or the seller on a waiting request (R18), by update: refused at
    once (with its code) when not allowed, recorded in the audit trail when accepted.

    The receipt's `at` is the time the ledger recorded the message (its audit row, the time
    the views and the audit trail show), not the workflow's clock: one time for one message.
    The workflow answers only once its activity has written that row."""
    receipt: MessageReceipt = await _update(
        client, cancellation_id, OrderCancellation.message, request
    )
    recorded = await ledger.recorded_at(
        cancellation_id=cancellation_id,
        kind=MESSAGE_KIND,
        actor=receipt.author,
        detail=receipt.text,
    )
    if recorded is not None:
        receipt = receipt.model_copy(update={"at": recorded})
    return receipt
