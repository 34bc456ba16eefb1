"""Issue 18: Temporal is not a side door, and small leaks and 500s.

The API over a real Temporal dev server and a real PostgreSQL (`helpers.stacks.api_stack`):
operators act through it as themselves (the identity comes from their key, never from a body),
sellers cannot tell another seller's cancellation from none, readiness names no internals,
hostile signature headers and ids are 4xx problems, and what buyers write renders as text in
operators' Web UI. Plus `ordercancel api` refusing to start on placeholder secrets.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest
import structlog
from helpers.api import Api, assert_problem, load_order, request_body
from helpers.policies import TEST_FLOOR, seller_window
from helpers.stacks import api_stack
from helpers.wait import eventually
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from typer.testing import CliRunner

from api.signing import SIGNATURE_HEADER, SignatureRefused, signature_header, verify_signature
from cli.main import app as cli
from domain.models import TimeoutPolicy
from domain.rules import cancellation_id as workflow_id_of
from infra.settings import Settings
from payments.provider import SimulatorFaults

SECRET = "whsec_test_" + "s" * 32
OWN, OTHER = "S-51", "S-52"
# A seller whose window (by policy, R19) is 1 s: its requests escalate at once.
SLOW = "S-53"
BUYER = "B-510"
PRINCIPALS = (
    "buyer-service",
    f"seller:{OWN}",
    f"seller:{OTHER}",
    "sre",
    "sre:alice",
    "payment-provider",
)
TOLERANCE = timedelta(minutes=5)

pytestmark = pytest.mark.e2e


# --- the stack ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def api(temporal_address: str, e2e_database_url: str) -> AsyncIterator[Api]:
    # The escalate policy, so that a request with a short window ends up with operators.
    settings = Settings(
        task_queue=f"sidedoor-{uuid.uuid4().hex[:8]}",
        timeout_policy=TimeoutPolicy.ESCALATE,
        seller_response_window_floor=TEST_FLOOR,
        refund_submit_initial_interval=timedelta(milliseconds=100),
        refund_submit_max_interval=timedelta(seconds=1),
        api_instant_wait=timedelta(seconds=10),
    )
    async with api_stack(
        temporal_address,
        e2e_database_url,
        settings,
        principals=PRINCIPALS,
        webhook_secret=SECRET,
    ) as stack:
        yield Api(stack, settings)


async def new_order(api: Api, seller: str = OWN) -> str:
    """A validated, captured order of one seller for BUYER: the request path."""
    return await load_order(
        api.stack.pool, "SD", buyer=BUYER, seller=seller, quantity=1, unit_price_minor=1000
    )


async def request(api: Api, order_id: str, seller: str = OWN, **extra: Any) -> str:
    body = request_body(order_id, seller, BUYER, reason="other", **extra)
    response = await api.call("POST", "/v1/cancellations", "buyer-service", json=body)
    assert response.status_code in (200, 202), response.text
    cancellation_id: str = response.json()["cancellation_id"]
    return cancellation_id


async def escalated(api: Api) -> str:
    """A request whose seller (SLOW, a 1 s window by policy) let the window run out: escalated
    to operators."""
    await seller_window(api.stack.pool, SLOW, timedelta(seconds=1))
    cancellation_id = await request(api, await new_order(api, SLOW), SLOW)

    async def is_escalated() -> None:
        assert (await api.view(cancellation_id))["status"] == "escalated"

    await eventually(is_escalated)
    return cancellation_id


async def parked(api: Api) -> str:
    """A cancellation whose refund the provider refuses for good: parked in refund_failed."""
    order_id = await new_order(api)
    await api.provider.set_faults(f"P-{order_id}", SimulatorFaults(final_failure="card_closed"))
    cancellation_id = await request(api, order_id)
    decided = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/seller-decision",
        f"seller:{OWN}",
        json={"seller_id": OWN, "decision": "accept"},
    )
    assert decided.status_code == 200, decided.text

    async def is_parked() -> None:
        assert (await api.view(cancellation_id))["status"] == "refund_failed"

    await eventually(is_parked)
    return cancellation_id


problem = assert_problem


def operators_in(view: dict[str, Any]) -> list[str]:
    return [e["actor"] for e in view["audit"] if e["actor"].startswith("operator:")]


# --- operators act through the API, as themselves -----------------------------------------------


async def test_sre_resolves_an_escalation_as_the_key_it_holds(api: Api) -> None:
    cancellation_id = await escalated(api)
    path = f"/v1/cancellations/{cancellation_id}/escalation-decision"
    # Only the sre principal: the others are 403, and nothing moves.
    for principal in ("buyer-service", f"seller:{OWN}", "payment-provider"):
        refused = await api.call("POST", path, principal, json={"decision": "accept"})
        problem(refused, 403, "forbidden")
    # The operator is the key's, never the body's.
    forged = await api.call(
        "POST", path, "sre:alice", json={"operator_id": "mallory", "decision": "accept"}
    )
    problem(forged, 403, "operator_mismatch")
    assert (await api.view(cancellation_id))["status"] == "escalated"
    accepted = await api.call(
        "POST", path, "sre:alice", json={"decision": "accept", "reason": "buyer is right"}
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "approved"
    view = await api.view(cancellation_id)
    assert "operator:alice" in operators_in(view)
    assert "operator:mallory" not in operators_in(view)
    # Once decided, the workflow's own refusal comes back.
    again = await api.call("POST", path, "sre:alice", json={"decision": "reject"})
    problem(again, 409, "not_escalated")


async def test_an_operator_decides_a_request_still_waiting_for_its_seller(api: Api) -> None:
    """Issue 20: a stuck request is decided by an operator in the seller's place, recorded as
    the key's operator with the reason; the seller's late answer is then refused."""
    cancellation_id = await request(api, await new_order(api))
    assert (await api.view(cancellation_id))["status"] == "awaiting_seller"
    response = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/escalation-decision",
        "sre:alice",
        json={"decision": "reject", "reason": "seller unreachable for a week"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "rejected"
    late = await api.call(
        "POST",
        f"/v1/cancellations/{cancellation_id}/seller-decision",
        f"seller:{OWN}",
        json={"seller_id": OWN, "decision": "accept"},
    )
    assert late.status_code == 409, late.text

    async def rejected() -> None:
        view = await api.view(cancellation_id)
        assert view["status"] == "rejected"
        assert any(
            e["actor"] == "operator:alice" and e["detail"] == "seller unreachable for a week"
            for e in view["audit"]
        ), view["audit"]

    await eventually(rejected)


async def test_retry_refund_takes_the_operator_from_the_key(api: Api) -> None:
    cancellation_id = await parked(api)
    path = f"/v1/cancellations/{cancellation_id}/retry-refund"
    forged = await api.call("POST", path, "sre", json={"operator_id": "op-7"})
    problem(forged, 403, "operator_mismatch")
    retried = await api.call("POST", path, "sre:alice", json={"reason": "card replaced"})
    assert retried.status_code == 200, retried.text

    async def recorded() -> None:
        # The audit row is the workflow's note, written by an activity after the update.
        assert operators_in(await api.view(cancellation_id)) == ["operator:alice"]

    await eventually(recorded)


# --- a seller learns nothing about other sellers' cancellations ---------------------------------


async def test_another_sellers_cancellation_looks_like_none(api: Api) -> None:
    cancellation_id = await request(api, await new_order(api, seller=OWN))
    absent = workflow_id_of("SD-absent", OWN)
    seller = f"seller:{OTHER}"
    read_other = await api.call("GET", f"/v1/cancellations/{cancellation_id}", seller)
    read_none = await api.call("GET", f"/v1/cancellations/{absent}", seller)
    assert problem(read_other, 404, "not_found") == problem(read_none, 404, "not_found")
    decide = {"seller_id": OTHER, "decision": "accept"}
    decide_other = await api.call(
        "POST", f"/v1/cancellations/{cancellation_id}/seller-decision", seller, json=decide
    )
    decide_none = await api.call(
        "POST", f"/v1/cancellations/{absent}/seller-decision", seller, json=decide
    )
    assert problem(decide_other, 404, "not_found") == problem(decide_none, 404, "not_found")
    assert (await api.view(cancellation_id))["status"] == "awaiting_seller"


# --- readiness names no internals ---------------------------------------------------------------


async def test_readiness_answers_a_generic_reason_and_logs_the_detail(api: Api) -> None:
    ctx = api.stack.app.state.ctx

    async def broken() -> object:
        raise OSError("connection to 10.1.2.3:5432 refused, user ordercancel password=hunter2")

    with (
        mock.patch.object(ctx, "ping_database", broken),
        structlog.testing.capture_logs() as logs,
    ):
        response = await api.call("GET", "/readyz", None)
    assert response.status_code == 503
    assert response.json() == {
        "status": "not_ready",
        "checks": {"postgres": "unavailable", "temporal": "ok"},
    }
    assert "hunter2" not in response.text and "10.1.2.3" not in response.text
    failed = [e for e in logs if e["event"] == "readiness_check_failed"]
    assert failed and failed[0]["check"] == "postgres" and "hunter2" in failed[0]["error"]


# --- hostile signature headers and ids are 4xx problems, never 500 ------------------------------

ABSURD_TIMESTAMPS = [
    "9" * 20,
    "9" * 400,  # past a float: OverflowError
    "9" * 5000,  # past int()'s digit limit: ValueError
    "-1",
    "-" + "9" * 400,
    "1e9",
    "0x10",
    " 1",
    "١٢٣",  # Arabic-Indic digits: str.isdigit() says yes
    "",
    "\x00",
    "1" * 10 + "\x00",
]


@pytest.mark.parametrize("timestamp", ABSURD_TIMESTAMPS)
async def test_an_absurd_signature_timestamp_is_a_4xx(api: Api, timestamp: str) -> None:
    body = json.dumps({"event_id": f"evt-{uuid.uuid4().hex}", "type": "refund_confirmed"})
    header = f"t={timestamp},v1={'0' * 64}".encode()  # as bytes: any octets may arrive
    response = await api.stack.http.post(
        "/v1/payment-events",
        content=body.encode(),
        headers={
            b"Authorization": f"Bearer {api.stack.keys['payment-provider']}".encode(),
            b"Content-Type": b"application/json",
            SIGNATURE_HEADER.encode(): header,
        },
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["code"] in ("malformed_signature", "stale_signature")


@pytest.mark.parametrize(
    "field, value",
    [
        ("event_id", "evt\x00nul"),
        ("event_id", "evt\x1b[31m"),
        ("provider_ref", "re_\x00"),
        ("refund_key", "k\x00"),
        ("failure_code", "\x00"),
    ],
)
async def test_control_characters_in_a_signed_event_are_a_422(
    api: Api, field: str, value: str
) -> None:
    fields: dict[str, Any] = {"event_id": f"evt-{uuid.uuid4().hex}", "type": "refund_failed"}
    fields[field] = value
    body = json.dumps(fields).encode()  # ASCII: the control character as a \\u escape
    response = await api.call(
        "POST",
        "/v1/payment-events",
        "payment-provider",
        content=body,
        headers={
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(SECRET, int(time.time()), body),
        },
    )
    found = problem(response, 422, "invalid_payload")
    assert found["errors"][0]["loc"] == ["body", field]


@pytest.mark.parametrize(
    "reason_text, status, code",
    [
        ("before\\u0000after", 422, "invalid_payload"),
        ("\\u001b[2J", 422, "invalid_payload"),
        ("\\ud800", 400, "malformed_json"),  # a lone surrogate: not Unicode text at all
    ],
)
async def test_control_characters_in_a_request_are_refused(
    api: Api, reason_text: str, status: int, code: str
) -> None:
    order_id = await new_order(api)
    body = (
        f'{{"order_id": "{order_id}", "seller_id": "{OWN}", "buyer_id": "{BUYER}",'
        f' "reason": "other", "reason_text": "{reason_text}"}}'
    ).encode()
    response = await api.call(
        "POST",
        "/v1/cancellations",
        "buyer-service",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    problem(response, status, code)
    missing = await api.call("GET", f"/v1/cancellations/cancel-{order_id}-{OWN}", "sre")
    problem(missing, 404, "not_found")


@pytest.mark.parametrize(
    "cancellation_id",
    ["cancel-O-1-S-1%00", "cancel-%00-S-1", "%ed%a0%80", "cancel-" + "%ff" * 40, "..%2f..%2f"],
)
async def test_hostile_path_ids_are_404(api: Api, cancellation_id: str) -> None:
    for method, suffix, principal, body in (
        ("GET", "", "sre", None),
        ("POST", "/escalation-decision", "sre", {"decision": "accept"}),
        ("POST", "/retry-refund", "sre", {}),
        ("POST", "/withdraw", "buyer-service", {"buyer_id": BUYER}),
    ):
        response = await api.call(
            method, f"/v1/cancellations/{cancellation_id}{suffix}", principal, json=body
        )
        problem(response, 404, "not_found")


@settings(max_examples=300, deadline=None)
@given(
    header=st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda t, v: f"t={t},v1={v}",
            st.one_of(
                st.integers().map(str),
                st.integers(min_value=-(10**4000), max_value=10**4000).map(str),
                st.text(alphabet="0123456789-+e.", min_size=300, max_size=5000),
                st.text(max_size=30),
            ),
            st.text(alphabet="0123456789abcdef", max_size=70),
        ),
    ),
    body=st.binary(max_size=100),
)
def test_signature_parsing_refuses_or_accepts_never_crashes(header: str, body: bytes) -> None:
    """Any header: a timestamp back, or a `SignatureRefused` with a code (the route turns it
    into a 400/401), never another exception."""
    try:
        verify_signature(SECRET, header, body, now=time.time(), tolerance=TOLERANCE)
    except SignatureRefused as err:
        assert err.code in {
            "missing_signature",
            "malformed_signature",
            "stale_signature",
            "bad_signature",
        }


# --- what buyers and providers write renders as text in the Web UI ------------------------------

HOSTILE_MARKDOWN = (
    "# Refund me now\n\n**urgent** [click here](https://evil.example/login) "
    "![x](https://evil.example/pixel.png) <img src=x onerror=alert(1)> www.evil.example "
    "`code` _x_ | a | b |\n> quoted\n- item\n1. one\n\\*"
)
PLAIN = "refund me now"


def rendered(markdown: str) -> str:
    """HTML as a Markdown renderer with GFM's tables and strikethrough shows it."""
    html: str = MarkdownIt("gfm-like", {"linkify": False}).render(markdown)
    return html


