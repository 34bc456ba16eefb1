"""R16: the transactional outbox and its dispatcher, on a real PostgreSQL and real HTTP servers.

- Each ledger change writes its event in the same transaction (the trigger on the audit
  trail): a rolled-back change and a writer killed mid-transaction leave neither.
- Positions never skip an event whose transaction commits late.
- Delivery: a subscriber answering 500, one timing out and one down for a while get every
  event, each cancellation's in order, signed; the healthy one is not held back; replay sends
  again from a position; the metrics show lag and failures.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from helpers.ledger_steps import (
    FUTURE,
    approve,
    ask_refund,
    confirm,
    decide,
    fresh_order,
    load_demo,
    request,
    some_eta,
)
from helpers.refunds import ORDERCANCEL
from helpers.stacks import run_command
from helpers.wait import eventually
from rich.console import Console

from devstack.embedded import free_port
from devstack.events import start_dev_events
from domain.models import CancellationStatus, EventInput, TransitionInput
from domain.orders import OrdersFile
from domain.rules import cancellation_id
from infra.metrics import DispatchMetrics, metrics_runtime
from infra.settings import Settings
from ledger.orders import load_orders
from ledger.repository import Ledger
from outbound.dispatcher import Dispatcher
from outbound.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, signed_headers, verify
from outbound.store import OutboxStore
from outbound.subscribers import Subscriber, SubscribersError, load_subscribers

SECRET = "whsec_test_0123456789abcdef"


async def outbox(pool: asyncpg.Pool, cid: str | None = None) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM outbox WHERE $1::text IS NULL OR cancellation_id = $1 ORDER BY id", cid
    )


async def stream(pool: asyncpg.Pool) -> list[Any]:
    store = OutboxStore(pool)
    await store.sequence()
    return await store.events_after(0, limit=1000)


# --- the events the ledger's changes write ---------------------------------------------------


async def test_each_change_writes_its_event_with_what_changed(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = cancellation_id("O-1002", "S-7")
    opened = await ledger.open_cancellation(cancellation_id=cid, request=request("O-1002", "S-7"))
    await approve(ledger, cid)
    await ask_refund(ledger, cid)
    await confirm(ledger, cid)
    await decide(ledger, cid)
    # A note that is not an event (R16 names what subscribers are told).
    await ledger.record_event(
        EventInput(cancellation_id=cid, event_key="n", actor="system", kind="resumed")
    )

    events = await stream(pool)
    assert [e.type for e in events] == [
        "cancellation.requested",
        "cancellation.approved",
        "refund.stage_changed",
        "refund.stage_changed",
        "refund.stage_changed",
        "coupon.decided",
    ]
    assert [e.position for e in events] == [1, 2, 3, 4, 5, 6]
    assert len({e.id for e in events}) == 6 and all(e.id.startswith("evt_") for e in events)
    for e in events:
        assert (e.cancellation_id, e.order_id, e.seller_id, e.buyer_id) == (
            cid,
            "O-1002",
            "S-7",
            "B-502",
        )
    requested = events[0].data
    assert requested["path"] == "request"
    assert opened.seller_deadline is not None
    assert datetime.fromisoformat(requested["seller_deadline"]) == opened.seller_deadline
    assert requested["reason"] == "ordered_by_mistake"
    assert [e.data["dot"] for e in events[2:5]] == [1, 2, 3]
    assert [e.data["stage"] for e in events[2:5]] == ["requested", "submitted", "confirmed"]
    assert all(e.data["eta"]["earliest"] for e in events[2:5])
    assert events[5].data["outcome"] == "no_coupon"
    assert events[5].data["reason"]
    # The stored id is stable: read again, the same.
    assert [e.id for e in await OutboxStore(pool).events_after(0)] == [e.id for e in events]


async def test_instant_path_failure_and_coupon_events(pool: asyncpg.Pool) -> None:
    ledger = Ledger(pool)
    await load_orders(
        pool,
        OrdersFile(
            orders=[
                fresh_order("O-9001", unvalidated=True),
                fresh_order("O-9002", coupon_expires=FUTURE),
            ]
        ),
    )
    instant = cancellation_id("O-9001", "S-7")
    await ledger.open_cancellation(cancellation_id=instant, request=request("O-9001", "S-7", "B-1"))
    cid = cancellation_id("O-9002", "S-7")
    await ledger.open_cancellation(cancellation_id=cid, request=request("O-9002", "S-7", "B-1"))
    await approve(ledger, cid)
    await ask_refund(ledger, cid)
    await ledger.record_refund_submitted(
        cancellation_id=cid, provider_ref="re_1", eta=some_eta(), event_key="submitted"
    )
    await ledger.record_refund_failed(
        cancellation_id=cid, error="provider_down: try later", event_key="failed-1"
    )
    # A repeated report with the same key writes nothing, so no second event.
    await ledger.record_refund_failed(
        cancellation_id=cid, error="provider_down: try later", event_key="failed-1"
    )
    await ledger.record_refund_submitted(
        cancellation_id=cid, provider_ref="re_1", eta=some_eta(), event_key="submitted-2"
    )
    await ledger.record_refund_confirmed(cancellation_id=cid, event_key="confirmed")
    # A late failure report after confirmation stays in the trail but is not a refund.failed.
    await ledger.record_refund_failed(cancellation_id=cid, error="late", event_key="failed-late")
    await decide(ledger, cid)

    events = await stream(pool)
    by_cid: dict[str, list[Any]] = {}
    for e in events:
        by_cid.setdefault(e.cancellation_id, []).append(e)
    assert [(e.type, e.data.get("instant")) for e in by_cid[instant]] == [
        ("cancellation.requested", None),
        ("cancellation.approved", True),
    ]
    assert by_cid[instant][0].data["seller_deadline"] is None
    assert [e.type for e in by_cid[cid]] == [
        "cancellation.requested",
        "cancellation.approved",
        "refund.stage_changed",
        "refund.stage_changed",
        "refund.failed",
        "refund.stage_changed",
        "refund.stage_changed",
        "coupon.decided",
    ]
    failed = by_cid[cid][4].data
    assert (failed["stage"], failed["final"], failed["error"]) == (
        "failed",
        False,
        "provider_down: try later",
    )
    coupon = by_cid[cid][-1].data
    assert (coupon["outcome"], coupon["coupon_code"]) == ("restored", "SPRING10")


async def test_message_audit_rows_are_message_events(pool: asyncpg.Pool) -> None:
    """`cancellation.message` (R18): whoever writes a `message` audit row gets its event."""
    ledger = await load_demo(pool)
    cid = cancellation_id("O-1002", "S-7")
    await ledger.open_cancellation(cancellation_id=cid, request=request("O-1002", "S-7"))
    await ledger.record_event(
        EventInput(
            cancellation_id=cid,
            event_key="message-1",
            actor="seller:S-7",
            kind="message",
            detail="Could you keep it? I can offer 10% off.",
        )
    )
    message = (await stream(pool))[-1]
    assert message.type == "cancellation.message"
    assert message.data["author"] == "seller:S-7"
    assert message.data["text"] == "Could you keep it? I can offer 10% off."


# --- atomicity: no change without its event, no event without its change ---------------------

_TRANSITION = (
    "UPDATE cancellations SET status = 'approved' WHERE cancellation_id = $1;"
    " INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind)"
    " VALUES ($1, 'approved', 'seller:S-7', 'approved')"
)


async def test_a_rolled_back_change_leaves_no_event(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = cancellation_id("O-1002", "S-7")
    await ledger.open_cancellation(cancellation_id=cid, request=request("O-1002", "S-7"))
    before = await outbox(pool)

    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="after the audit row"):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind)"
                    " VALUES ($1, 'approved', 'seller:S-7', 'approved')",
                    cid,
                )
                # Inside the transaction the event exists ...
                assert await conn.fetchval(
                    "SELECT count(*) FROM outbox WHERE type = 'cancellation.approved'"
                )
                raise RuntimeError("the ledger failed after the audit row")
    # ... and with its rollback it is gone, with the change.
    assert await outbox(pool) == before
    # A failing statement (an unknown cancellation) writes neither.
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await ledger.record_event(
            EventInput(cancellation_id="cancel-nope~S-1", event_key="x", actor="s", kind="approved")
        )
    assert await outbox(pool) == before
    # And the change, committed, has its event.
    await approve(ledger, cid)
    assert [r["type"] for r in await outbox(pool)][-1] == "cancellation.approved"


async def test_a_writer_killed_between_statements_leaves_neither(
    pool: asyncpg.Pool, database_url: str
) -> None:
    ledger = await load_demo(pool)
    cid = cancellation_id("O-1002", "S-7")
    await ledger.open_cancellation(cancellation_id=cid, request=request("O-1002", "S-7"))
    before_events = await pool.fetchval("SELECT count(*) FROM cancellation_events")
    before = await outbox(pool)
    writer = (
        "import asyncio, sys, asyncpg\n"
        "async def main():\n"
        "    conn = await asyncpg.connect(sys.argv[1])\n"
        "    tr = conn.transaction(); await tr.start()\n"
        "    await conn.execute(sys.argv[2].split(';')[0], sys.argv[3])\n"
        "    await conn.execute(sys.argv[2].split(';')[1], sys.argv[3])\n"
        "    print('written', flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        writer,
        database_url,
        _TRANSITION,
        cid,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"written"
    # The writer's change and event exist, uncommitted; kill it before the commit.
    assert await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
        " AND datname = current_database()"
    )
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()

    async def rolled_back() -> None:
        assert not await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
            " AND datname = current_database()"
        )

    await eventually(rolled_back)
    assert await pool.fetchval("SELECT count(*) FROM cancellation_events") == before_events
    assert await outbox(pool) == before
    status = await pool.fetchval("SELECT status FROM cancellations WHERE cancellation_id = $1", cid)
    assert status == CancellationStatus.AWAITING_SELLER.value


async def test_a_late_commit_is_never_skipped(pool: asyncpg.Pool) -> None:
    """The event of a transaction that started first but commits last gets a position after
    what was given meanwhile, never below it: a reader at the end of the stream misses
    nothing."""
    ledger = await load_demo(pool)
    a = cancellation_id("O-1002", "S-7")
    b = cancellation_id("O-1003", "S-8")
    await ledger.open_cancellation(cancellation_id=a, request=request("O-1002", "S-7"))
    await ledger.open_cancellation(cancellation_id=b, request=request("O-1003", "S-8"))
    store = OutboxStore(pool)
    await store.sequence()
    seen = await store.last_position()

    async with pool.acquire() as slow:
        tr = slow.transaction()
        await tr.start()
        await slow.execute(
            "INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind)"
            " VALUES ($1, 'approved', 'seller:S-7', 'approved')",
            a,
        )
        # Another transaction writes and commits meanwhile: its event waits for the slow one.
        await approve(ledger, b)
        await store.sequence()
        assert await store.events_after(seen) == []
        await tr.commit()
    await store.sequence()
    after = await store.events_after(seen)
    assert [(e.cancellation_id, e.position) for e in after] == [(a, seen + 1), (b, seen + 2)]


async def test_retried_writes_make_one_event(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    cid = cancellation_id("O-1002", "S-7")
    for _ in range(2):
        await ledger.open_cancellation(cancellation_id=cid, request=request("O-1002", "S-7"))
        await ledger.record_transition(
            TransitionInput(
                cancellation_id=cid,
                status=CancellationStatus.REJECTED,
                actor="seller:S-7",
                kind="rejected",
                detail="already shipped",
                event_key="rejected",
            )
        )
    assert [e.type for e in await stream(pool)] == [
        "cancellation.requested",
        "cancellation.rejected",
    ]


# --- signing and configuration ----------------------------------------------------------------


def test_signature_verifies_and_refuses_tampering_and_old_timestamps() -> None:
    body = b'{"id":"evt_1"}'
    headers = signed_headers(SECRET, body, now=1_700_000_000)
    ts, sig = headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]
    assert sig.startswith("v1=")
    assert verify(SECRET, body, ts, sig, now=1_700_000_010)
    assert not verify(SECRET, body + b" ", ts, sig, now=1_700_000_010)
    assert not verify("another-secret-0123456789", body, ts, sig, now=1_700_000_010)
    assert not verify(SECRET, body, ts, sig, now=1_700_000_000 + 3600)
    assert not verify(SECRET, body, None, sig)


def test_subscriber_configuration_errors_are_specific(tmp_path: Any) -> None:
    good = [{"name": "notify", "url": "http://127.0.0.1:1/hook", "secret": SECRET}]
    assert [s.name for s in load_subscribers(json.dumps(good), None)] == ["notify"]
    with pytest.raises(SubscribersError, match="not JSON"):
        load_subscribers("[{", None)
    with pytest.raises(SubscribersError, match=r"0\.url"):
        load_subscribers(json.dumps([{**good[0], "url": "ftp://x"}]), None)
    with pytest.raises(SubscribersError, match="unknown event types"):
        load_subscribers(json.dumps([{**good[0], "types": ["refund.done"]}]), None)
    with pytest.raises(SubscribersError, match="unique"):
        load_subscribers(json.dumps(good * 2), None)
    with pytest.raises(SubscribersError, match="ORDERCANCEL_SUBSCRIBERS_FILE"):
        load_subscribers(None, tmp_path / "missing.json")


# --- delivery -----------------------------------------------------------------------------------


class Receiver:
    """A subscriber's HTTP endpoint: answers `fail` requests with 500, holds `slow` requests
    longer than the dispatcher waits, and records what it accepted (2xx) and whether the
    signature verified."""

    def __init__(
        self, *, fail: int = 0, slow: int = 0, port: int | None = None, refuse: int | None = None
    ) -> None:
        self.port = port or free_port()
        # The position of an event this subscriber refuses (400) every time.
        self.refuse = refuse
        self.refused = 0
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.fail = fail
        self.slow = slow
        self.requests = 0
        self.accepted: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.requests += 1
                    n = receiver.requests
                if not verify(
                    SECRET, body, self.headers[TIMESTAMP_HEADER], self.headers[SIGNATURE_HEADER]
                ):
                    receiver.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                if receiver.refuse is not None and json.loads(body)["position"] == receiver.refuse:
                    with receiver._lock:
                        receiver.refused += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                if n <= receiver.fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                if n <= receiver.fail + receiver.slow:
                    time.sleep(3.0)  # the dispatcher has given up: it sends again
                with receiver._lock:
                    receiver.accepted.append(json.loads(body))
                try:
                    self.send_response(204)
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def first_receipts(self) -> list[dict[str, Any]]:
        """Each event once, as first accepted (delivery is at least once)."""
        seen: set[str] = set()
        out = []
        with self._lock:
            for event in self.accepted:
                if event["id"] not in seen:
                    seen.add(event["id"])
                    out.append(event)
        return out

    def subscriber(self, name: str) -> Subscriber:
        return Subscriber(name=name, url=self.url, secret=SECRET)  # type: ignore[arg-type]


@contextmanager
def receivers(*items: Receiver, started: bool = True) -> Iterator[None]:
    try:
        if started:
            for r in items:
                r.start()
        yield
    finally:
        for r in items:
            r.stop()


@asynccontextmanager
async def dispatching(
    pool: asyncpg.Pool, subs: list[Subscriber], metrics: DispatchMetrics, **options: timedelta
) -> AsyncIterator[None]:
    dispatcher = Dispatcher(
        pool,
        subs,
        metrics=metrics,
        poll_interval=options.get("poll_interval", timedelta(seconds=0.05)),
        retry_initial=options.get("retry_initial", timedelta(seconds=0.05)),
        retry_max=options.get("retry_max", timedelta(seconds=0.3)),
        timeout=options.get("timeout", timedelta(seconds=1)),
        metrics_interval=options.get("metrics_interval", timedelta(seconds=0.1)),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def two_stories(pool: asyncpg.Pool) -> tuple[str, str]:
    ledger = await load_demo(pool)
    a = cancellation_id("O-1002", "S-7")
    b = cancellation_id("O-1003", "S-8")
    for cid, order, seller in ((a, "O-1002", "S-7"), (b, "O-1003", "S-8")):
        await ledger.open_cancellation(cancellation_id=cid, request=request(order, seller))
    # Interleaved, as concurrent cancellations are.
    await approve(ledger, a)
    await approve(ledger, b)
    await ask_refund(ledger, a)
    await ask_refund(ledger, b)
    await confirm(ledger, a)
    await confirm(ledger, b)
    return a, b


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_delivery_survives_500s_timeouts_and_a_subscriber_down_for_a_while(
    pool: asyncpg.Pool,
) -> None:
    a, b = await two_stories(pool)
    expected = [e.model_dump(mode="json") for e in await stream(pool)]
    assert len(expected) == 10
    healthy, flaky, slow, down = Receiver(), Receiver(fail=3), Receiver(slow=2), Receiver()
    metrics_port = free_port()
    runtime = metrics_runtime(f"127.0.0.1:{metrics_port}")  # kept: it serves the endpoint
    metrics = DispatchMetrics.for_runtime(runtime)
    subs = [
        healthy.subscriber("healthy"),
        flaky.subscriber("flaky"),
        slow.subscriber("slow"),
        down.subscriber("down"),
    ]
    ids = [e["id"] for e in expected]

    with receivers(healthy, flaky, slow), receivers(down, started=False):
        async with dispatching(pool, subs, metrics):

            async def delivered_to(r: Receiver) -> None:
                assert [e["id"] for e in r.first_receipts()] == ids

            # The healthy one gets everything while another one is down: not held back.
            await eventually(lambda: delivered_to(healthy), timeout=30)
            assert down.requests == 0
            await eventually(lambda: delivered_to(flaky), timeout=30)
            await eventually(lambda: delivered_to(slow), timeout=30)

            async def down_is_behind() -> None:
                text = await asyncio.to_thread(scrape, metrics_port)
                assert metric(text, "ordercancel_outbox_lag_events", subscriber="down") == 10
                oldest = metric(
                    text, "ordercancel_outbox_oldest_undelivered_seconds", subscriber="down"
                )
                assert oldest is not None and oldest > 0
                failures = metric(
                    text,
                    "ordercancel_outbox_delivery_failures",
                    subscriber="down",
                    reason="connect",
                )
                assert failures is not None and failures >= 1

            await eventually(down_is_behind, timeout=30)
            state = await OutboxStore(pool).state("down")
            assert state is not None and state.position == 0 and state.last_error

            # It comes back (same address): it resumes from its position, loses nothing.
            down.start()
            await eventually(lambda: delivered_to(down), timeout=30)

            async def caught_up() -> None:
                text = await asyncio.to_thread(scrape, metrics_port)
                for name in ("healthy", "flaky", "slow", "down"):
                    assert metric(text, "ordercancel_outbox_lag_events", subscriber=name) == 0
                # (A loaded machine may add timeouts of its own: at least, not exactly.)
                flaky_5xx = metric(
                    text,
                    "ordercancel_outbox_delivery_failures",
                    subscriber="flaky",
                    reason="http_5xx",
                )
                assert flaky_5xx is not None and flaky_5xx >= 1
                slow_timeouts = metric(
                    text,
                    "ordercancel_outbox_delivery_failures",
                    subscriber="slow",
                    reason="timeout",
                )
                assert slow_timeouts is not None and slow_timeouts >= 1
                assert metric(text, "ordercancel_outbox_deliveries", subscriber="healthy") == 10

            await eventually(caught_up, timeout=30)

    for r in (healthy, flaky, slow, down):
        assert r.bad_signatures == 0
        got = r.first_receipts()
        assert got == expected  # every event, whole, in stream order
        for cid in (a, b):
            positions = [e["position"] for e in got if e["cancellation_id"] == cid]
            assert positions == sorted(positions)
    # The slow one's first request was processed after the dispatcher gave up: at least once.
    assert len(slow.accepted) >= len(expected)
    for name in ("healthy", "flaky", "slow", "down"):
        state = await OutboxStore(pool).state(name)
        assert state is not None
        assert (state.position, state.behind, state.attempts) == (10, 0, 0)


async def test_the_lag_gauges_keep_moving_while_a_subscriber_backs_off(
    pool: asyncpg.Pool,
) -> None:
    """Between two attempts at a down subscriber (here a minute apart) the oldest-undelivered
    age keeps growing and the lag counts new events: the gauges are refreshed on their own
    period, not only when an attempt is made, so an alert on them fires on time."""
    await two_stories(pool)
    down = Receiver()
    metrics_port = free_port()
    runtime = metrics_runtime(f"127.0.0.1:{metrics_port}")  # kept: it serves the endpoint
    metrics = DispatchMetrics.for_runtime(runtime)
    store = OutboxStore(pool)

    async def gauges() -> tuple[float | None, float | None, float | None]:
        text = await asyncio.to_thread(scrape, metrics_port)
        return (
            metric(text, "ordercancel_outbox_oldest_undelivered_seconds", subscriber="down"),
            metric(text, "ordercancel_outbox_lag_events", subscriber="down"),
            metric(
                text, "ordercancel_outbox_delivery_failures", subscriber="down", reason="connect"
            ),
        )

    with receivers(down, started=False):
        async with dispatching(
            pool,
            [down.subscriber("down")],
            metrics,
            retry_initial=timedelta(minutes=1),
            retry_max=timedelta(minutes=1),
        ):

            async def first_attempt_failed() -> float:
                oldest, lag, failures = await gauges()
                assert failures == 1 and lag == 10
                assert oldest is not None and oldest > 0
                return oldest

            first = await eventually(first_attempt_failed, timeout=30)

            async def grew() -> None:
                oldest, _, failures = await gauges()
                assert oldest is not None and oldest >= first + 1.0
                assert failures == 1  # no attempt since: the gauge moved on its own

            await eventually(grew, timeout=30)

            # New events while it waits: counted at once, not at the next attempt.
            ledger = Ledger(pool)
            cid = cancellation_id("O-1001", "S-7")
            await ledger.open_cancellation(cancellation_id=cid, request=request("O-1001", "S-7"))

            async def counted() -> None:
                _, lag, failures = await gauges()
                assert lag == 12 and failures == 1  # requested, approved (instant)

            await eventually(counted, timeout=30)
            state = await store.state("down")
            assert state is not None and (state.position, state.attempts) == (0, 1)
    assert down.requests == 0


def test_the_retry_backoff_is_capped_at_30s_by_default() -> None:
    assert Settings().dispatch_retry_max == timedelta(seconds=30)
    dispatcher = Dispatcher(None, [])  # type: ignore[arg-type]
    delays = [dispatcher.retry_delay(n) for n in range(1, 40)]
    assert 0.8 <= delays[0] <= 1.0  # ORDERCANCEL_DISPATCH_RETRY_INITIAL, less the jitter
    assert all(24.0 <= d <= 30.0 for d in delays[5:])  # 32 s and more: capped (with jitter)
    assert max(delays) <= 30.0


async def test_a_subscriber_back_after_long_backoff_gets_its_events_within_the_cap(
    pool: asyncpg.Pool,
) -> None:
    """Down long enough for the doubling backoff to pass its cap (ten failures: uncapped, the
    next wait would be 51 s), then back: the next attempt comes within the cap (1 s here)."""
    await two_stories(pool)
    down = Receiver()
    store = OutboxStore(pool)
    with receivers(down, started=False):
        async with dispatching(
            pool,
            [down.subscriber("down")],
            DispatchMetrics(),
            retry_initial=timedelta(seconds=0.1),
            retry_max=timedelta(seconds=1),
        ):

            async def long_down() -> None:
                state = await store.state("down")
                assert state is not None and state.attempts >= 10

            await eventually(long_down, timeout=60)
            down.start()

            async def resumed() -> None:
                state = await store.state("down")
                assert state is not None and state.position == 10

            # Within the cap and the ten deliveries, with room for a loaded machine; an
            # uncapped backoff (51 s and more) would not make it.
            await eventually(resumed, timeout=15)
    assert [e["position"] for e in down.first_receipts()] == list(range(1, 11))


async def test_replay_sends_again_from_a_position(pool: asyncpg.Pool, database_url: str) -> None:
    await two_stories(pool)
    receiver = Receiver()
    with receivers(receiver):
        async with dispatching(pool, [receiver.subscriber("notify")], DispatchMetrics()):

            async def all_ten() -> None:
                assert len(receiver.accepted) == 10

            await eventually(all_ten)
            ran = await run_command(
                ORDERCANCEL,
                "events",
                "replay",
                "--subscriber",
                "notify",
                "--from",
                "7",
                env={"DATABASE_URL": database_url},
            )
            assert ran.returncode == 0, ran.stderr
            assert "position 10 -> 6" in ran.stdout

            async def replayed() -> None:
                assert [e["position"] for e in receiver.accepted] == [*range(1, 11), 7, 8, 9, 10]

            await eventually(replayed)
        ran = await run_command(
            ORDERCANCEL,
            "events",
            "replay",
            "--subscriber",
            "nobody",
            "--from",
            "1",
            env={"DATABASE_URL": database_url},
        )
        assert ran.returncode == 1 and "no subscriber 'nobody'" in ran.stderr


async def test_a_replay_past_a_refused_event_takes_effect_while_the_dispatcher_retries(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """The runbook's skip: a subscriber refuses event 5 for good; `events replay --from 6`
    while the dispatcher is backing off on it moves the subscriber past it within seconds,
    without a restart, and event 5 is not sent again."""
    await two_stories(pool)
    refusing = Receiver(refuse=5)
    with receivers(refusing):
        async with dispatching(
            pool,
            [refusing.subscriber("notify")],
            DispatchMetrics(),
            retry_initial=timedelta(seconds=20),
            retry_max=timedelta(seconds=30),
        ):

            async def stuck_on_five() -> None:
                assert refusing.refused >= 1
                assert [e["position"] for e in refusing.accepted] == [1, 2, 3, 4]

            await eventually(stuck_on_five)
            ran = await run_command(
                ORDERCANCEL,
                "events",
                "replay",
                "--subscriber",
                "notify",
                "--from",
                "6",
                env={"DATABASE_URL": database_url},
            )
            assert ran.returncode == 0, ran.stderr
            refused_before = refusing.refused

            async def skipped() -> None:
                assert [e["position"] for e in refusing.accepted] == [1, 2, 3, 4, 6, 7, 8, 9, 10]

            # Well within the 20 s the dispatcher would otherwise wait before its next try.
            await eventually(skipped, timeout=8)
            assert refusing.refused == refused_before


async def test_a_type_filter_skips_other_types_and_tail_shows_the_stream(
    pool: asyncpg.Pool, database_url: str
) -> None:
    a, _ = await two_stories(pool)
    receiver = Receiver()
    sub = Subscriber(
        name="sellers",
        url=receiver.url,
        secret=SECRET,  # type: ignore[arg-type]
        types=frozenset({"cancellation.requested"}),
    )
    with receivers(receiver):
        async with dispatching(pool, [sub], DispatchMetrics()):

            async def done() -> None:
                state = await OutboxStore(pool).state("sellers")
                assert state is not None and state.position == 10

            await eventually(done)
    assert [e["type"] for e in receiver.accepted] == ["cancellation.requested"] * 2

    ran = await run_command(
        ORDERCANCEL,
        "events",
        "tail",
        "--cancellation",
        a,
        "--json",
        env={"DATABASE_URL": database_url},
    )
    assert ran.returncode == 0, ran.stderr
    lines = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [e["type"] for e in lines] == [
        "cancellation.requested",
        "cancellation.approved",
        "refund.stage_changed",
        "refund.stage_changed",
        "refund.stage_changed",
    ]
    ran = await run_command(
        ORDERCANCEL,
        "events",
        "tail",
        "--type",
        "refund.done",
        env={"DATABASE_URL": database_url},
    )
    assert ran.returncode == 2 and "unknown event type" in ran.stderr


# --- make run: the dispatcher and the demo subscriber ------------------------------------------


async def test_the_dev_stack_prints_what_seller_and_buyer_are_told(pool: asyncpg.Pool) -> None:
    ledger = await load_demo(pool)
    old = cancellation_id("O-1003", "S-8")
    await ledger.open_cancellation(cancellation_id=old, request=request("O-1003", "S-8"))
    out = io.StringIO()
    console = Console(file=out, width=300)
    settings = Settings(dispatch_poll_interval=timedelta(seconds=0.05))
    events = await start_dev_events(settings, pool, console=console)
    try:
        cid = cancellation_id("O-1002", "S-7")
        await ledger.open_cancellation(cancellation_id=cid, request=request("O-1002", "S-7"))
        await approve(ledger, cid)

        async def printed() -> None:
            text = out.getvalue()
            assert f"cancellation.requested {cid} (signature ok) -> seller S-7:" in text
            assert f"cancellation.approved {cid} (signature ok) -> buyer B-502:" in text

        await eventually(printed)
        # What was there before this start is not shown again.
        assert old not in out.getvalue()
        # A request that is not signed with the demo subscriber's secret is refused.
        body = b'{"id": "evt_forged"}'
        async with httpx.AsyncClient() as http:
            forged = await http.post(
                events.subscriber.url,
                content=body,
                headers=signed_headers("not-the-secret-0123456789", body),
            )
        assert forged.status_code == 401
        assert "evt_forged" not in [e["id"] for e in events.subscriber.received]
    finally:
        await events.stop()


def test_the_receivers_example_in_the_docs_verifies_our_signature() -> None:
    """docs/events.md's verification snippet, run as written, against what we send."""
    text = (Path(__file__).parents[1] / "docs" / "events.md").read_text()
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)
    body = b'{"id":"evt_1","type":"cancellation.requested"}'
    headers = signed_headers(SECRET, body)
    check = namespace["verify"]
    assert check(SECRET, body, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER])
    assert not check(SECRET, body + b"x", headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER])
    assert not check("x" * 20, body, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER])


