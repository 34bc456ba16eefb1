"""The cancellation commands: `request`, `decide`, `withdraw`, `message`, `status`, `list` (the
public CLI)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Annotated

import structlog
import typer
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError, FailureError

from cli import console as ui
from cli.console import CommandError, console, err_console
from cli.render import render_page, render_view
from domain.models import (
    CancellationReason,
    CancellationStatus,
    CancellationView,
    Decision,
    MessageAuthor,
    MessageRequest,
    RequestCancellationInput,
    SellerDecision,
    WithdrawRequest,
)
from domain.rules import cancellation_id as workflow_id_of
from infra.stack import open_stack
from ledger.inbox import (
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    CancellationPage,
    InvalidCursor,
    list_cancellations,
)
from ledger.repository import Ledger
from starter import cancellations

app = typer.Typer()


@contextlib.contextmanager
def _as_command_errors() -> Iterator[None]:
    """What the workflow or Temporal said, as one line and exit 1."""
    try:
        yield
    except (
        cancellations.Refused,
        cancellations.Ended,
        cancellations.NoAnswer,
        cancellations.StatusUnavailable,
    ) as err:
        raise CommandError(str(err)) from None


def _failure(cancellation_id: str, err: WorkflowFailureError) -> str:
    """A failed workflow as `<code>: <message>`: the innermost cause's type (an application
    error's, e.g. SubOrderNotFound) and message, without a traceback."""
    cause: BaseException = err.cause
    while cause.__cause__ is not None:
        cause = cause.__cause__
    code = cause.type if isinstance(cause, ApplicationError) and cause.type else "workflow_failed"
    message = cause.message if isinstance(cause, FailureError) else str(cause)
    return f"{code}: cancellation {cancellation_id} failed: {message}"


