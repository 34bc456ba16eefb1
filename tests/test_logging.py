"""Log lines: JSON fields (the SDK's context included), and no secret or card number in any."""

from __future__ import annotations

import logging

import pytest
import structlog
from helpers.logs import captured_logs
from hypothesis import given, settings
from hypothesis import strategies as st
from temporalio.exceptions import ApplicationError

from infra.log_context import ids_of
from infra.log_processors import REDACTED, _redact_all, redact, redact_text, temporal_context

DSN = "postgresql://ledger:s3cr3t-pw@db.internal:5432/ledger"
CARD = "4111 1111 1111 1111"  # a test card number: passes the Luhn check


def run_redact(**fields: object) -> dict[str, object]:
    return dict(redact(None, "info", dict(fields)))


@pytest.mark.parametrize(
    "key",
    [
        "database_url",
        "DATABASE_URL",
        "dsn",
        "ledger_dsn",
        "password",
        "db_password",
        "api_key",
        "stripe_api_key",
        "authorization",
        "access_token",
        "client_secret",
        "card",
        "card_number",
        "cardholder",
        "cvv",
    ],
)
def test_secret_keys_are_redacted(key: str) -> None:
    assert run_redact(**{key: "anything"})[key] == REDACTED


@pytest.mark.parametrize(
    "key", ["order_id", "idempotency_key", "payment_method", "provider_ref", "event"]
)
def test_ordinary_keys_are_kept(key: str) -> None:
    assert run_redact(**{key: "card"})[key] == "card"


def test_url_passwords_and_secret_parameters_are_masked_in_any_text() -> None:
    assert redact_text(f"cannot connect to {DSN}: refused") == (
        "cannot connect to postgresql://ledger:***@db.internal:5432/ledger: refused"
    )
    assert redact_text("postgresql://u@/db?host=/tmp&password=hunter2&sslmode=off") == (
        "postgresql://u@/db?host=/tmp&password=***&sslmode=off"
    )
    # The embedded PostgreSQL's URL has no password: nothing to mask.
    assert redact_text("postgresql://postgres:@/postgres?host=/tmp/x") == (
        "postgresql://postgres:@/postgres?host=/tmp/x"
    )


def test_card_numbers_are_masked_but_amounts_and_ids_are_not() -> None:
    assert redact_text(f"charged {CARD} ok") == "charged [CARD ****1111] ok"
    assert redact_text("pan=4111111111111111") == "pan=[CARD ****1111]"
    assert redact_text("amount_minor 1234567890123") == "amount_minor 1234567890123"  # not Luhn
    assert redact_text("at 2026-03-14T09:30:00Z, order O-1001") == (
        "at 2026-03-14T09:30:00Z, order O-1001"
    )


# Texts made of what the patterns look for: digits and their separators, URL and DSN pieces.
_PIECES = st.sampled_from(
    ["4", "1", "0", "7", " ", "-", "://", "u:", "@", "=", "?", "&", "password", "token", "x", "é"]
)


@given(st.lists(_PIECES, max_size=40).map("".join))
@settings(max_examples=2000, deadline=None)
def test_the_quick_check_never_skips_a_text_the_patterns_would_change(text: str) -> None:
    assert redact_text(text) == _redact_all(text)


def test_nested_values_are_redacted() -> None:
    out = run_redact(context={"dsn": DSN, "note": f"card {CARD}"}, items=[DSN])
    assert out["context"] == {"dsn": REDACTED, "note": "card [CARD ****1111]"}
    assert out["items"] == ["postgresql://ledger:***@db.internal:5432/ledger"]


def test_sdk_extra_becomes_fields() -> None:
    record = logging.LogRecord("temporalio.workflow", logging.WARNING, "", 0, "parked", (), None)
    record.temporal_workflow = {"workflow_id": "cancel-O-1-S-7", "run_id": "r1", "attempt": 1}
    record.temporal_activity = {"activity_type": "submit_refund", "workflow_run_id": "r1"}
    record.__temporal_error_identifier = "x"  # type: ignore[attr-defined]
    record.reason = "card_closed"
    out = temporal_context(None, "warning", {"event": "parked", "_record": record})
    assert out["workflow_id"] == "cancel-O-1-S-7"
    assert out["run_id"] == "r1"
    assert out["workflow_attempt"] == 1
    assert out["activity"] == "submit_refund"
    assert out["reason"] == "card_closed"
    assert "temporal_workflow" not in out and "temporal_activity" not in out