async def test_the_dispatch_command_resumes_after_a_crash_and_refuses_bad_config(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """`ordercancel dispatch` as a process: killed (SIGKILL) while a subscriber is failing, then
    started again, it resumes from the stored position; nothing is lost. SIGTERM stops it."""
    await two_stories(pool)
    receiver = Receiver(fail=2)
    config = json.dumps([{"name": "notify", "url": receiver.url, "secret": SECRET}])
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ORDERCANCEL_SUBSCRIBERS": config,
        "ORDERCANCEL_DISPATCH_POLL_INTERVAL": "100ms",
        "ORDERCANCEL_DISPATCH_RETRY_INITIAL": "100ms",
        "ORDERCANCEL_DISPATCH_RETRY_MAX": "200ms",
        "ORDERCANCEL_DISPATCH_METRICS_PORT": str(free_port()),
    }

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            ORDERCANCEL,
            "dispatch",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    store = OutboxStore(pool)
    with receivers(receiver):
        first = await start()

        async def failing() -> None:
            state = await store.state("notify")
            assert state is not None and state.attempts >= 1

        await eventually(failing, timeout=60)
        first.kill()
        await first.wait()
        state = await store.state("notify")
        assert state is not None and state.position == 0

        second = await start()
        try:

            async def caught_up() -> None:
                current = await store.state("notify")
                assert current is not None and current.position == 10

            await eventually(caught_up, timeout=60)
        finally:
            second.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(second.wait(), 30) == 0
    assert [e["position"] for e in receiver.first_receipts()] == list(range(1, 11))

    ran = await run_command(
        ORDERCANCEL,
        "dispatch",
        env={**env, "ORDERCANCEL_SUBSCRIBERS": '[{"name": "x", "url": "nope"}]'},
    )
    assert ran.returncode == 1
    assert "ORDERCANCEL_SUBSCRIBERS: 0.url" in ran.stderr and "0.secret" in ran.stderr


