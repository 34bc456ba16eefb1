"""What the API tests share: the API stack driven as a principal (`Api`), orders loaded for a
request, request bodies, keys in headers and the check of a problem document (api/errors.py)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
from temporalio.client import Client

from api.keys import generate_key
from helpers.orders import order_document, unique
from helpers.stacks import ApiStack
from infra.settings import Settings
from ledger.orders import load_orders, parse_orders_file
from payments.provider import SimulatedProvider

# Principals `Api.call` sends something else than a key for: no Authorization header, a
# well-formed key the app never issued, a header that is not a key at all.
NO_KEY, UNKNOWN_KEY, GARBAGE_KEY = "(no key)", "(unknown key)", "(garbage key)"


@dataclass
class Api:
    """The API stack (helpers.stacks.api_stack) as the tests drive it: a request with a
    principal's key, a cancellation's view, an order posted, an event sent; the stack's pool,
    client and keys, and the simulated provider on its ledger (for faults)."""

    stack: ApiStack
    settings: Settings
    provider: SimulatedProvider = field(init=False)

    def __post_init__(self) -> None:
        self.provider = SimulatedProvider(self.stack.pool)

    @property
    def http(self) -> httpx.AsyncClient:
        return self.stack.http

    @property
    def keys(self) -> dict[str, str]:
        return self.stack.keys

    @property
    def pool(self) -> asyncpg.Pool:
        return self.stack.pool

    @property
    def client(self) -> Client:
        return self.stack.client

    def headers(self, principal: str | None) -> dict[str, str]:
        """The Authorization header of `principal` (none for None or NO_KEY)."""
        if principal is None or principal == NO_KEY:
            return {}
        if principal == UNKNOWN_KEY:
            return {"Authorization": f"Bearer {generate_key()}"}
        if principal == GARBAGE_KEY:
            return {"Authorization": "Bearer not-a-key"}
        return bearer(self.keys, principal)

    async def call(
        self,
        method: str,
        path: str,
        principal: str | None,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """A request as `principal`."""
        return await self.http.request(
            method,
            path,
            json=json,
            content=content,
            headers={**self.headers(principal), **(headers or {})},
        )

    async def view(self, cancellation_id: str, principal: str = "sre") -> dict[str, Any]:
        """`GET /v1/cancellations/{id}` as `principal`: it must answer 200."""
        response = await self.call("GET", f"/v1/cancellations/{cancellation_id}", principal)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def post_order(self, document: dict[str, Any]) -> httpx.Response:
        """`POST /v1/orders` as the order system."""
        return await self.call("POST", "/v1/orders", "order-system", json=document)

    async def event(self, order_id: str, **body: Any) -> httpx.Response:
        """`POST /v1/orders/{id}/events` as the order system; a new event id by default."""
        body.setdefault("event_id", unique("E"))
        body.setdefault("occurred_at", "2026-05-01T12:00:00Z")
        return await self.call("POST", f"/v1/orders/{order_id}/events", "order-system", json=body)


async def load_order(
    pool: asyncpg.Pool,
    prefix: str,
    *,
    buyer: str,
    seller: str | None = None,
    sellers: tuple[str, ...] = (),
    paid: bool = True,
    **options: Any,
) -> str:
    """Load a new order (`order_document`) with an id no other run used; its id."""
    order_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
    every = sellers or ((seller,) if seller else ())
    assert every, "an order needs a seller"
    document = order_document(order_id, buyer_id=buyer, sellers=every, validated=paid, **options)
    report = await load_orders(pool, parse_orders_file(json.dumps({"orders": [document]})))
    assert report.loaded == [order_id]
    return order_id


def request_body(
    order_id: str, seller: str, buyer: str, *, reason: str = "out_of_stock", **extra: Any
) -> dict[str, Any]:
    """The body of `POST /v1/cancellations`."""
    return {"order_id": order_id, "seller_id": seller, "buyer_id": buyer, "reason": reason, **extra}


def bearer(keys: dict[str, str], principal: str | None) -> dict[str, str]:
    """The Authorization header of `principal`'s key; none for None."""
    return {"Authorization": f"Bearer {keys[principal]}"} if principal else {}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """A problem document (application/problem+json) of `status` and `code`, with a detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["code"] == code, problem
    assert problem["status"] == status and problem["detail"], problem
    return problem
