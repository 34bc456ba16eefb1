"""`ordercancel dispatch` (deliver the outbound events, R16) and `ordercancel events tail|replay|
subscribers` (docs/events.md).

Exit codes: 0 done, 1 the ledger is unreachable, the subscribers' configuration is wrong or the
subscriber is unknown, 2 bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Annotated

import structlog
import typer
from rich.markup import escape
from rich.table import Table

from cli import console as ui
from cli.console import CommandError, LogFormat, console, err_console
from domain.rules import parse_cancellation_id
from infra.stack import open_ledger
from outbound.store import OutboundEvent, OutboxStore
from outbound.subscribers import EVENT_TYPES, SubscribersError

events_app = typer.Typer(
    help="The outbound events (R16): the stream, and the subscribers' positions.",
    no_args_is_help=True,
)


def dispatch(log_format: LogFormat = None) -> None:
    """Deliver the outbound events to the configured subscribers (ORDERCANCEL_SUBSCRIBERS or
    ORDERCANCEL_SUBSCRIBERS_FILE) as signed webhooks, until SIGINT/SIGTERM."""
    from infra.metrics import DispatchMetrics, metrics_address, metrics_runtime
    from outbound.dispatcher import dispatcher_from_settings

    settings = ui.settings(log_format)

    async def main() -> None:
        metrics = DispatchMetrics()
        address = metrics_address(settings.dispatch_metrics_port, settings.metrics_host)
        runtime = metrics_runtime(address) if address else None
        if runtime is not None:
            metrics = DispatchMetrics.for_runtime(runtime)
            structlog.get_logger(__name__).info("metrics_serving", url=f"http://{address}/metrics")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with open_ledger(settings, max_size=4) as pool:
            try:
                dispatcher = dispatcher_from_settings(settings, pool, metrics=metrics)
            except SubscribersError as err:
                raise CommandError(str(err)) from None
            await dispatcher.run(stop)

    ui.run(main())


def _print(event: OutboundEvent, as_json: bool) -> None:
    if as_json:
        print(event.model_dump_json(), flush=True)
        return
    changed = ", ".join(
        f"{k}={v}"
        for k, v in event.data.items()
        if k in ("status", "stage", "dot", "outcome", "seller_deadline", "author", "error")
        and v is not None
    )
    console.print(
        f"{event.position:>6}  {event.occurred_at.isoformat(timespec='seconds')}"
        f"  [bold]{event.type}[/bold]  {escape(event.cancellation_id)}  {escape(changed)}",
        highlight=False,
    )


@events_app.command("tail")
def tail(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events")
    ] = False,
    cancellation: Annotated[
        str | None,
        typer.Option("--cancellation", help="Only this cancellation's events (cancel-O-1002~S-7)"),
    ] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", help=f"Only this type ({', '.join(EVENT_TYPES)})")
    ] = None,
    last: Annotated[int, typer.Option("--last", "-n", min=0, help="Start with the last N")] = 20,
    from_position: Annotated[
        int | None,
        typer.Option("--from", min=1, help="Start at this position instead of the last N"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON event per line")] = False,
) -> None:
    """The event stream in position order (what every subscriber receives, in that order)."""
    if event_type is not None and event_type not in EVENT_TYPES:
        raise ui.bad_argument(f"unknown event type {event_type!r}; known: {', '.join(EVENT_TYPES)}")
    if cancellation is not None and parse_cancellation_id(cancellation) is None:
        raise ui.bad_argument(
            f"{cancellation!r} is not a cancellation id (cancel-ORDER~SELLER, e.g."
            " cancel-O-1002~S-7)"
        )
    settings = ui.settings("console", quiet=True)

    async def main() -> None:
        async with open_ledger(settings, max_size=4) as pool:
            store = OutboxStore(pool)
            await store.sequence()
            if from_position is not None:
                after = from_position - 1
            else:
                matching = await store.last_positions(
                    last, cancellation_id=cancellation, event_type=event_type
                )
                after = matching[-1] - 1 if matching else await store.last_position()
            printed = 0
            while True:
                events = await store.events_after(
                    after, limit=500, cancellation_id=cancellation, event_type=event_type
                )
                for event in events:
                    _print(event, as_json)
                    after = event.position
                printed += len(events)
                if events:
                    continue
                if not follow:
                    if not printed:
                        # On stderr: stdout stays events only (`--json` is one event a line).
                        err_console.print(
                            _no_events(cancellation, event_type, from_position, last),
                            highlight=False,
                        )
                    return
                await asyncio.sleep(settings.dispatch_poll_interval.total_seconds())
                await store.sequence()

    try:
        ui.run(main())
    except BrokenPipeError:
        # `... | head -1`: the reader has what it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


def _no_events(
    cancellation: str | None, event_type: str | None, from_position: int | None, last: int
) -> str:
    """What `tail` says when it has nothing to print (instead of printing nothing)."""
    where = [f"for {escape(cancellation)}"] if cancellation else []
    if event_type:
        where.append(f"of type {event_type}")
    if from_position is not None:
        where.append(f"from position {from_position}")
    elif last == 0:
        where.append("(--last 0: add --follow to print new ones as they come)")
    return " ".join(["no events", *where])


@events_app.command("replay")
def replay(
    subscriber: Annotated[str, typer.Option("--subscriber", help="The subscriber's name")],
    from_position: Annotated[
        int, typer.Option("--from", min=1, help="The first position to send again")
    ],
) -> None:
    """Send the events again from POSITION on: moves the subscriber's position back to
    POSITION - 1 (or forward, to skip events); the running dispatcher picks it up."""
    settings = ui.settings("console", quiet=True)

    async def main() -> None:
        async with open_ledger(settings, max_size=4) as pool:
            store = OutboxStore(pool)
            last = await store.last_position()
            if from_position > last + 1:
                raise CommandError(
                    f"position {from_position} is past the end of the stream ({last})"
                )
            before = await store.reset(subscriber, from_position - 1)
            if before is None:
                raise CommandError(
                    f"no subscriber {subscriber!r} has a position yet (names: run"
                    " `ordercancel events subscribers`)"
                )
            if from_position > last:
                what = (
                    f"nothing to send again: {last} is the last event; it gets the events"
                    " written from now on"
                )
            else:
                what = f"events {from_position}..{last} will be sent (again) by the dispatcher"
            console.print(
                f"{escape(subscriber)}: position {before} -> {from_position - 1}; {what}",
                highlight=False,
            )

    ui.run(main())


@events_app.command("subscribers")
def subscribers(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Each subscriber's position, how far behind it is, and its last error."""
    settings = ui.settings("console", quiet=True)

    async def main() -> None:
        async with open_ledger(settings, max_size=4) as pool:
            store = OutboxStore(pool)
            await store.sequence()
            states = await store.subscribers()
        if as_json:
            print(json.dumps([s.model_dump(mode="json") for s in states], indent=2))
            return
        table = Table(
            "subscriber", "position", "behind", "oldest undelivered", "attempts", "last error"
        )
        for s in states:
            table.add_row(
                s.name,
                str(s.position),
                str(s.behind),
                s.oldest_undelivered_at.isoformat(timespec="seconds")
                if s.oldest_undelivered_at
                else "",
                str(s.attempts),
                escape(s.last_error or ""),
            )
        console.print(table)

    ui.run(main())
