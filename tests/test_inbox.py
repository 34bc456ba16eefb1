"""Issue 17 (R17, R18): the seller's inbox and the list of cancellations, the buyer's order view,
and messages on a request.

The list and its pages on the real PostgreSQL (the ledger alone: `ledger.inbox`); the rest
through the API over a real Temporal dev server, a real PostgreSQL and the product's worker
(`helpers.stacks.api_stack`), and messages also as a raw Temporal update, as any client with
access to Temporal could send them (issue 18: Temporal is not a side door).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from helpers.orders import (
    fast_refund_settings,
    one_seller_order,
    order_document,
    orders_file,
    unique,
)
from helpers.stacks import ApiStack, api_stack, run_command
from helpers.wait import eventually
from hypothesis import given, settings
from hypothesis import strategies as st
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from domain.models import CancellationReason, CancellationStatus, RequestCancellationInput
from domain.rules import MESSAGE_TEXT_MAX, MESSAGES_MAX
from domain.rules import cancellation_id as workflow_id_of
from ledger.inbox import InvalidCursor, decode_cursor, encode_cursor, list_cancellations
from ledger.orders import load_orders, parse_orders_file
from ledger.repository import Ledger
from workflows.visibility import escape_markdown

SELLER_A, SELLER_B = "S-61", "S-62"
ORDERCANCEL = str(Path(sys.executable).parent / "ordercancel")
PRINCIPALS = (
    "buyer-service",
    f"seller:{SELLER_A}",
    f"seller:{SELLER_B}",
    "sre",
    "payment-provider",
    "order-system",
)


# --- the list on the ledger: order and pages -----------------------------------------------------


async def open_in_ledger(
    pool: asyncpg.Pool, *, seller: str, buyer: str, validated: bool, window: timedelta
) -> str:
    """A cancellation opened in the ledger alone (as the workflow's first activity does):
    validated, a request awaiting its seller with `window` to answer; else instant."""
    order_id = unique("INB")
    order = one_seller_order(order_id, buyer_id=buyer, seller_id=seller, validated=validated)
    await load_orders(pool, parse_orders_file(orders_file(order)))
    cancellation_id = workflow_id_of(order_id, seller)
    await Ledger(pool).open_cancellation(
        cancellation_id=cancellation_id,
        request=RequestCancellationInput(
            order_id=order_id,
            seller_id=seller,
            buyer_id=buyer,
            reason=CancellationReason.OUT_OF_STOCK,
        ),
        default_window=window,
    )
    return cancellation_id


async def walk(pool: asyncpg.Pool, limit: int, **filters: Any) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        page = await list_cancellations(pool, cursor=cursor, limit=limit, **filters)
        ids += [item.cancellation_id for item in page.items]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


async def test_requests_awaiting_the_seller_come_first_soonest_deadline_first(
    pool: asyncpg.Pool,
) -> None:
    buyer = unique("B")
    windows = [timedelta(hours=h) for h in (30, 2, 50, 7)]
    waiting = [
        await open_in_ledger(pool, seller=SELLER_A, buyer=buyer, validated=True, window=w)
        for w in windows
    ]
    instant = [
        await open_in_ledger(pool, seller=SELLER_A, buyer=buyer, validated=False, window=w)
        for w in windows[:2]
    ]
    by_deadline = [c for _, c in sorted(zip(windows, waiting, strict=True))]
    # Then the others (here: instant, approved at once), oldest first.
    assert await walk(pool, 100, buyer_id=buyer) == by_deadline + instant
    assert await walk(pool, 1, buyer_id=buyer) == by_deadline + instant
    page = await list_cancellations(pool, buyer_id=buyer, limit=10)
    deadlines = [item.seller_deadline for item in page.items[:4]]
    assert all(d is not None for d in deadlines) and deadlines == sorted(deadlines)  # type: ignore[type-var]
    # A request that stops waiting (decided) joins the others.
    await pool.execute(
        "UPDATE cancellations SET status = 'rejected' WHERE cancellation_id = $1", by_deadline[0]
    )
    assert (await walk(pool, 2, buyer_id=buyer))[:3] == by_deadline[1:]


async def test_pages_are_stable_while_new_cancellations_arrive(pool: asyncpg.Pool) -> None:
    """Keyset pages: new cancellations arriving between two pages (waiting ones with deadlines
    sooner and later than the cursor, instant ones) cause no duplicate and no gap among the
    rows that were there."""
    buyer = unique("B")
    hours = [5, 40, 12, 1, 70, 25, 3, 9]
    existing = []
    for n, h in enumerate(hours):
        existing.append(
            await open_in_ledger(
                pool, seller=SELLER_A, buyer=buyer, validated=n % 3 != 2, window=timedelta(hours=h)
            )
        )
    seen: list[str] = []
    arrived: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await list_cancellations(pool, buyer_id=buyer, cursor=cursor, limit=3)
        seen += [item.cancellation_id for item in page.items]
        pages += 1
        # Between two pages: one due sooner than anything, one later, one instant.
        for window, validated in ((timedelta(minutes=1), True), (timedelta(hours=99), True)):
            arrived.append(
                await open_in_ledger(
                    pool, seller=SELLER_A, buyer=buyer, validated=validated, window=window
                )
            )
        arrived.append(
            await open_in_ledger(
                pool, seller=SELLER_A, buyer=buyer, validated=False, window=timedelta(hours=1)
            )
        )
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages >= 3
    assert len(seen) == len(set(seen)), "a row was listed twice"
    assert set(existing) <= set(seen), f"rows missed: {set(existing) - set(seen)}"
    assert set(seen) <= set(existing) | set(arrived)


async def test_a_cursor_not_handed_out_is_refused(pool: asyncpg.Pool) -> None:
    naive = encode_cursor(0, datetime(2026, 1, 1), "cancel-O~S")  # no time zone: not ours
    at = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
    forged = [
        base64.urlsafe_b64encode(json.dumps(parts).encode()).decode()
        for parts in ([True, at, "cancel-O~S"], [0.0, at, "cancel-O~S"], [0, at, "x\u0000"])
    ]
    for bad in ("", "x", "bm90IGpzb24", naive, *forged):
        with pytest.raises(InvalidCursor):
            decode_cursor(bad)
        with pytest.raises(InvalidCursor):
            await list_cancellations(pool, cursor=bad)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=150).map(base64.urlsafe_b64encode)))
def test_any_text_is_a_cursor_or_refused_never_a_crash(text: str | bytes) -> None:
    cursor = text.decode() if isinstance(text, bytes) else text
    try:
        rank, at, cancellation_id = decode_cursor(cursor)
    except InvalidCursor:
        return
    assert encode_cursor(rank, at, cancellation_id)  # a well-formed key: it round-trips
    assert decode_cursor(encode_cursor(rank, at, cancellation_id)) == (rank, at, cancellation_id)


# --- through the API -----------------------------------------------------------------------------


@dataclass
class Api:
    stack: ApiStack
    # What `ordercancel` needs to reach the same servers and worker.
    cli_env: dict[str, str]

    async def call(
        self, method: str, path: str, principal: str, *, json: Any = None, **params: Any
    ) -> httpx.Response:
        return await self.stack.http.request(
            method,
            path,
            json=json,
            params={k: v for k, v in params.items() if v is not None},
            headers={"Authorization": f"Bearer {self.stack.keys[principal]}"},
        )

    async def view(self, cancellation_id: str, principal: str = "sre") -> dict[str, Any]:
        response = await self.call("GET", f"/v1/cancellations/{cancellation_id}", principal)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def order(self, sellers: tuple[str, ...], buyer: str, **kw: Any) -> str:
        order_id = unique("INA")
        order = order_document(order_id, buyer_id=buyer, sellers=sellers, **kw)
        await load_orders(self.stack.pool, parse_orders_file(orders_file(order)))
        return order_id

    async def request(self, order_id: str, seller: str, buyer: str) -> str:
        body = {"order_id": order_id, "seller_id": seller, "buyer_id": buyer, "reason": "other"}
        response = await self.call("POST", "/v1/cancellations", "buyer-service", json=body)
        assert response.status_code in (200, 202), response.text
        cancellation_id: str = response.json()["cancellation_id"]
        return cancellation_id

    async def pending(self, seller: str = SELLER_A, buyer: str | None = None) -> tuple[str, str]:
        buyer = buyer or unique("B")
        cancellation_id = await self.request(await self.order((seller,), buyer), seller, buyer)
        assert (await self.view(cancellation_id))["status"] == "awaiting_seller"
        return cancellation_id, buyer

    async def message(self, cancellation_id: str, principal: str, text: str) -> httpx.Response:
        return await self.call(
            "POST", f"/v1/cancellations/{cancellation_id}/messages", principal, json={"text": text}
        )


@pytest.fixture(scope="module")
async def api(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Api]:
    settings = fast_refund_settings(
        task_queue=f"inbox-{uuid.uuid4().hex[:8]}", api_instant_wait=timedelta(seconds=10)
    )
    async with api_stack(
        temporal_address,
        e2e_database_url,
        settings,
        principals=PRINCIPALS,
        webhook_secret="whsec_test_" + "i" * 32,
    ) as stack:
        env = {
            "TEMPORAL_ADDRESS": temporal_address,
            "DATABASE_URL": e2e_database_url,
            "ORDERCANCEL_TASK_QUEUE": settings.task_queue,
        }
        yield Api(stack, env)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code, response.text


async def listed(
    api: Api, principal: str, limit: int = 200, **filters: Any
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        response = await api.call(
            "GET", "/v1/cancellations", principal, cursor=cursor, limit=limit, **filters
        )
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["items"]
        if body["next_cursor"] is None:
            return items
        cursor = body["next_cursor"]


@pytest.mark.e2e
async def test_a_seller_never_sees_another_sellers_row_by_any_filter(api: Api) -> None:
    buyers = (unique("B"), unique("B"))
    # Each buyer: one order with both sellers (one request each), and one of seller A alone.
    mine, theirs = set(), set()
    orders = []
    for buyer in buyers:
        order_id = await api.order((SELLER_A, SELLER_B), buyer)
        orders.append(order_id)
        mine.add(await api.request(order_id, SELLER_A, buyer))
        theirs.add(await api.request(order_id, SELLER_B, buyer))
        mine.add((await api.pending(SELLER_A, buyer))[0])
    # Every combination of filters, with values of both sellers, both buyers, both orders.
    sellers = (None, SELLER_A, SELLER_B, "S-none")
    buyer_values = (None, *buyers)
    order_values = (None, *orders)
    statuses = (None, "awaiting_seller", "completed")
    for seller, buyer_f, order_f, status in itertools.product(
        sellers, buyer_values, order_values, statuses
    ):
        filters: dict[str, Any] = {
            "seller_id": seller,
            "buyer_id": buyer_f,
            "order_id": order_f,
            "status": status,
        }
        as_seller = await listed(api, f"seller:{SELLER_A}", **filters)
        assert all(item["seller_id"] == SELLER_A for item in as_seller), (filters, as_seller)
        assert not {item["cancellation_id"] for item in as_seller} & theirs
        # Its own rows are all there: what an operator sees of seller A with those filters.
        if seller in (None, SELLER_A) and (buyer_f is not None or order_f is not None):
            as_sre = await listed(api, "sre", **{**filters, "seller_id": SELLER_A})
            assert as_seller == as_sre, filters
    # Unfiltered, page by page: only its own, each once.
    pages = await listed(api, f"seller:{SELLER_A}", limit=1, buyer_id=buyers[0])
    assert [i["seller_id"] for i in pages] == [SELLER_A, SELLER_A]
    everything = {
        i["cancellation_id"] for b in buyers for i in await listed(api, "sre", buyer_id=b)
    }
    assert everything == mine | theirs
    service = {
        i["cancellation_id"] for b in buyers for i in await listed(api, "buyer-service", buyer_id=b)
    }
    assert service == mine | theirs


@pytest.mark.e2e
async def test_the_inbox_puts_the_soonest_deadline_first(api: Api) -> None:
    buyer = unique("B")
    ids = [(await api.pending(SELLER_B, buyer))[0] for _ in range(3)]
    # An instant one (ended at once) comes after the waiting ones.
    instant_order = await api.order((SELLER_B,), buyer, validated=False)
    instant = await api.request(instant_order, SELLER_B, buyer)
    items = await listed(api, f"seller:{SELLER_B}", limit=2, buyer_id=buyer)
    assert [i["cancellation_id"] for i in items] == [*ids, instant]
    deadlines = [i["seller_deadline"] for i in items[:3]]
    assert deadlines == sorted(deadlines)
    waiting = await listed(api, f"seller:{SELLER_B}", buyer_id=buyer, status="awaiting_seller")
    assert [i["cancellation_id"] for i in waiting] == ids


@pytest.mark.e2e
async def test_bad_list_parameters_are_400_with_a_code(api: Api) -> None:
    for limit in ("0", "201", "-1", "ten", "1.5", "", "٣", "9" * 5000):
        problem(
            await api.call("GET", "/v1/cancellations", "sre", limit=limit), 400, "invalid_limit"
        )
    for cursor in ("garbage", "e30", "W10"):
        problem(
            await api.call("GET", "/v1/cancellations", "sre", cursor=cursor), 400, "invalid_cursor"
        )
    problem(await api.call("GET", "/v1/cancellations", "sre", status="lost"), 400, "invalid_status")
    problem(
        await api.call("GET", "/v1/cancellations", "sre", seller_id="S 1"), 400, "invalid_filter"
    )
    problem(await api.call("GET", "/v1/cancellations", "payment-provider"), 403, "forbidden")
    default = await api.call("GET", "/v1/cancellations", "sre")
    assert default.status_code == 200 and len(default.json()["items"]) <= 50


# --- the buyer's order view, and the single view after the end -----------------------------------


@pytest.mark.e2e
async def test_the_order_view_shows_every_sub_order_and_a_siblings_restore(api: Api) -> None:
    """Three sellers, one coupon paying for all three: A is cancelled first (the coupon is not
    back yet: partial_refund), then B and C; the last one gives it back, and the order view
    shows it restored on A too. Each cancelled sub-order has its three dots, each
    with when it happened, and the ETA; a sub-order not cancelled has no cancellation."""
    buyer = unique("B")
    sellers = (SELLER_A, SELLER_B, "S-63")
    order_id = await api.order(sellers, buyer, validated=False, coupon=True)
    first = await api.request(order_id, SELLER_A, buyer)
    before = await api.view(first)
    assert before["coupon"]["outcome"] == "partial_refund"
    (row,) = await listed(api, "sre", order_id=order_id)
    assert row["updated_at"] == before["updated_at"]
    order = await api.call("GET", f"/v1/orders/{order_id}/cancellations", "buyer-service")
    assert order.status_code == 200, order.text
    subs = {s["seller_id"]: s for s in order.json()["sub_orders"]}
    assert subs[SELLER_B]["cancellation"] is None and subs["S-63"]["cancellation"] is None
    assert subs[SELLER_A]["cancellation"]["coupon"]["outcome"] == "partial_refund"
    for seller in sellers[1:]:
        await api.request(order_id, seller, buyer)

    async def restored() -> dict[str, Any]:
        response = await api.call("GET", f"/v1/orders/{order_id}/cancellations", "buyer-service")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        for sub in body["sub_orders"]:
            assert sub["cancellation"]["coupon"]["outcome"] == "restored", sub
        return body

    body = await eventually(restored)
    assert body["order_id"] == order_id and body["buyer_id"] == buyer
    assert [s["seller_id"] for s in body["sub_orders"]] == sorted(sellers)
    for sub in body["sub_orders"]:
        assert sub["status"] == "cancelled"
        cancellation = sub["cancellation"]
        assert cancellation["status"] == "completed"
        dots = cancellation["dots"]
        assert [d["done"] for d in dots] == [True, True, True]
        times = [d["at"] for d in dots]
        assert all(times) and times == sorted(times), dots
        # The money is back: no ETA any more (the refund keeps the estimate it was given).
        assert cancellation["eta"] is None and dots[2]["eta"] is None
        assert cancellation["refund"]["eta"] is not None
        assert at(cancellation["updated_at"]) >= at(times[2])
    a = next(s for s in body["sub_orders"] if s["seller_id"] == SELLER_A)
    assert "given back when" in a["cancellation"]["coupon"]["reason"]
    # A's coupon changed after A ended (a sibling restored it): A's `updated_at` says so, in
    # the order view, the single view and the list alike.
    after = await api.view(first)
    assert at(after["updated_at"]) > at(before["updated_at"])
    restored_at = await api.stack.pool.fetchval(
        "SELECT r.restored_at FROM coupon_redemptions r JOIN coupon_decisions d"
        " USING (redemption_id) WHERE d.cancellation_id = $1",
        first,
    )
    assert datetime.fromisoformat(after["updated_at"]) == restored_at
    assert a["cancellation"]["updated_at"] == after["updated_at"]
    rows = {r["cancellation_id"]: r for r in await listed(api, "sre", order_id=order_id)}
    assert rows[first]["updated_at"] == after["updated_at"]
    # A seller reads its own sub-order only; an unknown order is 404.
    as_seller = await api.call("GET", f"/v1/orders/{order_id}/cancellations", f"seller:{SELLER_B}")
    assert [s["seller_id"] for s in as_seller.json()["sub_orders"]] == [SELLER_B]
    problem(
        await api.call("GET", "/v1/orders/NOPE-1/cancellations", "buyer-service"),
        404,
        "order_not_found",
    )


@pytest.mark.e2e
async def test_the_view_keeps_the_dots_times_and_the_deadline_once_ended(api: Api) -> None:
    cancellation_id, _ = await api.pending(SELLER_A)
    deadline = (await api.view(cancellation_id))["seller_deadline"]
    decided = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/seller-decision",
        f"seller:{SELLER_A}",
        json={"seller_id": SELLER_A, "decision": "accept"},
    )
    assert decided.status_code == 200, decided.text

    async def ended() -> dict[str, Any]:
        view = await api.view(cancellation_id)
        assert (view["status"], view["running"]) == ("completed", False), view["status"]
        return view

    view = await eventually(ended)
    assert view["source"] == "ledger"
    # The deadline the ledger recorded when the request opened (the running workflow shows
    # its own clock's, within moments of it).
    recorded = await api.stack.pool.fetchval(
        "SELECT seller_deadline FROM cancellations WHERE cancellation_id = $1", cancellation_id
    )
    assert datetime.fromisoformat(view["seller_deadline"]) == recorded
    shown = datetime.fromisoformat(deadline)
    assert abs(shown - recorded) < timedelta(seconds=5)
    times = [d["at"] for d in view["dots"]]
    assert all(times) and times == sorted(times), view["dots"]


# --- messages (R18) ------------------------------------------------------------------------------


def kinds(view: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in view["audit"]]


@pytest.mark.e2e
async def test_buyer_and_seller_write_on_a_waiting_request(api: Api) -> None:
    cancellation_id, buyer = await api.pending(SELLER_A)
    asked = await api.message(cancellation_id, "buyer-service", "  It came broken, sorry!  ")
    assert asked.status_code == 200, asked.text
    receipt = asked.json()
    assert (receipt["author"], receipt["text"]) == (f"buyer:{buyer}", "It came broken, sorry!")
    assert (receipt["messages"], receipt["messages_left"]) == (1, MESSAGES_MAX - 1)
    answered = await api.message(cancellation_id, f"seller:{SELLER_A}", "**Looking** into it")
    assert answered.status_code == 200, answered.text
    view = await api.view(cancellation_id, "buyer-service")
    assert [(m["author"], m["text"]) for m in view["messages"]] == [
        (f"buyer:{buyer}", "It came broken, sorry!"),
        (f"seller:{SELLER_A}", "**Looking** into it"),
    ]
    messages = [e for e in view["audit"] if e["kind"] == "message"]
    assert [e["actor"] for e in messages] == [f"buyer:{buyer}", f"seller:{SELLER_A}"]
    # In the ledger's audit trail (R12), each once.
    rows = await api.stack.pool.fetch(
        "SELECT actor, detail FROM cancellation_events WHERE cancellation_id = $1"
        " AND kind = 'message' ORDER BY event_id",
        cancellation_id,
    )
    assert [tuple(r) for r in rows] == [
        (f"buyer:{buyer}", "It came broken, sorry!"),
        (f"seller:{SELLER_A}", "**Looking** into it"),
    ]
    # One time for one message: the receipt's is the ledger's, as the view and audit show it.
    recorded = await api.stack.pool.fetch(
        "SELECT at FROM cancellation_events WHERE cancellation_id = $1 AND kind = 'message'"
        " ORDER BY event_id",
        cancellation_id,
    )
    assert at(receipt["at"]) == recorded[0]["at"] == at(view["messages"][0]["at"])
    assert at(answered.json()["at"]) == recorded[1]["at"] == at(messages[1]["at"])
    # The latest one in the Web UI's current details, as text.
    handle = api.stack.client.get_workflow_handle(cancellation_id)
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    latest = metadata.current_details.split("\n\n")[-1]
    assert latest.startswith(f"Latest message: {escape_markdown(f'seller:{SELLER_A}')} at ")
    assert latest.endswith(": " + escape_markdown("**Looking** into it"))


@pytest.mark.e2e
async def test_a_message_over_the_bounds_is_refused_and_changes_nothing(api: Api) -> None:
    cancellation_id, _ = await api.pending(SELLER_A)
    handle = api.stack.client.get_workflow_handle(cancellation_id)
    problem(
        await api.message(cancellation_id, "buyer-service", "x" * (MESSAGE_TEXT_MAX + 1)),
        422,
        "message_too_long",
    )
    problem(
        await api.message(cancellation_id, "buyer-service", "bad \x1b[31m"), 422, "invalid_payload"
    )
    problem(await api.message(cancellation_id, "buyer-service", ""), 422, "invalid_payload")
    # The author is the key's: a body naming one is refused.
    forged = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/messages",
        f"seller:{SELLER_A}",
        json={"text": "hi", "author_id": SELLER_B},
    )
    problem(forged, 422, "invalid_payload")
    # Another seller's request looks like none; an operator or the provider may not write.
    problem(await api.message(cancellation_id, f"seller:{SELLER_B}", "hi"), 404, "not_found")
    problem(await api.message(cancellation_id, "sre", "hi"), 403, "forbidden")
    assert (await api.view(cancellation_id))["messages"] == []
    length = (await handle.describe()).raw_description.workflow_execution_info.history_length
    # Up to the count, then refused.
    ok = await asyncio.gather(
        *(
            api.message(
                cancellation_id, "buyer-service" if n % 2 else f"seller:{SELLER_A}", f"#{n}"
            )
            for n in range(MESSAGES_MAX)
        )
    )
    assert [r.status_code for r in ok] == [200] * MESSAGES_MAX, [r.text for r in ok]
    over = await api.message(cancellation_id, "buyer-service", "one more")
    problem(over, 409, "too_many_messages")
    view = await api.view(cancellation_id)
    assert len(view["messages"]) == MESSAGES_MAX
    assert "one more" not in [m["text"] for m in view["messages"]]
    assert view["status"] == "awaiting_seller"
    assert (await handle.describe()).raw_description.workflow_execution_info.history_length > length


@pytest.mark.e2e
async def test_messages_are_refused_once_the_seller_has_answered(api: Api) -> None:
    cancellation_id, _ = await api.pending(SELLER_A)
    decided = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/seller-decision",
        f"seller:{SELLER_A}",
        json={"seller_id": SELLER_A, "decision": "reject", "reason": "already shipped"},
    )
    assert decided.status_code == 200, decided.text
    for principal in ("buyer-service", f"seller:{SELLER_A}"):
        problem(await api.message(cancellation_id, principal, "but why?"), 409, "already_decided")

    async def ended() -> dict[str, Any]:
        view = await api.view(cancellation_id)
        assert (view["status"], view["running"]) == ("rejected", False)
        return view

    await eventually(ended)
    # The same code once the workflow has ended.
    for principal in ("buyer-service", f"seller:{SELLER_A}"):
        problem(await api.message(cancellation_id, principal, "but why?"), 409, "already_decided")
    assert "message" not in kinds(await api.view(cancellation_id))


@pytest.mark.e2e
async def test_a_withdrawn_request_refuses_messages_as_already_decided(api: Api) -> None:
    cancellation_id, buyer = await api.pending(SELLER_A)
    withdrawn = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/withdraw",
        "buyer-service",
        json={"buyer_id": buyer},
    )
    assert withdrawn.status_code in (200, 202), withdrawn.text

    async def ended() -> None:
        view = await api.view(cancellation_id)
        assert (view["status"], view["running"]) == ("withdrawn", False)

    await eventually(ended)
    for principal in ("buyer-service", f"seller:{SELLER_A}"):
        problem(await api.message(cancellation_id, principal, "hello?"), 409, "already_decided")
    assert "message" not in kinds(await api.view(cancellation_id))


@pytest.mark.e2e
async def test_a_message_too_long_is_message_too_long_however_long(api: Api) -> None:
    cancellation_id, _ = await api.pending(SELLER_A)
    for n in (MESSAGE_TEXT_MAX + 1, 2000, 2001, 10_000):
        problem(
            await api.message(cancellation_id, "buyer-service", "x" * n), 422, "message_too_long"
        )
    # Measured once trimmed, as the workflow measures it (600 spaces around it: taken).
    padded = await api.message(cancellation_id, "buyer-service", " " * 300 + "ok" + " " * 300)
    assert padded.status_code == 200, padded.text
    # The CLI says the same code, on one line, exit 1 (no validation dump).
    cli = await run_command(
        ORDERCANCEL, "message", cancellation_id, "y" * 3000, "--as", "buyer", env=api.cli_env
    )
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "error: message_too_long: " in cli.stderr, cli.stderr
    assert "validation error" not in cli.stderr + cli.stdout
    assert [m["text"] for m in (await api.view(cancellation_id))["messages"]] == ["ok"]


async def raw_message(api: Api, cancellation_id: str, payload: Any) -> Any:
    handle = api.stack.client.get_workflow_handle(cancellation_id)
    return await handle.execute_update("message", payload)


async def refused_code(api: Api, cancellation_id: str, payload: Any) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as raised:
        await raw_message(api, cancellation_id, payload)
    cause = raised.value.cause
    assert isinstance(cause, ApplicationError) and cause.type, cause
    return cause.type


@pytest.mark.e2e
async def test_a_raw_temporal_update_is_judged_like_the_api(api: Api) -> None:
    """Anyone with access to Temporal sends `message` directly: the validator refuses a wrong
    author, a text over the bounds or not printable, a malformed payload, and writes nothing
    of them (the history does not grow)."""
    cancellation_id, buyer = await api.pending(SELLER_A)
    handle = api.stack.client.get_workflow_handle(cancellation_id)
    length = (await handle.describe()).raw_description.workflow_execution_info.history_length
    cases = [
        ({"author": "seller", "author_id": SELLER_B, "text": "hi"}, "wrong_seller"),
        ({"author": "buyer", "author_id": "B-mallory", "text": "hi"}, "wrong_buyer"),
        ({"author": "seller", "author_id": SELLER_A, "text": "y" * 501}, "message_too_long"),
        ({"author": "seller", "author_id": SELLER_A, "text": "nul\x00"}, "invalid_payload"),
        ({"author": "operator", "author_id": "op", "text": "hi"}, "invalid_payload"),
        ({"author": "buyer", "author_id": buyer, "text": "hi", "x": 1}, "invalid_payload"),
        ("just text", "invalid_payload"),
    ]
    for payload, code in cases:
        assert await refused_code(api, cancellation_id, payload) == code, payload
    with pytest.raises(WorkflowUpdateFailedError):
        await handle.execute_update("message", args=[{}, {}])
    after = (await handle.describe()).raw_description.workflow_execution_info.history_length
    assert after == length
    assert (await api.view(cancellation_id))["messages"] == []
    # The right author is taken, as through the API.
    receipt = await raw_message(
        api, cancellation_id, {"author": "buyer", "author_id": buyer, "text": "from the SDK"}
    )
    assert receipt["author"] == f"buyer:{buyer}"
    assert [m["text"] for m in (await api.view(cancellation_id))["messages"]] == ["from the SDK"]
    # After the decision, refused too.
    decided = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/seller-decision",
        f"seller:{SELLER_A}",
        json={"seller_id": SELLER_A, "decision": "reject"},
    )
    assert decided.status_code == 200, decided.text
    late = {"author": "seller", "author_id": SELLER_A, "text": "sorry"}
    try:
        code = await refused_code(api, cancellation_id, late)
    except Exception as err:  # the workflow may have closed meanwhile: Temporal refuses then
        assert "not found" in str(err).lower() or "completed" in str(err).lower(), err
    else:
        assert code == "already_decided"
    assert (await api.view(cancellation_id))["status"] == CancellationStatus.REJECTED.value


@pytest.mark.e2e
async def test_ordercancel_message_status_and_list(api: Api) -> None:
    cancellation_id, buyer = await api.pending(SELLER_A)
    env = api.cli_env
    wrote = await run_command(
        ORDERCANCEL, "message", cancellation_id, "Any news?", "--as", "buyer", env=env
    )
    assert wrote.returncode == 0, wrote.stderr
    assert f"buyer:{buyer}" in wrote.stdout
    forged = await run_command(
        ORDERCANCEL,
        "message",
        cancellation_id,
        "hi",
        "--as",
        "seller",
        "--author-id",
        SELLER_B,
        env=env,
    )
    assert forged.returncode == 1 and "wrong_seller" in forged.stderr + forged.stdout
    status = await run_command(ORDERCANCEL, "status", cancellation_id, "--json", env=env)
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert [(m["author"], m["text"]) for m in view["messages"]] == [(f"buyer:{buyer}", "Any news?")]
    shown = await run_command(ORDERCANCEL, "status", cancellation_id, env=env)
    assert "messages" in shown.stdout and "Any news?" in shown.stdout
    listed_ = await run_command(
        ORDERCANCEL, "list", "--buyer", buyer, "--seller", SELLER_A, "--json", env=env
    )
    assert listed_.returncode == 0, listed_.stderr
    page = json.loads(listed_.stdout)
    assert [i["cancellation_id"] for i in page["items"]] == [cancellation_id]
    bad = await run_command(ORDERCANCEL, "list", "--cursor", "nope", env=env)
    assert bad.returncode != 0 and "cursor" in bad.stderr + bad.stdout


# --- what the views say (the user trial of issue 17) ---------------------------------------------


@pytest.mark.e2e
async def test_the_views_carry_the_buyers_words_and_why_it_was_rejected(api: Api) -> None:
    buyer = unique("B")
    order_id = await api.order((SELLER_A,), buyer)
    words = "Ordered the wrong size, sorry"
    body = {
        "order_id": order_id,
        "seller_id": SELLER_A,
        "buyer_id": buyer,
        "reason": "other",
        "reason_text": words,
    }
    response = await api.call("POST", "/v1/cancellations", "buyer-service", json=body)
    assert response.status_code == 202, response.text
    cancellation_id = response.json()["cancellation_id"]
    running = await api.view(cancellation_id, f"seller:{SELLER_A}")
    assert (running["source"], running["status"]) == ("workflow", "awaiting_seller")
    assert (running["reason"], running["reason_text"]) == ("other", words)
    assert running["decision_reason"] is None and running["updated_at"] is not None
    (row,) = await listed(api, f"seller:{SELLER_A}", buyer_id=buyer)
    assert (row["reason"], row["reason_text"], row["decision_reason"]) == ("other", words, None)
    why = "Already packed: it leaves today"
    decided = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/seller-decision",
        f"seller:{SELLER_A}",
        json={"seller_id": SELLER_A, "decision": "reject", "reason": why},
    )
    assert decided.status_code == 200, decided.text

    async def ended() -> dict[str, Any]:
        view = await api.view(cancellation_id, f"seller:{SELLER_A}")
        assert (view["status"], view["running"]) == ("rejected", False)
        return view

    view = await eventually(ended)
    assert (view["reason_text"], view["decision_reason"]) == (words, why)
    assert view["decided_by"] == f"seller:{SELLER_A}"
    (row,) = await listed(api, f"seller:{SELLER_A}", buyer_id=buyer)
    assert (row["status"], row["reason_text"], row["decision_reason"]) == ("rejected", words, why)
    order = await api.call("GET", f"/v1/orders/{order_id}/cancellations", "buyer-service")
    assert order.status_code == 200, order.text
    (sub,) = order.json()["sub_orders"]
    cancellation = sub["cancellation"]
    assert (cancellation["reason_text"], cancellation["decision_reason"]) == (words, why)
    assert cancellation["decided_by"] == f"seller:{SELLER_A}"
    assert sub["status"] == "accepted"


@pytest.mark.e2e
async def test_the_order_view_says_shipped_and_that_the_shipment_rejected_the_request(
    api: Api,
) -> None:
    """R14: the sub-order ships while its request waits: the order view says `shipped`, and
    the request's `decision_reason` says why it was rejected, in every view."""
    cancellation_id, _ = await api.pending(SELLER_A)
    order_id = (await api.view(cancellation_id))["order_id"]
    shipped = await api.call(
        "POST",
        f"/v1/orders/{order_id}/events",
        "order-system",
        json={
            "event_id": unique("E-ship"),
            "type": "sub_order_shipped",
            "seller_id": SELLER_A,
            "occurred_at": datetime.now(UTC).isoformat(),
        },
    )
    assert shipped.status_code == 200, shipped.text
    assert shipped.json()["outcome"] == "request_rejected"

    async def rejected() -> dict[str, Any]:
        view = await api.view(cancellation_id)
        assert view["status"] == "rejected"
        return view

    view = await eventually(rejected)
    assert (view["decision_reason"], view["decided_by"]) == ("shipped", "order-system")
    order = await api.call("GET", f"/v1/orders/{order_id}/cancellations", "buyer-service")
    assert order.status_code == 200, order.text
    (sub,) = order.json()["sub_orders"]
    assert sub["status"] == "shipped"
    assert sub["cancellation"]["decision_reason"] == "shipped"
    assert sub["cancellation"]["eta"] is None
    cash = await api.stack.pool.fetchval(
        "SELECT cash_minor FROM sub_orders WHERE order_id = $1 AND seller_id = $2",
        order_id,
        SELLER_A,
    )
    assert sub["amount"]["amount_minor"] == cash
    (row,) = await listed(api, "sre", order_id=order_id)
    assert row["decision_reason"] == "shipped"


@pytest.mark.e2e
async def test_ordercancel_list_refuses_a_malformed_filter_as_the_api_does(api: Api) -> None:
    """One check for the CLI and the API: the API's 400 `invalid_filter` is the CLI's exit 2,
    never an empty page."""
    params = {"--seller": "seller_id", "--buyer": "buyer_id", "--order": "order_id"}
    for flag, value in (
        ("--seller", "S-1 OR 1=1"),
        ("--seller", ""),
        ("--order", "O" * 80),
        ("--buyer", "B;drop"),
    ):
        cli = await run_command(ORDERCANCEL, "list", flag, value, env=api.cli_env)
        assert cli.returncode == 2, (flag, value, cli.stdout, cli.stderr)
        assert flag in cli.stderr and "cancellation(s)" not in cli.stdout
        refused = await api.call("GET", "/v1/cancellations", "sre", **{params[flag]: value})
        problem(refused, 400, "invalid_filter")
    # Without a seller or order filter, each row says its order and seller.
    cancellation_id, buyer = await api.pending(SELLER_B)
    order_id = (await api.view(cancellation_id))["order_id"]
    shown = await run_command(
        ORDERCANCEL, "list", "--buyer", buyer, env={**api.cli_env, "COLUMNS": "300"}
    )
    assert shown.returncode == 0, shown.stderr
    header, row = (
        next(line for line in shown.stdout.splitlines() if needle in line)
        for needle in ("requested", cancellation_id)
    )
    assert "order" in header and "seller" in header.replace("seller deadline", "")
    assert order_id in row.replace(cancellation_id, "") and SELLER_B in row.replace(
        cancellation_id, ""
    )


@pytest.mark.e2e
async def test_the_list_refuses_a_repeated_parameter_and_knows_no_trailing_slash(
    api: Api,
) -> None:
    headers = {"Authorization": f"Bearer {api.stack.keys['sre']}"}
    twice = await api.stack.http.get(
        "/v1/cancellations?seller_id=S-1&seller_id=S-2", headers=headers
    )
    problem(twice, 400, "invalid_filter")
    assert "given twice" in twice.json()["detail"]
    problem(
        await api.stack.http.get("/v1/cancellations?limit=5&limit=6", headers=headers),
        400,
        "invalid_limit",
    )
    slash = await api.stack.http.get("/v1/cancellations/", headers=headers)
    problem(slash, 404, "not_found")
    cursor = await api.call("GET", "/v1/cancellations", "sre", cursor="garbage")
    problem(cursor, 400, "invalid_cursor")
    assert "not a valid cursor" in cursor.json()["detail"]
    # `limit` is an integer with its bounds in the OpenAPI document.
    document = (await api.stack.http.get("/openapi.json")).json()
    parameters = document["paths"]["/v1/cancellations"]["get"]["parameters"]
    (limit,) = [p for p in parameters if p["name"] == "limit"]
    assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}