async def test_tail_follow_prints_new_events_as_they_commit(
    pool: asyncpg.Pool, database_url: str
) -> None:
    ledger = await load_demo(pool)
    first = cancellation_id("O-1002", "S-7")
    later = cancellation_id("O-1003", "S-8")
    await ledger.open_cancellation(cancellation_id=first, request=request("O-1002", "S-7"))
    await ledger.open_cancellation(cancellation_id=later, request=request("O-1003", "S-8"))
    await approve(ledger, first)
    proc = await asyncio.create_subprocess_exec(
        ORDERCANCEL,
        "events",
        "tail",
        "--follow",
        "--json",
        "--type",
        "cancellation.approved",
        env={
            **os.environ,
            "DATABASE_URL": database_url,
            "ORDERCANCEL_DISPATCH_POLL_INTERVAL": "100ms",
        },
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        # The one already there first (the tail is running), then one committed afterwards.
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert json.loads(line)["cancellation_id"] == first
        await approve(ledger, later)
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        event = json.loads(line)
        assert (event["type"], event["cancellation_id"]) == ("cancellation.approved", later)
    finally:
        proc.terminate()
        await proc.wait()


async def test_tail_and_replay_say_when_there_is_nothing(
    pool: asyncpg.Pool, database_url: str
) -> None:
    await two_stories(pool)
    env = {"DATABASE_URL": database_url}
    ran = await run_command(ORDERCANCEL, "events", "tail", "--cancellation", "nope", env=env)
    assert ran.returncode == 2 and "'nope' is not a cancellation id" in ran.stderr
    assert ran.stdout == ""
    unknown = cancellation_id("O-404", "S-4")
    ran = await run_command(
        ORDERCANCEL, "events", "tail", "--cancellation", unknown, "--json", env=env
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == ""  # stdout stays JSON lines only
    assert f"no events for {unknown}" in ran.stderr
    ran = await run_command(ORDERCANCEL, "events", "tail", "--last", "0", env=env)
    assert ran.returncode == 0, ran.stderr
    assert "no events" in ran.stderr and "--follow" in ran.stderr

    await OutboxStore(pool).ensure_subscriber("notify")
    ran = await run_command(
        ORDERCANCEL, "events", "replay", "--subscriber", "notify", "--from", "11", env=env
    )
    assert ran.returncode == 0, ran.stderr
    assert "position 0 -> 10; nothing to send again: 10 is the last event" in ran.stdout
    assert "11..10" not in ran.stdout
    ran = await run_command(
        ORDERCANCEL, "events", "replay", "--subscriber", "notify", "--from", "12", env=env
    )
    assert ran.returncode == 1 and "past the end of the stream (10)" in ran.stderr
    state = await OutboxStore(pool).state("notify")
    assert state is not None and state.position == 10
