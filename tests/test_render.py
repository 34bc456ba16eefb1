"""What `ordercancel status` prints of a refund: an ETA only while the money is on its way."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from rich.console import Console

from cli.render import render_view
from domain.models import (
    CancellationReason,
    CancellationStatus,
    CancellationView,
    EtaRange,
    Money,
    RefundKind,
    RefundStage,
    RefundView,
)


def printed(stage: RefundStage) -> str:
    view = CancellationView(
        cancellation_id="cancel-O-1~S-1",
        order_id="O-1",
        seller_id="S-1",
        buyer_id="B-1",
        reason=CancellationReason.ORDERED_BY_MISTAKE,
        status=CancellationStatus.REFUND_FAILED,
        refund=RefundView(
            idempotency_key="cancel-O-1~S-1:refund-submit",
            kind=RefundKind.REFUND,
            amount=Money(amount_minor=1000, currency="EUR"),
            stage=stage,
            eta=EtaRange(
                earliest=datetime(2026, 12, 8, tzinfo=UTC),
                latest=datetime(2026, 12, 31, tzinfo=UTC),
            ),
        ),
        updated_at=datetime(2026, 12, 3, tzinfo=UTC),
    )
    out = io.StringIO()
    render_view(Console(file=out, width=200), view)
    return out.getvalue()


@pytest.mark.parametrize(
    "stage", [RefundStage.REQUESTED, RefundStage.SUBMITTED, RefundStage.FAILED]
)
def test_a_refund_on_its_way_shows_its_eta(stage: RefundStage) -> None:
    assert "ETA: between 2026-12-08 and 2026-12-31" in printed(stage)


@pytest.mark.parametrize(
    "stage", [RefundStage.CONFIRMED, RefundStage.DECLINED, RefundStage.REVERSED]
)
def test_an_arrived_declined_or_reversed_refund_shows_no_eta(stage: RefundStage) -> None:
    text = printed(stage)
    assert "ETA" not in text
    assert f"stage {stage.value}" in text