def tags(html: str) -> list[str]:
    return re.findall(r"<[a-z0-9]+", html)


async def test_the_buyers_text_is_shown_as_text_in_the_web_ui(api: Api) -> None:
    """The start's details (ours: Markdown) around the buyer's text (theirs: text) render to
    the same elements whatever the buyer wrote."""
    shown = {}
    for text in (PLAIN, HOSTILE_MARKDOWN):
        cancellation_id = await request(api, await new_order(api), reason_text=text)
        handle = api.stack.client.get_workflow_handle(cancellation_id)
        details = await (await handle.describe()).static_details()
        assert details is not None
        shown[text] = rendered(details)
    assert tags(shown[HOSTILE_MARKDOWN]) == tags(shown[PLAIN]), shown[HOSTILE_MARKDOWN]
    assert "evil.example/login" in shown[HOSTILE_MARKDOWN]  # shown, as text


def test_current_details_escape_what_others_wrote() -> None:
    """Coupon reasons, provider references and error messages come from outside; each is shown
    as text (the Web UI renders current details as Markdown)."""
    from domain.models import CancellationStatus, CouponOutcome, CouponOutcomeKind
    from workflows.visibility import Visibility

    now = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)
    shown = {}
    for text in (PLAIN, HOSTILE_MARKDOWN):
        with mock.patch("workflows.visibility.workflow.now", return_value=now):
            visibility = Visibility()
        visibility._status = CancellationStatus.REFUND_FAILED
        visibility._last_error = text
        visibility._coupon = CouponOutcome(outcome=CouponOutcomeKind.NO_COUPON, reason=text)
        shown[text] = rendered(visibility.details())
    assert tags(shown[HOSTILE_MARKDOWN]) == tags(shown[PLAIN]), shown[HOSTILE_MARKDOWN]
    assert "Refund me now" in shown[HOSTILE_MARKDOWN]


