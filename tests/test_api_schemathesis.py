"""The HTTP API against its own contract, by schemathesis: requests generated from
docs/openapi.json (valid ones and ones that break the schema), sent by every kind of caller
(each principal, no key, a garbage key), to the app over a real Temporal dev server, a real
PostgreSQL and the product's worker (as tests/test_api.py runs it).

Every response must be no 5xx and conform to the document: a documented status, the documented
content type, a body matching the schema, the documented headers. Path ids are random or those
of real cancellations; payment events are sometimes correctly signed, to get past the signature.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
from helpers.orders import one_seller_order, orders_file
from helpers.stacks import ApiStack, api_stack
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from api.signing import SIGNATURE_HEADER, signature_header
from infra.settings import Settings
from ledger.orders import load_orders, parse_orders_file

pytestmark = pytest.mark.e2e

T = TypeVar("T")
OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
SECRET = "whsec_schemathesis_" + "s" * 32
SELLER, BUYER = "S-51", "B-510"
PRINCIPALS = (
    "buyer-service",
    f"seller:{SELLER}",
    "seller:S-52",
    "sre",
    "payment-provider",
    "order-system",
)
CALLERS = (*PRINCIPALS, None, "garbage")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES_PER_OPERATION = 75
SENT: Counter[str] = Counter()


@pytest.fixture(scope="module")
async def stack(temporal_address: str, e2e_database_url: str) -> AsyncIterator[ApiStack]:
    settings = Settings(
        task_queue=f"schemathesis-{uuid.uuid4().hex[:8]}",
        refund_poll_interval=timedelta(seconds=1),
        refund_submit_initial_interval=timedelta(milliseconds=100),
        api_instant_wait=timedelta(seconds=2),
        stripe_webhook_secret=SecretStr(SECRET),
    )
    try:
        async with api_stack(
            temporal_address,
            e2e_database_url,
            settings,
            principals=PRINCIPALS,
            webhook_secret=SECRET,
        ) as stack:
            yield stack
    finally:
        if SENT:
            print("\nschemathesis requests: " + ", ".join(f"{k} {v}" for k, v in SENT.items()))


def on_loop(loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[T]]) -> T:
    async def run() -> T:
        return await make()

    return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=60)


async def pending_cancellations(stack: ApiStack, n: int) -> list[str]:
    """Real cancellations awaiting their seller, whose ids the generated requests may use."""
    ids = []
    for _ in range(n):
        order_id = f"SCH-{uuid.uuid4().hex[:8]}"
        order = one_seller_order(order_id, buyer_id=BUYER, seller_id=SELLER)
        await load_orders(stack.pool, parse_orders_file(orders_file(order)))
        response = await stack.http.post(
            "/v1/cancellations",
            json={"order_id": order_id, "seller_id": SELLER, "buyer_id": BUYER, "reason": "other"},
            headers={"Authorization": f"Bearer {stack.keys['buyer-service']}"},
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["cancellation_id"])
    return ids


def request_of(
    case: Any, stack: ApiStack, caller: str | None, known: str | None, signed: bool
) -> dict[str, Any]:
    if known is not None and "cancellation_id" in (case.path_parameters or {}):
        case.path_parameters = {**case.path_parameters, "cancellation_id": known}
    kwargs: dict[str, Any] = case.as_transport_kwargs(base_url="http://api.test")
    headers = dict(kwargs.pop("headers", None) or {})
    headers.pop("Authorization", None)
    if caller == "garbage":
        headers["Authorization"] = "Bearer ock_garbage"
    elif caller is not None:
        headers["Authorization"] = f"Bearer {stack.keys[caller]}"
    if signed and case.path == "/v1/payment-events" and "json" in kwargs:
        body = json.dumps(kwargs.pop("json")).encode()
        kwargs["content"] = body
        headers["Content-Type"] = "application/json"
        headers[SIGNATURE_HEADER] = signature_header(SECRET, int(time.time()), body)
    for name, value in headers.items():
        try:
            str(value).encode("ascii")
            str(name).encode("ascii")
        except UnicodeEncodeError:
            reject()  # not sendable over HTTP/1.1 as such; nothing to learn
    kwargs["headers"] = headers
    if isinstance(kwargs.get("data"), bytes | str):
        kwargs["content"] = kwargs.pop("data")
    if kwargs.get("cookies"):
        reject()  # the API reads no cookie
    allowed = {"method", "url", "params", "json", "content", "data", "files", "headers"}
    return {k: v for k, v in kwargs.items() if k in allowed}


async def test_every_generated_request_gets_a_documented_answer_and_no_5xx(stack: ApiStack) -> None:
    schema = schemathesis.openapi.from_path(str(OPENAPI))
    loop = asyncio.get_running_loop()
    known_ids = await pending_cancellations(stack, 3)
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) >= 8
    for operation in operations:
        strategy = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            case=strategy,
            caller=st.sampled_from(CALLERS),
            known=st.sampled_from([None, *known_ids]),
            signed=st.booleans(),
        )
        def conforms(case: Any, caller: str | None, known: str | None, signed: bool) -> None:
            request = request_of(case, stack, caller, known, signed)
            response = on_loop(loop, lambda: stack.http.request(**request))
            SENT[f"{response.status_code // 100}xx"] += 1
            assert response.status_code < 500, (request, response.text)
            case.validate_response(response, checks=CHECKS)

        await asyncio.to_thread(conforms)
    # The cancellations the noise was aimed at still answer as the contract says.
    for cancellation_id in known_ids:
        response = await stack.http.get(
            f"/v1/cancellations/{cancellation_id}",
            headers={"Authorization": f"Bearer {stack.keys['sre']}"},
        )
        assert response.status_code == 200, response.text
