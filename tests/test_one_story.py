"""`starter.cancellations.one_story`: the ledger's trail of every run with the running
workflow's unrecorded notes placed by the workflow's order, not by clock (issue 20.3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from domain.models import AuditEntry
from starter.cancellations import one_story

T0 = datetime(2026, 3, 14, tzinfo=UTC)


def rows(*kinds: str, start: datetime = T0) -> list[AuditEntry]:
    return [
        AuditEntry(at=start + timedelta(seconds=i), actor="system", kind=k)
        for i, k in enumerate(kinds)
    ]


def test_a_third_run_places_its_notes_after_the_latest_rows_of_their_kind() -> None:
    ledger = rows(
        "requested",
        "awaiting_seller",
        "approved",
        "refund_confirmed",
        "completed",
        "refund_reversed",
        "refund_retry",
        "refund_confirmed",
        "completed",
        # The provider's event is the ledger's too (`Ledger.story`, from `payment_events`).
        "payment_event",
        "refund_reversed",
    )
    # The third run's clock is ahead of the database's (a time-skipping server, or skew).
    notes = rows(
        "requested", "payment_event", "resumed", "refund_reversed", start=T0 + timedelta(days=9)
    )
    story = [e.kind for e in one_story(ledger, notes)]
    assert story == [
        "requested",
        "awaiting_seller",
        "approved",
        "refund_confirmed",
        "completed",
        "refund_reversed",
        "refund_retry",
        "refund_confirmed",
        "completed",
        "payment_event",
        "refund_reversed",
    ]


def test_notes_with_nothing_recorded_after_them_end_the_story() -> None:
    ledger = rows("requested", "awaiting_seller")
    notes = rows("requested", "awaiting_seller", "decision_accept")
    assert [e.kind for e in one_story(ledger, notes)] == [
        "requested",
        "awaiting_seller",
        "decision_accept",
    ]