# --- `ordercancel api` does not start on placeholder secrets ------------------------------------

GOOD_KEYS = "sre 0123456789abcdef sha256$" + "1" * 32 + "$" + "2" * 64


WEBHOOK, KEYS = "ORDERCANCEL_PAYMENT_WEBHOOK_SECRET", "ORDERCANCEL_API_KEYS"
# The example line of docs/api.md, copied as is.
DOCS_KEY_LINE = (
    "seller:S-7 fd37dd748cbeb2da sha256$044223320bd1d7dc3db1b943355b8de3"
    "$9689551de175376e72bdfa445b22c687f3e0f66242ed4156adcf58b5453050bd"
)


@pytest.mark.parametrize(
    "setting, value",
    [
        (WEBHOOK, "CHANGE-ME"),  # deploy/k8s/secret.yaml's template
        (WEBHOOK, "whsec_..."),
        (WEBHOOK, "REPLACE_ME"),
        (WEBHOOK, "whsec_example"),  # docs/api.md's worked example
        (WEBHOOK, "   "),
        (WEBHOOK, ""),
        (KEYS, ""),  # deploy/k8s/secret.yaml's template
        (KEYS, "sre 0123456789abcdef REPLACE_ME"),
        (KEYS, "sre 0123456789abcdef sha256$CHANGE-ME"),
        (KEYS, DOCS_KEY_LINE),
    ],
)
def test_api_refuses_to_start_on_a_placeholder_secret(
    setting: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEYS, GOOD_KEYS)
    monkeypatch.setenv(WEBHOOK, "whsec_" + "r" * 32)
    monkeypatch.setenv(setting, value)
    monkeypatch.delenv("ORDERCANCEL_API_KEYS_FILE", raising=False)
    serve = mock.patch("uvicorn.Server.run", side_effect=AssertionError("must not serve"))
    with serve:
        result = CliRunner().invoke(cli, ["api"])
    assert result.exit_code == 1, result.output
    assert setting in result.output
    assert "placeholder" in result.output or "empty" in result.output or "hash" in result.output


def test_api_starts_with_real_looking_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERCANCEL_API_KEYS", GOOD_KEYS)
    monkeypatch.setenv("ORDERCANCEL_PAYMENT_WEBHOOK_SECRET", "whsec_" + "r" * 32)
    monkeypatch.delenv("ORDERCANCEL_API_KEYS_FILE", raising=False)
    with mock.patch("uvicorn.Server.run") as run:
        result = CliRunner().invoke(cli, ["api"])
    assert result.exit_code == 0, result.output
    assert run.called
