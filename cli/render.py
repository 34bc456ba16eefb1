"""Terminal rendering of one cancellation: the three dots, the ETA, the coupon, the story."""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from domain.models import CancellationView, RefundStage
from domain.rules import refund_dots
from ledger.inbox import CancellationPage


def render_view(console: Console, view: CancellationView) -> None:
    header = Text()
    header.append(f"{view.cancellation_id}\n", style="bold")
    header.append(f"order {view.order_id} / seller {view.seller_id} / buyer {view.buyer_id}\n")
    header.append(f"reason: {view.reason.value} ({view.reason.fault.value} fault)\n")
    header.append("status: ")
    header.append(view.status.value, style="bold cyan")
    if view.path is not None:
        header.append(f"  (path: {view.path.value})")
    if view.seller_deadline is not None:
        header.append(f"\nseller deadline: {view.seller_deadline:%Y-%m-%d %H:%M:%S %Z}")
    if view.reason_text:
        header.append("\nbuyer's words: ")
        header.append(view.reason_text)
    if view.decision_reason is not None:
        header.append(f"\nrejected by {view.decided_by or '?'}: ")
        header.append(view.decision_reason)
    console.print(Panel(header, title="cancellation", expand=False))

    dots = view.dots or refund_dots(view.refund)
    line = Text()
    for n, dot in enumerate(dots):
        if n:
            line.append(" ── ")
        line.append("● " if dot.done else "○ ", style="green" if dot.done else "dim")
        line.append(dot.label, style="bold" if dot.done else "dim")
    console.print(line)
    if view.refund is not None:
        refund = view.refund
        console.print(
            f"refund: {refund.kind.value} of {refund.amount} — stage {refund.stage.value}"
            + (f", provider ref {refund.provider_ref}" if refund.provider_ref else "")
        )
        # An ETA stands only while the refund is on its way (or parked, to be sent again):
        # a confirmed one has arrived, a declined or reversed one needs a new refund first.
        if refund.eta is not None and refund.stage in (
            RefundStage.REQUESTED,
            RefundStage.SUBMITTED,
            RefundStage.FAILED,
        ):
            console.print(
                f"ETA: between {refund.eta.earliest:%Y-%m-%d} and {refund.eta.latest:%Y-%m-%d}"
            )
    if view.payment is not None:
        amounts = view.payment
        console.print(
            f"payment {amounts.payment_id} ({amounts.currency}, minor units): authorised"
            f" {amounts.authorised_minor}, released {amounts.released_minor}, captured"
            f" {amounts.captured_minor}, refunded {amounts.refunded_minor}"
        )
    if view.last_error:
        console.print(f"[red]last error:[/red] {view.last_error}")
    if view.coupon is not None:
        console.print(f"coupon: [bold]{view.coupon.outcome.value}[/bold] — {view.coupon.reason}")

    if view.messages:
        messages = Table(title="messages", show_lines=False)
        for column in ("when (UTC)", "who", "message"):
            messages.add_column(column, overflow="fold")
        for m in view.messages:
            messages.add_row(f"{m.at:%Y-%m-%d %H:%M:%S}", Text(m.author), Text(m.text))
        console.print(messages)

    table = Table(title="audit trail", show_lines=False)
    for column in ("when (UTC)", "who", "what", "detail"):
        table.add_column(column)
    for entry in view.audit:
        table.add_row(f"{entry.at:%Y-%m-%d %H:%M:%S}", entry.actor, entry.kind, entry.detail or "")
    console.print(table)


def render_page(console: Console, page: CancellationPage) -> None:
    """One page of `ordercancel list`, and how to read the next one."""
    table = Table(title=f"{len(page.items)} cancellation(s)", title_justify="left")
    columns = (
        "id",
        "order",
        "seller",
        "status",
        "buyer",
        "seller deadline (UTC)",
        "requested (UTC)",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for item in page.items:
        table.add_row(
            Text(item.cancellation_id),
            Text(item.order_id),
            Text(item.seller_id),
            item.status.value,
            Text(item.buyer_id),
            f"{item.seller_deadline:%Y-%m-%d %H:%M:%S}" if item.seller_deadline else "",
            f"{item.requested_at:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)
    if page.next_cursor is not None:
        console.print(Text(f"next page: --cursor {page.next_cursor}"))
