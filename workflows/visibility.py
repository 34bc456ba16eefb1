"""What operators see of a running cancellation without opening its history.

Search attributes (the keys are in `workflows.search_attributes`), the memo with the money at
stake, and the Web UI's current details: a headline, since when, the next step, the refund and
its ETA, the coupon, the last error. `Visibility` is the only writer of all three, so the
workflow says what happened once (`show`) and this decides what operators get to read.

Runs inside the workflow: only `workflow.*` time, and one upsert command per call at most.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeUpdate

from domain.models import (
    CancellationStatus,
    CouponOutcome,
    OpenCancellationResult,
    RefundStage,
    RefundView,
    RequestCancellationInput,
    TimeoutPolicy,
)
from workflows import search_attributes as sa

# For each status: the headline operators read in the Web UI and the next step.
STAGE_TEXT: dict[CancellationStatus, tuple[str, str]] = {
    CancellationStatus.OPENING: ("Opening", "read the sub-order and choose the path"),
    CancellationStatus.AWAITING_SELLER: (
        "Waiting for the seller",
        "the seller accepts or rejects (update `decide` / signal `seller_decision`)",
    ),
    CancellationStatus.ESCALATED: (
        "Escalated to operators",
        "an operator decides (update `resolve_escalation`)",
    ),
    CancellationStatus.REJECTED: ("Rejected", "nothing: the order goes on"),
    CancellationStatus.WITHDRAWN: ("Withdrawn by the buyer", "nothing: the order goes on"),
    CancellationStatus.APPROVED: ("Approved", "record the refund"),
    CancellationStatus.REFUND_REQUESTED: (
        "Refund requested (dot 1)",
        "submit it to the payment provider",
    ),
    CancellationStatus.REFUND_SUBMITTED: (
        "Refund in progress (dot 2)",
        "the provider confirms the refund",
    ),
    CancellationStatus.REFUND_CONFIRMED: (
        "Refund completed (dot 3)",
        "decide whether the coupon comes back",
    ),
    CancellationStatus.REFUND_FAILED: (
        "Refund failed: waiting for an operator",
        "an operator retries (update `retry_refund`, or `ordercancel refunds retry`)",
    ),
    CancellationStatus.COMPLETED: ("Completed", "nothing: the cancellation is done"),
}


def _minute(at: datetime) -> str:
    """`YYYY-MM-DD HH:MM`. The details are written on every status change, in the workflow's
    sandbox, where `strftime` (an f-string's `:%Y`) imports `time` through the sandbox's import
    hook on every call: `isoformat` does not."""
    return at.isoformat(sep=" ", timespec="minutes")[:16]


def _second(at: datetime) -> str:
    """`YYYY-MM-DD HH:MM:SS` (see `_minute`)."""
    return at.isoformat(sep=" ", timespec="seconds")[:19]


def _day(at: datetime) -> str:
    """`YYYY-MM-DD` (see `_minute`)."""
    return at.date().isoformat()


def escape_markdown(text: str) -> str:
    """`text` shown as itself in the Web UI, which renders details as Markdown: every ASCII
    punctuation character backslash-escaped (CommonMark allows it for all of them, and it
    breaks emphasis, links, images, raw HTML, headings, lists, tables and bare-URL autolinks),
    line breaks and other control characters as spaces. For everything a buyer, a seller, an
    operator or the provider wrote (issue 18)."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    return text.translate(_MARKDOWN_ESCAPES)


# Every ASCII punctuation character, backslash-escaped (one `translate`: the details are
# written on every status change).
_MARKDOWN_ESCAPES = {
    code: "\\" + chr(code)
    for code in range(128)
    if not chr(code).isalnum() and chr(code).isprintable() and chr(code) != " "
}


POLICY_TEXT: dict[TimeoutPolicy | None, str] = {
    None: "the timeout policy applies",
    TimeoutPolicy.AUTO_APPROVE: "approved automatically",
    TimeoutPolicy.AUTO_REJECT: "rejected automatically",
    TimeoutPolicy.ESCALATE: "escalated to operators",
}


class Visibility:
    """The search attributes, memo and current details of one cancellation.

    Each status change is one upsert: the status and the refund's dots always, the seller
    deadline and the coupon outcome only when they changed since the last upsert (they go
    with the status instead of costing a command of their own; docs/performance.md)."""

    def __init__(self) -> None:
        self._status = CancellationStatus.OPENING
        self._since = workflow.now()
        self._refund: RefundView | None = None
        self._coupon: CouponOutcome | None = None
        self._deadline: datetime | None = None
        self._next_check: datetime | None = None
        self._last_error: str | None = None
        self._policy: TimeoutPolicy | None = None
        # Sibling cancellations a completed one waits for before it ends (R11).
        self._coupon_waiting: list[str] = []
        # What the search attributes hold now, as far as this run has set them.
        self._shown_deadline: datetime | None = None
        self._shown_coupon: str | None = None
        # R18: the latest message on the request (who, what, when).
        self._message: tuple[str, str, datetime] | None = None
        # The status and refund dots the attributes hold (the lean shape shows a status that
        # passes within one step with the next upsert: `show(upsert=False)`, `catch_up`).
        self._shown_status: tuple[CancellationStatus, int] = (CancellationStatus.OPENING, 0)

    def start(self, request: RequestCancellationInput) -> None:
        """The attributes a cancellation is found by, set once, and only those the starter did
        not set (`starter.requests.start_attributes` sets them all; another client may not)."""
        wanted: list[SearchAttributeUpdate[Any]] = [
            sa.ORDER_ID.value_set(request.order_id),
            sa.SELLER_ID.value_set(request.seller_id),
            sa.BUYER_ID.value_set(request.buyer_id),
            sa.CANCELLATION_STATUS.value_set(self._status.value),
            sa.REFUND_STAGE.value_set(0),
        ]
        present = workflow.info().typed_search_attributes
        missing = [u for u in wanted if present.get(u.key) != u.value]
        if missing:
            workflow.upsert_search_attributes(missing)

    def resumed(self, opened: OpenCancellationResult) -> None:
        """A run continued as new: the memo and the attributes came with it."""
        self._policy = opened.timeout_policy

    def opened(self, opened: OpenCancellationResult) -> None:
        """The memo: the money at stake, readable in the list without opening anything."""
        self._policy = opened.timeout_policy
        workflow.upsert_memo(
            {
                "amount_minor": opened.amount.amount_minor,
                "currency": opened.amount.currency,
                "payment_method": opened.payment_method.value,
                "amount": str(opened.amount),
            }
        )

    def show(
        self,
        status: CancellationStatus,
        refund: RefundView | None,
        coupon: CouponOutcome | None,
        *,
        deadline: datetime | None,
        last_error: str | None,
        upsert: bool = True,
    ) -> None:
        """A status change: one upsert, and the current details from now on. `upsert=False`:
        the details only; the attributes follow with the next upsert (or `catch_up`)."""
        self._status = status
        self._since = workflow.now()
        self._refund = refund
        self._coupon = coupon
        self._deadline = deadline
        self._last_error = last_error
        if not upsert:
            workflow.set_current_details(self.details())
            return
        self._upsert()

    def catch_up(self) -> None:
        """The attributes show the status the details show (one upsert if they did not)."""
        if self._shown_status != (self._status, self._dots()):
            self._upsert()

    def _dots(self) -> int:
        return self._refund.stage.dots if self._refund is not None else 0

    def _upsert(self) -> None:
        status, refund, deadline = self._status, self._refund, self._deadline
        self._shown_status = (status, self._dots())
        updates: list[SearchAttributeUpdate[Any]] = [
            sa.CANCELLATION_STATUS.value_set(status.value),
            sa.REFUND_STAGE.value_set(refund.stage.dots if refund is not None else 0),
        ]
        if deadline is not None and deadline != self._shown_deadline:
            self._shown_deadline = deadline
            updates.append(sa.SELLER_DEADLINE.value_set(deadline))
        updates.extend(self._coupon_update(self._coupon))
        workflow.upsert_search_attributes(updates)
        workflow.set_current_details(self.details())

    def show_coupon(self, coupon: CouponOutcome, *, waiting_on: list[str] | None = None) -> None:
        """A coupon decided with no status change to carry it (the refund was reversed
        meanwhile, the cancellation was already completed, or a sibling restored it while this
        one waited): an upsert of its own (nothing if already shown), and the details."""
        self._coupon = coupon
        self._coupon_waiting = list(waiting_on or [])
        updates = self._coupon_update(coupon)
        if updates:
            workflow.upsert_search_attributes(updates)
        workflow.set_current_details(self.details())

    def message(self, author: str, text: str, at: datetime) -> None:
        """A message on the request (R18): the latest one in the details (no command)."""
        self._message = (author, text, at)
        workflow.set_current_details(self.details())

    def next_check(self, refund: RefundView, at: datetime) -> None:
        """The provider said "pending": when it is asked again (details only, no command)."""
        self._refund = refund
        self._next_check = at
        workflow.set_current_details(self.details())

    def _coupon_update(self, coupon: CouponOutcome | None) -> list[SearchAttributeUpdate[Any]]:
        value = coupon.outcome.value if coupon is not None else None
        if value == self._shown_coupon:
            return []
        self._shown_coupon = value
        if value is None:
            return [sa.COUPON_OUTCOME.value_unset()]
        return [sa.COUPON_OUTCOME.value_set(value)]

    def details(self) -> str:
        """Markdown for the Web UI: what is happening, since when, what comes next, ETA, error."""
        headline, next_step = STAGE_TEXT[self._status]
        if self._status is CancellationStatus.AWAITING_SELLER and self._deadline is not None:
            next_step += f" by {_minute(self._deadline)} UTC; then {POLICY_TEXT[self._policy]}"
        if self._status is CancellationStatus.COMPLETED and self._coupon_waiting:
            next_step = (
                "end once the sibling cancellations "
                + ", ".join(escape_markdown(c) for c in self._coupon_waiting)
                + " have decided the coupon (it comes back if they complete the refund of"
                " everything it paid for)"
            )
        refund_now = self._refund
        if self._status is CancellationStatus.REFUND_FAILED and refund_now is not None:
            if refund_now.stage is RefundStage.REVERSED:
                next_step = (
                    "the money came back from the buyer's bank: find a way to pay the buyer"
                    " (with finance), then an operator retries (a new refund under a new key)"
                )
            elif refund_now.stage is RefundStage.DECLINED:
                next_step = (
                    "the provider refused this refund for good: find out why (the error below),"
                    " then an operator retries (a new refund under a new key) or not"
                )
        if self._status is CancellationStatus.REFUND_SUBMITTED and self._next_check is not None:
            next_step += f" (next check {_second(self._next_check)} UTC, or on its webhook)"
        lines = [
            f"**{headline}** since {_second(self._since)} UTC",
            f"Next: {next_step}",
        ]
        refund = self._refund
        if refund is not None:
            lines.append(
                f"Refund: {refund.kind.value} of {refund.amount}, stage {refund.stage.value}"
                f" ({refund.stage.dots}/3)"
                + (
                    f", provider ref {escape_markdown(refund.provider_ref)}"
                    if refund.provider_ref
                    else ""
                )
            )
            # The estimate of when the money reaches the buyer, until the provider confirms it.
            if refund.eta is not None and refund.stage in (
                RefundStage.REQUESTED,
                RefundStage.SUBMITTED,
                RefundStage.FAILED,
            ):
                lines.append(f"ETA: {_day(refund.eta.earliest)} to {_day(refund.eta.latest)}")
        if self._coupon is not None:
            lines.append(
                f"Coupon: {self._coupon.outcome.value} ({escape_markdown(self._coupon.reason)})"
            )
        if self._message is not None:
            author, text, at = self._message
            lines.append(
                f"Latest message: {escape_markdown(author)} at {_second(at)} UTC:"
                f" {escape_markdown(text)}"
            )
        if self._last_error and self._status is CancellationStatus.REFUND_FAILED:
            lines.append(f"Last error: {escape_markdown(self._last_error)}")
        return "\n\n".join(lines)
