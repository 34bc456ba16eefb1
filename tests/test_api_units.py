"""The API's parts that need no server: keys, webhook signatures, the body limit, the problem
document for an unexpected error, readiness before start, the `ordercancel api` commands, and
docs/openapi.json kept in sync with the app."""

from __future__ import annotations

import json
import stat
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner

from api.app import create_app
from api.commands import openapi_json
from api.keys import (
    KeyConfigError,
    KeyStore,
    Principal,
    Role,
    generate_key,
    key_line,
    parse_key_lines,
)
from api.middleware import BodySizeLimit
from api.signing import SignatureRefused, signature_header, verify_signature
from cli.main import app as cli
from devstack.dev_api import DEV_PRINCIPALS, dev_credentials
from infra.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = timedelta(minutes=5)


# --- keys --------------------------------------------------------------------------------------


def test_keys_are_checked_against_their_hash_only() -> None:
    seller, sre = generate_key(), generate_key()
    config = f"# our keys\n{key_line('seller:S-7', seller)}\n\n{key_line('sre', sre)}  # ops\n"
    assert seller not in config and sre not in config
    store = KeyStore.load(file=None, env_value=config)
    assert store.authenticate(seller) == Principal(Role.SELLER, "S-7")
    assert store.authenticate(sre) == Principal(Role.SRE)
    assert str(store.authenticate(seller)) == "seller:S-7"
    # Same key id, another secret; an unknown key id; not a key at all.
    forged = seller[: seller.rindex("_") + 1] + "A" * 43
    for wrong in (forged, generate_key(), "", "ock_", "Bearer", seller + "x"):
        assert store.authenticate(wrong) is None


def test_keys_file_and_variable_are_merged(tmp_path: Path) -> None:
    a, b = generate_key(), generate_key()
    file = tmp_path / "keys"
    file.write_text(key_line("buyer-service", a) + "\n")
    store = KeyStore.load(file=file, env_value=key_line("payment-provider", b) + ";")
    assert store.authenticate(a) == Principal(Role.BUYER_SERVICE)
    assert store.authenticate(b) == Principal(Role.PAYMENT_PROVIDER)
    with pytest.raises(KeyConfigError, match="cannot read"):
        KeyStore.load(file=tmp_path / "missing", env_value=None)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("sre 0123456789abcdef", "expected"),
        ("root 0123456789abcdef sha256$" + "0" * 32 + "$" + "0" * 64, "unknown principal"),
        ("seller 0123456789abcdef sha256$" + "0" * 32 + "$" + "0" * 64, "names its seller"),
        ("seller:S 7 0123456789abcdef sha256$x", "expected"),
        ("sre 0123 sha256$" + "0" * 32 + "$" + "0" * 64, "malformed key id or hash"),
        ("sre 0123456789abcdef md5$abc", "malformed key id or hash"),
    ],
)
def test_bad_key_lines_say_where_without_echoing(line: str, message: str) -> None:
    with pytest.raises(KeyConfigError, match=message) as refused:
        parse_key_lines("\n" + line, source="keys.txt")
    assert "keys.txt, entry 2" in str(refused.value)
    assert line not in str(refused.value) and "0" * 32 not in str(refused.value)


def test_a_key_id_configured_twice_is_refused() -> None:
    key = generate_key()
    with pytest.raises(KeyConfigError, match="twice"):
        KeyStore.load(file=None, env_value=f"{key_line('sre', key)};{key_line('sre', key)}")


def test_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_key()
    monkeypatch.setenv("ORDERCANCEL_API_KEYS", key_line("seller:S-9", key))
    monkeypatch.setenv("ORDERCANCEL_PAYMENT_WEBHOOK_SECRET", "whsec_x")
    settings = Settings()
    assert settings.api_keys is not None and key_line("sre", key) not in repr(settings)
    assert "whsec_x" not in repr(settings)
    store = KeyStore.load(file=None, env_value=settings.api_keys.get_secret_value())
    assert store.authenticate(key) == Principal(Role.SELLER, "S-9")


def test_hash_key_command() -> None:
    runner = CliRunner()
    made = runner.invoke(cli, ["api", "hash-key", "seller:S-7"])
    assert made.exit_code == 0, made.output
    key = next(line[5:] for line in made.stdout.splitlines() if line.startswith("key: "))
    line = made.stdout.strip().splitlines()[-1]
    assert line.startswith("seller:S-7 ") and key not in line
    assert KeyStore.load(file=None, env_value=line).authenticate(key) == Principal(
        Role.SELLER, "S-7"
    )
    given = runner.invoke(cli, ["api", "hash-key", "sre", "--key-stdin"], input=key + "\n")
    assert given.exit_code == 0 and key not in given.stdout
    assert KeyStore.load(file=None, env_value=given.stdout).authenticate(key) is not None
    assert runner.invoke(cli, ["api", "hash-key", "admin"]).exit_code == 2
    assert runner.invoke(cli, ["api", "hash-key", "sre", "--key-stdin"], input="x\n").exit_code == 2


