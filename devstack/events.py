"""The dev stack's outbound events (R16): the dispatcher, and a small demo subscriber that
verifies each webhook's signature and prints what the seller and the buyer would be told.

`ordercancel dev` (`make run`) starts both; subscribers configured with ORDERCANCEL_SUBSCRIBERS
or ORDERCANCEL_SUBSCRIBERS_FILE get the events too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape

from infra.metrics import NO_DISPATCH_METRICS, DispatchMetrics
from infra.settings import Settings
from outbound.dispatcher import Dispatcher
from outbound.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from outbound.store import OutboxStore
from outbound.subscribers import Subscriber, SubscribersError, load_subscribers

log = structlog.get_logger(__name__)

DEMO_SUBSCRIBER = "dev-demo"


def told(event: dict[str, Any]) -> list[tuple[str, str]]:
    """(who, what) the notification service would send for this event."""
    data = event.get("data") or {}
    order, seller, buyer = event["order_id"], event["seller_id"], event["buyer_id"]
    detail = data.get("detail") or ""
    match event["type"]:
        case "cancellation.requested":
            deadline = data.get("seller_deadline")
            if deadline:
                return [
                    (
                        f"seller {seller}",
                        f"buyer {buyer} asks to cancel order {order} ({data.get('reason')});"
                        f" answer by {deadline}",
                    ),
                    (f"buyer {buyer}", f"your request went to seller {seller}"),
                ]
            return [(f"buyer {buyer}", f"your cancellation of order {order} is under way")]
        case "cancellation.approved":
            how = "at once (payment not validated yet)" if data.get("instant") else "approved"
            return [
                (f"buyer {buyer}", f"order {order} from {seller}: cancelled {how}"),
                (f"seller {seller}", f"order {order} is cancelled; do not ship it"),
            ]
        case "cancellation.rejected":
            return [(f"buyer {buyer}", f"seller {seller} declined: {detail}")]
        case "cancellation.withdrawn":
            return [(f"seller {seller}", f"buyer {buyer} withdrew the request on {order}")]
        case "cancellation.escalated":
            return [
                ("operations", f"{event['cancellation_id']}: the seller did not answer in time"),
                (f"buyer {buyer}", "the marketplace will decide your request"),
            ]
        case "cancellation.message":
            to = (
                f"seller {seller}"
                if str(data.get("author", "")).startswith("buyer")
                else (f"buyer {buyer}")
            )
            return [(to, f"message: {data.get('text')}")]
        case "refund.stage_changed":
            eta = data.get("eta") or {}
            return [
                (
                    f"buyer {buyer}",
                    f"refund {data.get('stage')} (dot {data.get('dot')} of 3)"
                    + (f", expected by {eta.get('latest')}" if eta else ""),
                )
            ]
        case "refund.failed":
            return [
                ("operations", f"{event['cancellation_id']}: refund failed: {data.get('error')}")
            ]
        case "coupon.decided":
            return [(f"buyer {buyer}", f"coupon: {data.get('outcome')} ({data.get('reason')})")]
    return []


@dataclass
class DemoSubscriber:
    """A webhook receiver on 127.0.0.1 (asyncio, stdlib only): checks the signature, answers
    204 (401 when it does not verify) and prints each event once."""

    console: Console
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    received: list[dict[str, Any]] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _seen: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/events"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readline()  # the request line
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            ok = verify(
                self.secret,
                body,
                headers.get(TIMESTAMP_HEADER.lower()),
                headers.get(SIGNATURE_HEADER.lower()),
            )
            if ok:
                self._show(json.loads(body))
            status = "204 No Content" if ok else "401 Unauthorized"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as err:
            log.warning("demo_subscriber_bad_request", error=str(err))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _show(self, event: dict[str, Any]) -> None:
        if event["id"] in self._seen:  # at least once: a repeat is shown once
            return
        self._seen.add(event["id"])
        self.received.append(event)
        for who, what in told(event) or [("", "")]:
            self.console.print(
                f"[cyan]event #{event['position']}[/cyan] [bold]{event['type']}[/bold]"
                f" {escape(event['cancellation_id'])} (signature ok)"
                + (f" -> {escape(who)}: {escape(what)}" if who else ""),
                highlight=False,
            )


@dataclass
class DevEvents:
    subscriber: DemoSubscriber
    _stop: asyncio.Event
    _task: asyncio.Task[None]

    async def stop(self) -> None:
        self._stop.set()
        await self._task
        await self.subscriber.stop()


async def start_dev_events(
    settings: Settings,
    pool: asyncpg.Pool,
    *,
    console: Console,
    metrics: DispatchMetrics = NO_DISPATCH_METRICS,
) -> DevEvents:
    """The demo subscriber, then the dispatcher for it and the configured subscribers."""
    demo = DemoSubscriber(console)
    await demo.start()
    inline = settings.subscribers.get_secret_value() if settings.subscribers else None
    try:
        configured = load_subscribers(inline, settings.subscribers_file)
    except SubscribersError as err:
        await demo.stop()
        raise RuntimeError(str(err)) from None
    subscribers = [
        *configured,
        Subscriber(name=DEMO_SUBSCRIBER, url=demo.url, secret=SecretStr(demo.secret)),
    ]
    dispatcher = Dispatcher(
        pool,
        subscribers,
        metrics=metrics,
        poll_interval=settings.dispatch_poll_interval,
        retry_initial=settings.dispatch_retry_initial,
        retry_max=settings.dispatch_retry_max,
        timeout=settings.dispatch_timeout,
        metrics_interval=settings.dispatch_metrics_interval,
    )
    # A dev stack started again keeps its data: the demo subscriber shows only what is new.
    await OutboxStore(pool).sequence()
    await pool.execute(
        "INSERT INTO outbox_subscribers (name, position)"
        " SELECT $1, coalesce(max(position), 0) FROM outbox"
        " ON CONFLICT (name) DO UPDATE SET position = greatest(outbox_subscribers.position,"
        " excluded.position)",
        DEMO_SUBSCRIBER,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop), name="dev-dispatcher")
    return DevEvents(demo, stop, task)
