"""R19: the seller's response window is the marketplace's policy, never the buyer's request; and
issue 20: stuck requests, listed from the ledger's deadlines, decided by an operator.

Real PostgreSQL, a real Temporal dev server, the product's worker and the API (over ASGI)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers.api import Api, request_body
from helpers.orders import one_seller_order, orders_file, unique
from helpers.stacks import api_stack
from helpers.wait import eventually
from pydantic import ValidationError
from typer.testing import CliRunner

from domain.models import WINDOW_NOT_ALLOWED, RequestCancellationInput, TimeoutPolicy
from infra.settings import Settings
from ledger.orders import load_orders, parse_orders_file
from ledger.policies import WindowBelowFloor, clear_policy, get_policy, set_policy
from ledger.repository import Ledger
from ledger.stuck import stuck_cancellations

BUYER = "B-WIN"
SECRET = "whsec_test_" + "w" * 32
FLOOR = timedelta(seconds=1)


def body(order_id: str, seller_id: str, **extra: Any) -> dict[str, Any]:
    return request_body(order_id, seller_id, BUYER, **extra)


async def new_order(pool: asyncpg.Pool, seller_id: str) -> str:
    order_id = unique("OW")
    order = one_seller_order(order_id, buyer_id=BUYER, seller_id=seller_id)
    await load_orders(pool, parse_orders_file(orders_file(order)))
    return order_id


# --- the ledger: the window comes from the policy, never below the floor --------------------


def test_a_request_naming_a_window_is_refused_by_the_model() -> None:
    with pytest.raises(ValidationError, match="response_window is not allowed"):
        RequestCancellationInput.model_validate(body("O-1", "S-1", response_window="PT1S"))
    # null too: the field is gone, a client that sends it is told so.
    with pytest.raises(ValidationError, match="response_window is not allowed"):
        RequestCancellationInput.model_validate(body("O-1", "S-1", response_window=None))


async def test_the_ledger_opens_with_the_policy_window_and_records_the_deadline(
    pool: asyncpg.Pool,
) -> None:
    ledger = Ledger(pool)
    seller = unique("S-POL")
    await set_policy(pool, seller_id=seller, response_window=timedelta(hours=2), floor=FLOOR)
    order_id = await new_order(pool, seller)
    cid = f"cancel-{order_id}~{seller}"
    before = await pool.fetchval("SELECT now()")
    opened = await ledger.open_cancellation(
        cancellation_id=cid,
        request=RequestCancellationInput(**body(order_id, seller)),
        default_window=timedelta(hours=48),
        floor=timedelta(hours=1),
    )
    assert opened.response_window == timedelta(hours=2)
    assert opened.timeout_policy is TimeoutPolicy.AUTO_APPROVE
    assert opened.seller_deadline is not None
    assert timedelta(hours=2) <= opened.seller_deadline - before < timedelta(hours=2, minutes=1)
    row = await pool.fetchrow(
        "SELECT seller_deadline, response_window FROM cancellations WHERE cancellation_id = $1",
        cid,
    )
    assert row["seller_deadline"] == opened.seller_deadline
    # Opening again (a later run) returns the first deadline, whatever the policy says now.
    await set_policy(pool, seller_id=seller, response_window=timedelta(hours=5), floor=FLOOR)
    again = await ledger.open_cancellation(
        cancellation_id=cid, request=RequestCancellationInput(**body(order_id, seller))
    )
    assert again.seller_deadline == opened.seller_deadline
    assert again.response_window == timedelta(hours=2)


async def test_a_policy_below_the_floor_is_refused_and_the_floor_wins_over_an_old_one(
    pool: asyncpg.Pool,
) -> None:
    seller = unique("S-POL")
    with pytest.raises(WindowBelowFloor, match="below the floor"):
        await set_policy(
            pool, seller_id=seller, response_window=timedelta(minutes=5), floor=timedelta(hours=1)
        )
    assert await get_policy(pool, seller_id=seller) is None
    # A policy set under a lower floor: the floor raised since applies when a request opens.
    await set_policy(
        pool,
        seller_id=seller,
        response_window=timedelta(minutes=5),
        floor=timedelta(minutes=1),
        timeout_policy=TimeoutPolicy.ESCALATE,
    )
    order_id = await new_order(pool, seller)
    opened = await Ledger(pool).open_cancellation(
        cancellation_id=f"cancel-{order_id}~{seller}",
        request=RequestCancellationInput(**body(order_id, seller)),
        floor=timedelta(hours=1),
    )
    assert opened.response_window == timedelta(hours=1)
    assert opened.timeout_policy is TimeoutPolicy.ESCALATE
    assert await clear_policy(pool, seller_id=seller)
    assert not await clear_policy(pool, seller_id=seller)


async def test_stuck_lists_waiting_requests_oldest_first_with_time_left(
    pool: asyncpg.Pool,
) -> None:
    ledger = Ledger(pool)
    seller_short, seller_long = unique("S-STK"), unique("S-STK")
    await set_policy(pool, seller_id=seller_short, response_window=timedelta(hours=2), floor=FLOOR)
    ids = []
    for seller in (seller_long, seller_short):
        order_id = await new_order(pool, seller)
        cid = f"cancel-{order_id}~{seller}"
        await ledger.open_cancellation(
            cancellation_id=cid, request=RequestCancellationInput(**body(order_id, seller))
        )
        ids.append(cid)
    # The first one was requested 30 h ago (48 h window: 18 h left).
    await pool.execute(
        "UPDATE cancellations SET created_at = created_at - interval '30 hours',"
        " seller_deadline = seller_deadline - interval '30 hours' WHERE cancellation_id = $1",
        ids[0],
    )
    everything = await stuck_cancellations(pool)
    assert [s.cancellation_id for s in everything if s.cancellation_id in ids] == ids
    old = await stuck_cancellations(pool, older_than=timedelta(hours=24))
    assert [s.cancellation_id for s in old] == [ids[0]]
    (first,) = old
    assert timedelta(hours=30) <= first.waited < timedelta(hours=30, minutes=1)
    assert first.left is not None
    assert timedelta(hours=17, minutes=59) < first.left <= timedelta(hours=18)
    short = next(s for s in everything if s.cancellation_id == ids[1])
    assert short.left is not None and short.left <= timedelta(hours=2)


def test_the_cli_refuses_a_window_on_a_request_and_a_policy_below_the_floor(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import app

    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR", "1h")
    runner = CliRunner()
    refused = runner.invoke(
        app,
        ["request", "O-1", "S-2", "--buyer", "B", "--reason", "out_of_stock", "--window", "2m"],
    )
    assert refused.exit_code == 2
    assert "--window is not allowed" in refused.output
    assert "sellers policy S-2" in refused.output
    low = runner.invoke(app, ["sellers", "policy", "S-2", "--window", "2m"])
    assert low.exit_code == 1, low.output
    assert "below the floor" in low.output
    ok = runner.invoke(app, ["sellers", "policy", "S-2", "--window", "2h"])
    assert ok.exit_code == 0, ok.output
    assert "2h" in ok.output
    cleared = runner.invoke(app, ["sellers", "policy", "S-2", "--clear"])
    assert cleared.exit_code == 0 and "cleared" in cleared.output


# --- end to end: the API, the worker, a real dev server -------------------------------------


@pytest.fixture(scope="module")
async def api(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Api]:
    settings = Settings(
        task_queue=f"window-{uuid.uuid4().hex[:8]}",
        seller_response_window_floor=FLOOR,
        refund_submit_initial_interval=timedelta(milliseconds=100),
        refund_poll_interval=timedelta(milliseconds=200),
        refund_poll_max_interval=timedelta(seconds=1),
        api_instant_wait=timedelta(seconds=10),
    )
    async with api_stack(
        temporal_address,
        e2e_database_url,
        settings,
        principals=("buyer-service", "sre", "sre:alice"),
        webhook_secret=SECRET,
    ) as stack:
        yield Api(stack, settings)


@pytest.mark.e2e
async def test_the_api_refuses_a_request_that_sets_a_window_and_changes_nothing(api: Api) -> None:
    seller = unique("S-API")
    order_id = await new_order(api.pool, seller)
    for window in ("PT1S", 1, None):
        response = await api.call(
            "POST",
            "/v1/cancellations",
            "buyer-service",
            json=body(order_id, seller, response_window=window),
        )
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["code"] == "window_not_allowed", problem
        assert problem["detail"] == WINDOW_NOT_ALLOWED
    cid = f"cancel-{order_id}~{seller}"
    assert (
        await api.pool.fetchval("SELECT 1 FROM cancellations WHERE cancellation_id = $1", cid)
        is None
    )
    missing = await api.call("GET", f"/v1/cancellations/{cid}", "sre")
    assert missing.status_code == 404, missing.text


@pytest.mark.e2e
async def test_a_silent_seller_is_auto_approved_after_its_policy_window(api: Api) -> None:
    seller = unique("S-API")
    await set_policy(api.pool, seller_id=seller, response_window=timedelta(seconds=2), floor=FLOOR)
    order_id = await new_order(api.pool, seller)
    started = time.monotonic()
    response = await api.call(
        "POST", "/v1/cancellations", "buyer-service", json=body(order_id, seller)
    )
    assert response.status_code == 202, response.text
    cid = response.json()["cancellation_id"]
    row = await api.pool.fetchrow(
        "SELECT created_at, seller_deadline, response_window FROM cancellations"
        " WHERE cancellation_id = $1",
        cid,
    )
    assert row["response_window"] == timedelta(seconds=2)
    assert row["seller_deadline"] - row["created_at"] < timedelta(seconds=3)
    view = await api.view(cid)
    assert view["status"] == "awaiting_seller"

    async def approved_by_timer() -> dict[str, Any]:
        view = await api.view(cid)
        assert view["status"] == "completed", view["status"]
        return view

    view = await eventually(approved_by_timer, timeout=30)
    # The policy's window, not the default 48 h; and not before it ran out.
    assert time.monotonic() - started >= 2
    approval = next(e for e in view["audit"] if e["kind"] == "approved")
    assert approval["actor"] == "timer"
    assert "0:00:02" in approval["detail"], approval


@pytest.mark.e2e
async def test_stuck_requests_through_the_api_and_an_operator_decides_one(api: Api) -> None:
    seller = unique("S-API")
    order_id = await new_order(api.pool, seller)
    response = await api.call(
        "POST", "/v1/cancellations", "buyer-service", json=body(order_id, seller)
    )
    assert response.status_code == 202, response.text
    cid = response.json()["cancellation_id"]
    forbidden = await api.call("GET", "/v1/stuck", "buyer-service")
    assert forbidden.status_code == 403, forbidden.text
    bad = await api.call("GET", "/v1/stuck?older_than=soon", "sre")
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_duration", bad.text
    listed = await api.call("GET", "/v1/stuck?older_than=0s", "sre")
    assert listed.status_code == 200, listed.text
    (mine,) = [s for s in listed.json() if s["cancellation_id"] == cid]
    assert mine["status"] == "awaiting_seller" and mine["seller_deadline"]
    old = await api.call("GET", "/v1/stuck?older_than=24h", "sre")
    assert cid not in {s["cancellation_id"] for s in old.json()}

    decided = await api.call(
        "POST",
        f"/v1/cancellations/{cid}/escalation-decision",
        "sre:alice",
        json={"decision": "accept", "reason": "seller unreachable"},
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "approved"

    async def completed() -> dict[str, Any]:
        view = await api.view(cid)
        assert view["status"] == "completed", view["status"]
        return view

    view = await eventually(completed, timeout=30)
    approval = next(e for e in view["audit"] if e["kind"] == "approved")
    assert approval["actor"] == "operator:alice"
    assert approval["detail"] == "seller unreachable"
    after = await api.call("GET", "/v1/stuck", "sre")
    assert cid not in {s["cancellation_id"] for s in after.json()}


def test_one_off_commands_on_the_dev_stack_use_its_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ordercancel dev` lowers the floor for the demo and records it; `ordercancel sellers
    policy` against that stack checks the same floor, unless one is configured."""
    from infra.stack import dev_stack_file, window_floor

    monkeypatch.delenv("ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("ORDERCANCEL_DATABASE_URL", raising=False)
    settings = Settings(data_dir=tmp_path)
    assert window_floor(settings) == timedelta(hours=1)  # no dev stack: the default
    dev_stack_file(settings).write_text(
        json.dumps({"database_url": "postgresql://x", "window_floor_seconds": 2.0})
    )
    assert window_floor(settings) == timedelta(seconds=2)
    monkeypatch.setenv("ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR", "30m")
    assert window_floor(Settings(data_dir=tmp_path)) == timedelta(minutes=30)


def test_the_stuck_command_lists_oldest_first_as_json(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import app

    async def open_two() -> list[str]:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            ids = []
            for _ in range(2):
                seller = unique("S-CLI")
                order_id = await new_order(pool, seller)
                cid = f"cancel-{order_id}~{seller}"
                await Ledger(pool).open_cancellation(
                    cancellation_id=cid, request=RequestCancellationInput(**body(order_id, seller))
                )
                ids.append(cid)
            await pool.execute(
                "UPDATE cancellations SET created_at = created_at - interval '2 days'"
                " WHERE cancellation_id = $1",
                ids[0],
            )
            return ids
        finally:
            await pool.close()

    ids = asyncio.run(open_two())
    monkeypatch.setenv("DATABASE_URL", database_url)
    result = CliRunner().invoke(app, ["stuck", "--json"])
    assert result.exit_code == 0, result.output
    listed = [row["cancellation_id"] for row in json.loads(result.output)]
    assert listed == ids  # oldest first
    old = CliRunner().invoke(app, ["stuck", "--older-than", "24h", "--json"])
    rows = json.loads(old.output)
    assert [r["cancellation_id"] for r in rows] == [ids[0]]
    assert rows[0]["waited_seconds"] >= 2 * 86400 and rows[0]["left_seconds"] > 0
    table = CliRunner().invoke(app, ["stuck"])
    assert table.exit_code == 0 and "2 request(s)" in table.output, table.output
    # Each row names its order and seller (the id's parts), not only the id.
    wide = CliRunner().invoke(app, ["stuck"], env={"COLUMNS": "250"})
    for cid in ids:
        order_id, seller = cid.removeprefix("cancel-").split("~")
        assert f" {order_id} " in wide.output and f" {seller} " in wide.output, wide.output