def test_dev_keys_are_made_once_and_kept_private(tmp_path: Path) -> None:
    first = dev_credentials(tmp_path)
    assert set(first.keys) == set(DEV_PRINCIPALS)
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    again = dev_credentials(tmp_path)
    assert again == first
    store = KeyStore.from_keys(first.keys)
    assert store.authenticate(first.keys["seller:S-7"]) == Principal(Role.SELLER, "S-7")


# --- webhook signatures ------------------------------------------------------------------------


def test_signature_round_trip_and_refusals() -> None:
    body, secret, now = b'{"event_id": "e-1"}', "whsec_test", 1_760_000_000
    good = signature_header(secret, now, body)
    assert verify_signature(secret, good, body, now=now + 10, tolerance=TOLERANCE) == now
    rotated = f"t={now},v1={'0' * 64},v1={good.split('v1=')[1]}"
    assert verify_signature(secret, rotated, body, now=now, tolerance=TOLERANCE) == now
    cases = [
        (None, "missing_signature"),
        ("", "missing_signature"),
        ("v1=abc", "malformed_signature"),
        (f"t={now}", "malformed_signature"),
        (f"t=-{now},v1=ab", "malformed_signature"),
        (f"t={now},v1=é", "bad_signature"),  # non-ASCII must not break the comparison
        (signature_header("other", now, body), "bad_signature"),
        (signature_header(secret, now, body + b"\n"), "bad_signature"),
        (signature_header(secret, now - 301, body), "stale_signature"),
        (signature_header(secret, now + 301, body), "stale_signature"),
    ]
    for header, code in cases:
        with pytest.raises(SignatureRefused) as refused:
            verify_signature(secret, header, body, now=now, tolerance=TOLERANCE)
        assert refused.value.code == code, header


def test_the_worked_example_in_the_docs_is_right() -> None:
    body = b'{"event_id":"evt_1001","type":"refund_confirmed","provider_ref":"re_4f2a"}'
    header = signature_header("whsec_example", 1767225600, body)
    doc = (ROOT / "docs" / "api.md").read_text()
    assert f"Ordercancel-Signature: {header}" in doc
    assert body.decode() in doc


# --- middleware and handlers -------------------------------------------------------------------


async def test_body_limit() -> None:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"size": len(await request.body())})

    app = BodySizeLimit(Starlette(routes=[Route("/", echo, methods=["POST"])]), limit=10)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.post("/", content=b"0123456789")).json() == {"size": 10}
        too_big = await c.post("/", content=b"0123456789x")
        assert too_big.status_code == 413 and too_big.json()["code"] == "payload_too_large"
        lying = await c.post("/", content=b"1", headers={"Content-Length": "abc"})
        assert lying.status_code == 400


async def test_before_start_not_ready_and_an_unexpected_error_is_a_logged_500() -> None:
    app = create_app(Settings())

    async def boom() -> None:
        raise RuntimeError("database on fire")

    app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/healthz")).status_code == 200
        ready = await c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        early = await c.get("/v1/cancellations/cancel-O-1~S-1", headers={"Authorization": "x"})
        assert early.status_code == 503 and early.json()["code"] == "not_ready"
        with structlog.testing.capture_logs() as logs:
            failed = await c.get("/boom")
        assert failed.status_code == 500
        assert failed.json()["code"] == "internal_error"
        assert "fire" not in failed.text  # details go to the log, not to the caller
        assert [e["event"] for e in logs] == ["api_unhandled_error", "api_request_failed"]


# --- the OpenAPI document ----------------------------------------------------------------------


def test_openapi_document_is_in_sync() -> None:
    """docs/openapi.json is `ordercancel api openapi -o docs/openapi.json`; regenerate it when
    this fails."""
    current = openapi_json(create_app(Settings()).openapi())
    stored = (ROOT / "docs" / "openapi.json").read_text()
    assert json.loads(stored) == json.loads(current), (
        "run: ordercancel api openapi -o docs/openapi.json"
    )
    document = json.loads(current)
    assert set(document["paths"]) == {
        "/v1/cancellations",
        "/v1/cancellations/{cancellation_id}",
        "/v1/cancellations/{cancellation_id}/seller-decision",
        "/v1/cancellations/{cancellation_id}/withdraw",
        "/v1/cancellations/{cancellation_id}/retry-refund",
        "/v1/cancellations/{cancellation_id}/escalation-decision",
        "/v1/cancellations/{cancellation_id}/messages",
        "/v1/orders/{order_id}/cancellations",
        "/v1/stuck",
        "/v1/payment-events",
        "/v1/orders",
        "/v1/orders/{order_id}/events",
        "/v1/providers/stripe/webhook",
        "/healthz",
        "/readyz",
    }
    assert document["components"]["schemas"]["SellerDecision"]["additionalProperties"] is False
