"""`ordercancel sellers policy|policies` (R19: the seller's window is the marketplace's policy)
and `ordercancel stuck` (issue 20: requests waiting for their seller, oldest first).

Exit codes: 0 done, 1 refused (a window below the floor) or the stack is unreachable, 2 bad
arguments.
"""

from __future__ import annotations

import getpass
import json
from datetime import timedelta
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cli import console as ui
from cli.console import console
from domain.models import TimeoutPolicy
from domain.rules import parse_duration
from infra.stack import open_ledger, window_floor
from ledger.policies import SellerPolicy, clear_policy, list_policies, set_policy
from ledger.stuck import StuckCancellation, stuck_cancellations

sellers_app = typer.Typer(
    help="Sellers' policies: each seller's response window (R19).", no_args_is_help=True
)


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise ui.bad_argument(str(err)) from None


def _show(value: timedelta | None) -> str:
    if value is None:
        return "?"
    seconds = int(value.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours else []
    parts += [f"{minutes}m"] if minutes else []
    parts += [f"{secs}s"] if secs or not parts else []
    return sign + "".join(parts)


@sellers_app.command("policy")
def policy(
    seller_id: Annotated[str, typer.Argument(help="The seller, e.g. S-2")],
    window: Annotated[
        str | None, typer.Option(help="The seller's response window, e.g. 2m, 24h")
    ] = None,
    timeout_policy: Annotated[
        TimeoutPolicy | None,
        typer.Option(help="When the window ends (unset: ORDERCANCEL_TIMEOUT_POLICY)"),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Back to the defaults")] = False,
) -> None:
    """Set a seller's response window (never below ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR), or
    --clear it. Applies to cancellations opened from now on; those waiting keep their deadline."""
    if clear == (window is not None):
        raise ui.bad_argument("give either --window DURATION or --clear")
    response_window = _duration(window) if window is not None else None
    settings = ui.settings()

    async def main() -> SellerPolicy | bool:
        async with open_ledger(settings, max_size=2) as pool:
            if response_window is None:
                return await clear_policy(pool, seller_id=seller_id)
            return await set_policy(
                pool,
                seller_id=seller_id,
                response_window=response_window,
                floor=window_floor(settings),
                timeout_policy=timeout_policy,
                updated_by=f"cli:{getpass.getuser()}",
            )

    result = ui.run(main())
    if isinstance(result, SellerPolicy):
        console.print(
            f"seller {escape(seller_id)}: response window {_show(result.response_window)},"
            f" timeout policy {result.timeout_policy.value if result.timeout_policy else 'default'}"
            " (for cancellations opened from now on)"
        )
    elif result:
        console.print(f"seller {escape(seller_id)}: policy cleared, the defaults apply")
    else:
        console.print(f"seller {escape(seller_id)} had no policy: the defaults apply")


@sellers_app.command("policies")
def policies(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List the sellers' policies."""
    settings = ui.settings()

    async def main() -> list[SellerPolicy]:
        async with open_ledger(settings, max_size=2) as pool:
            return await list_policies(pool)

    rows = ui.run(main())
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    table = Table(title=f"{len(rows)} seller polic(ies)", title_justify="left")
    for column in ("seller", "window", "timeout policy", "by", "since"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            escape(r.seller_id),
            _show(r.response_window),
            r.timeout_policy.value if r.timeout_policy else "default",
            escape(r.updated_by),
            f"{r.updated_at:%Y-%m-%d %H:%M:%S}" if r.updated_at else "?",
        )
    console.print(table)


def stuck(
    older_than: Annotated[
        str, typer.Option(help="Only requests waiting at least this long, e.g. 24h")
    ] = "0s",
    limit: Annotated[int, typer.Option(min=1, max=100000, help="At most this many")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Requests waiting for their seller (or escalated), oldest first: how long they have
    waited and how long is left until the seller's deadline (negative: overdue)."""
    threshold = _duration(older_than)
    settings = ui.settings()

    async def main() -> list[StuckCancellation]:
        async with open_ledger(settings, max_size=2) as pool:
            return await stuck_cancellations(pool, older_than=threshold, limit=limit)

    rows = ui.run(main())
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    table = Table(
        title=f"{len(rows)} request(s) waiting at least {_show(threshold)}", title_justify="left"
    )
    for column in ("id", "order", "seller", "status", "waited", "left", "deadline"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            escape(r.cancellation_id),
            escape(r.order_id),
            escape(r.seller_id),
            r.status.value,
            _show(r.waited),
            _show(r.left) if r.left is not None else "?",
            f"{r.seller_deadline:%Y-%m-%d %H:%M:%S} UTC" if r.seller_deadline else "?",
        )
    console.print(table)