@app.command()
def request(
    order_id: Annotated[str, typer.Argument(help="Checkout order id, e.g. O-1002")],
    seller_id: Annotated[str, typer.Argument(help="Seller of the sub-order, e.g. S-7")],
    buyer: Annotated[str, typer.Option(help="The buyer asking")],
    reason: Annotated[CancellationReason, typer.Option(help="Why (R6)")],
    text: Annotated[str, typer.Option(help="Free text for the seller")] = "",
    window: Annotated[
        str | None,
        typer.Option(hidden=True, help="Refused (R19): the window is the seller's policy"),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the cancellation to end")] = False,
) -> None:
    """Request the cancellation of one sub-order (returns the existing one if already asked)."""
    from starter.requests import check_cancellable, start_cancellation

    if window is not None:
        raise ui.bad_argument(
            "--window is not allowed: the seller's response window is the marketplace's policy"
            f" (R19). Set it for the seller: ordercancel sellers policy {seller_id} --window"
            f" {window}"
        )
    settings = ui.settings()
    structlog.contextvars.bind_contextvars(
        workflow_id=workflow_id_of(order_id, seller_id),
        order_id=order_id,
        seller_id=seller_id,
        buyer_id=buyer,
    )
    try:
        req = RequestCancellationInput(
            order_id=order_id,
            seller_id=seller_id,
            buyer_id=buyer,
            reason=reason,
            reason_text=text,
        )
    except ValueError as err:
        err_console.print(f"[red]invalid request:[/red] {err}")
        raise typer.Exit(2) from None

    async def main() -> None:
        async with open_stack(settings) as stack:
            # The API's check (404 sub_order_not_found, 409 already_shipped, ...): a request
            # that cannot succeed is refused here, before it becomes a failed workflow. A
            # refusal is `OrderRefused`, printed as `error: <code>: <message>`, exit 1.
            await check_cancellable(stack.pool, req)
            handle = await start_cancellation(
                stack.client, req, task_queue=settings.task_queue, ledger=Ledger(stack.pool)
            )
            console.print(f"cancellation [bold]{handle.id}[/bold] started")
            if wait:
                try:
                    result = await handle.result()
                except WorkflowFailureError as err:
                    raise CommandError(_failure(handle.id, err)) from None
                console.print_json(result.model_dump_json())

    ui.run(main())


@app.command()
def decide(
    cancellation_id: Annotated[str, typer.Argument(help="e.g. cancel-O-1002~S-7")],
    decision: Annotated[Decision, typer.Argument(help="accept or reject")],
    seller: Annotated[str, typer.Option(help="The seller deciding")],
    reason: Annotated[str, typer.Option(help="Reason shown to the buyer")] = "",
    signal: Annotated[
        bool, typer.Option("--signal", help="Send as fire-and-forget signal instead of update")
    ] = False,
) -> None:
    """Send the seller's decision. By update (default): refused at once if not allowed."""
    settings = ui.settings()
    structlog.contextvars.bind_contextvars(workflow_id=cancellation_id)
    try:
        payload = SellerDecision(seller_id=seller, decision=decision, reason=reason)
    except ValueError as err:
        err_console.print(f"[red]invalid decision:[/red] {err}")
        raise typer.Exit(2) from None

    async def main() -> None:
        async with open_stack(settings) as stack:
            with _as_command_errors():
                if signal:
                    await cancellations.signal_decision(stack.client, cancellation_id, payload)
                    console.print("signal sent (a refused signal is recorded in the audit trail)")
                    return
                receipt = await cancellations.decide(stack.client, cancellation_id, payload)
            console.print(f"[green]{receipt.message}[/green]: now {receipt.status.value}")

    ui.run(main())


@app.command()
def withdraw(
    cancellation_id: Annotated[str, typer.Argument(help="e.g. cancel-O-1002~S-7")],
    buyer: Annotated[str, typer.Option(help="The buyer who asked")],
    reason: Annotated[str, typer.Option(help="Why (audit trail, told to the seller)")] = "",
) -> None:
    """The buyer withdraws a pending request (signal `withdraw`)."""
    settings = ui.settings()
    structlog.contextvars.bind_contextvars(workflow_id=cancellation_id)

    async def main() -> None:
        async with open_stack(settings) as stack:
            with _as_command_errors():
                await cancellations.withdraw(
                    stack.client, cancellation_id, WithdrawRequest(buyer_id=buyer, reason=reason)
                )
            console.print("withdrawal sent")

    ui.run(main())


@app.command()
def status(
    cancellation_id: Annotated[str, typer.Argument(help="e.g. cancel-O-1002~S-7")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show a cancellation: the three dots, ETA, coupon outcome and the audit trail."""
    settings = ui.settings()
    structlog.contextvars.bind_contextvars(workflow_id=cancellation_id)

    async def main() -> CancellationView:
        async with open_stack(settings) as stack:
            with _as_command_errors():
                located = await cancellations.locate(
                    stack.client, Ledger(stack.pool), cancellation_id
                )
        if located is None:
            raise CommandError(f"no cancellation {cancellation_id}")
        return located.view

    view = ui.run(main())
    if as_json:
        sys.stdout.write(view.model_dump_json(indent=2) + "\n")
    else:
        render_view(console, view)


@app.command()
def message(
    cancellation_id: Annotated[str, typer.Argument(help="e.g. cancel-O-1002~S-7")],
    text: Annotated[str, typer.Argument(help="The message (at most 500 characters)")],
    author: Annotated[
        MessageAuthor, typer.Option("--as", help="Who writes: the buyer or the seller")
    ],
    author_id: Annotated[
        str | None,
        typer.Option(help="The buyer's or seller's id (default: the cancellation's own)"),
    ] = None,
) -> None:
    """Write on a request waiting for its seller (update `message`, R18): refused once it is
    answered, past 500 characters or 20 messages, or from another buyer or seller."""
    settings = ui.settings()
    structlog.contextvars.bind_contextvars(workflow_id=cancellation_id)

    async def main() -> None:
        async with open_stack(settings) as stack:
            with _as_command_errors():
                who = author_id
                if who is None:
                    located = await cancellations.locate(
                        stack.client, Ledger(stack.pool), cancellation_id
                    )
                    if located is None:
                        raise CommandError(f"no cancellation {cancellation_id}")
                    view = located.view
                    who = view.buyer_id if author is MessageAuthor.BUYER else view.seller_id
                try:
                    request = MessageRequest(author=author, author_id=who, text=text)
                except ValueError as err:
                    raise CommandError(f"invalid message: {err}") from None
                receipt = await cancellations.message(stack.client, cancellation_id, request)
            console.print(
                f"[green]message recorded[/green] from {receipt.author}"
                f" ({receipt.messages_left} more allowed)",
                highlight=False,
            )

    ui.run(main())


@app.command("list")
def list_command(
    seller: Annotated[str | None, typer.Option(help="Only this seller's")] = None,
    buyer: Annotated[str | None, typer.Option(help="Only this buyer's")] = None,
    order: Annotated[str | None, typer.Option(help="Only this checkout order's")] = None,
    status: Annotated[CancellationStatus | None, typer.Option(help="Only in this status")] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=LIST_LIMIT_MAX, help="At most this many per page")
    ] = LIST_LIMIT_DEFAULT,
    cursor: Annotated[
        str | None, typer.Option(help="Where the last page ended (its next cursor)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Cancellations from the ledger (R17): requests awaiting their seller first, the soonest
    deadline first, then the others, oldest first; a page at a time (--cursor)."""
    settings = ui.settings()

    async def main() -> CancellationPage:
        async with open_stack(settings) as stack:
            try:
                return await list_cancellations(
                    stack.pool,
                    seller_id=seller,
                    buyer_id=buyer,
                    order_id=order,
                    status=status,
                    cursor=cursor,
                    limit=limit,
                )
            except InvalidCursor as err:
                raise CommandError(f"--cursor: {err}") from None

    page = ui.run(main())
    if as_json:
        sys.stdout.write(page.model_dump_json(indent=2) + "\n")
    else:
        render_page(console, page)
