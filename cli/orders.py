"""`ordercancel orders load|schema|event`: checkout orders handed over by the order system, and
what happens to them afterwards (R13)."""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from cli import console as ui
from cli.console import console
from domain.order_events import OrderEventIn, OrderEventType
from infra.stack import open_stack
from ledger.orders import load_orders, orders_json_schema, parse_orders_file
from starter.order_events import NotTold, deliver_order_event

orders_app = typer.Typer(
    help="Orders handed over by the order system, and what happens to them.", no_args_is_help=True
)


@orders_app.command("load")
def orders_load(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
) -> None:
    """Load checkout orders from a JSON file (all or nothing; loading twice changes nothing)."""
    settings = ui.settings()

    async def main() -> None:
        orders = parse_orders_file(file.read_text())
        async with open_stack(settings) as stack:
            report = await load_orders(stack.pool, orders)
        console.print(f"{len(report.loaded)} orders loaded, {len(report.unchanged)} already loaded")

    ui.run(main())


@orders_app.command("schema")
def orders_schema() -> None:
    """Print the JSON Schema of the orders file."""
    sys.stdout.write(json.dumps(orders_json_schema(), indent=2) + "\n")


@orders_app.command("event")
def orders_event(
    order_id: Annotated[str, typer.Argument(help="Checkout order id, e.g. O-2001")],
    type_: Annotated[OrderEventType, typer.Argument(metavar="TYPE", help="What happened")],
    seller: Annotated[
        str | None,
        typer.Option(help="The sub-order's seller (seller_accepted, sub_order_shipped)"),
    ] = None,
    amount: Annotated[
        int | None,
        typer.Option(help="payment_captured: minor units captured (default: all authorised)"),
    ] = None,
    event_id: Annotated[
        str | None,
        typer.Option(
            help="The order system's event id (default: a new one; reuse it to redeliver)"
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(help="When it happened, ISO 8601 (e.g. 2026-11-20T10:05:00Z; default: now)"),
    ] = None,
) -> None:
    """Apply what happened to an order: payment validated or captured, seller accepted, shipped
    (once per event id; causal order whatever the arrival order, R13)."""
    try:
        occurred_at = datetime.fromisoformat(at) if at is not None else datetime.now(UTC)
    except ValueError:
        raise ui.bad_argument(f"--at: not an ISO 8601 time: {at!r}") from None
    try:
        event = OrderEventIn(
            event_id=event_id or f"cli-{uuid.uuid4().hex}",
            type=type_,
            seller_id=seller,
            amount_minor=amount,
            occurred_at=occurred_at,
        )
    except ValidationError as err:
        problems = "; ".join(
            str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else f"{e['loc']}: {e['msg']}"
            for e in err.errors(include_url=False)
        )
        raise ui.bad_argument(f"invalid event: {problems}") from None
    settings = ui.settings()

    async def main() -> None:
        async with open_stack(settings) as stack:
            try:
                result = await deliver_order_event(stack.client, stack.pool, order_id, event)
            except NotTold as err:
                raise ui.CommandError(str(err)) from None
        console.print(
            f"event {result.event_id}: {result.outcome.value}"
            + (" (delivered before)" if result.duplicate else "")
            + f" - {result.detail}",
            highlight=False,
        )

    ui.run(main())