def test_ids_of_reads_requests_and_models_holding_one() -> None:
    from domain.models import CancellationReason, OpenCancellationInput, RequestCancellationInput

    request = RequestCancellationInput(
        order_id="O-1", seller_id="S-7", buyer_id="B-1", reason=CancellationReason.OTHER
    )
    ids = {"order_id": "O-1", "seller_id": "S-7", "buyer_id": "B-1"}
    assert ids_of(request) == ids
    assert ids_of(OpenCancellationInput(cancellation_id="cancel-O-1-S-7", request=request)) == ids
    assert ids_of("not a model") == {}
    # The workflow's input is untyped: it arrives as the JSON object.
    assert ids_of(request.model_dump(mode="json")) == ids
    assert ids_of({"request": request.model_dump(mode="json")}) == ids
    assert ids_of({"order_id": 7, "request": "x"}) == {}


def test_configured_json_lines_have_fields_and_no_secrets() -> None:
    from temporalio import workflow

    with captured_logs() as logs:
        structlog.get_logger("ordercancel.test").info(
            "connecting", database_url=DSN, order_id="O-1", note=f"card {CARD}"
        )
        logging.getLogger("temporalio.workflow").warning(
            "refund parked in refund_failed: %s",
            "RefundRejected: card_closed",
            extra={"temporal_workflow": {"workflow_id": "cancel-O-1-S-7", "run_id": "r1"}},
        )
        try:
            raise RuntimeError(f"cannot connect to {DSN}")
        except RuntimeError:
            logging.getLogger("asyncpg").exception("pool failed")
        assert workflow.logger.workflow_info_on_message is False
    first, second, third = logs.lines()
    assert first["event"] == "connecting"
    assert first["database_url"] == REDACTED
    assert first["order_id"] == "O-1"
    assert first["note"] == "card [CARD ****1111]"
    assert second["event"] == "refund parked in refund_failed: RefundRejected: card_closed"
    assert (second["workflow_id"], second["run_id"]) == ("cancel-O-1-S-7", "r1")
    assert second["level"] == "warning"
    assert "s3cr3t-pw" not in third["exception"]
    assert "postgresql://ledger:***@db.internal" in third["exception"]
    assert "s3cr3t-pw" not in logs.text
    assert workflow.logger.workflow_info_on_message is True  # put back


def test_bound_context_variables_reach_stdlib_lines() -> None:
    with captured_logs() as logs:
        with structlog.contextvars.bound_contextvars(order_id="O-9", seller_id="S-9"):
            logging.getLogger("temporalio.activity").info("from the sdk")
    (line,) = logs.lines()
    assert (line["order_id"], line["seller_id"]) == ("O-9", "S-9")


def _fail(error: BaseException) -> None:
    try:
        raise error
    except BaseException:
        logging.getLogger("temporalio.activity").warning(
            "Completing activity as failed", exc_info=True
        )


def test_an_expected_activity_failure_is_one_line_and_an_unexpected_one_keeps_its_traceback() -> (
    None
):
    """The demo's provider outage (retried by the workflow) must not fill the console with
    tracebacks; a bug still shows where it happened."""
    with captured_logs("console", "info") as logs:
        _fail(ApplicationError("simulated provider unavailable (503)", type="ProviderUnavailable"))
    assert "Traceback" not in logs.text
    assert "ProviderUnavailable: simulated provider unavailable (503)" in logs.text
    assert len(logs.text.strip().splitlines()) == 1

    with captured_logs("json", "info") as logs:
        _fail(KeyError("no such column"))
    (line,) = logs.lines()
    assert "Traceback" in line["exception"] and "KeyError" in line["exception"]


def test_a_logger_used_before_a_reconfiguration_follows_it_and_its_level() -> None:
    """structlog caches a logger on first use: its lines still take the format, output and
    level configured later (the service's lines are written by structlog itself)."""
    log = structlog.get_logger("ordercancel.cached")
    with captured_logs("json", "info"):
        log.info("first use")
    with captured_logs("console", "warning") as logs:
        log.info("below the level")
        log.warning("in console format", order_id="O-3")
    assert "below the level" not in logs.text
    assert "in console format" in logs.text and "order_id=O-3" in logs.text
    assert not logs.text.lstrip().startswith("{")


def test_a_closed_output_does_not_fail_the_code_that_logs() -> None:
    import io

    from infra import logging as service_logging

    closed = io.StringIO()
    closed.close()
    with captured_logs():
        service_logging.OUTPUT.stream = closed
        structlog.get_logger("ordercancel.test").info("nowhere to go")  # no exception
