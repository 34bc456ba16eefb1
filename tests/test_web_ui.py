"""The Temporal Web UI as operations use it: a real dev server started with its UI, opened in
headless Chromium (Debian's `chromium`, driven by Playwright; no browser download).

A list query by `CancellationStatus` shows exactly the expected cancellations, and a
cancellation's page shows its summary and its current details. Skipped where no Chromium is
installed (`.ci/run` installs it).

`ORDERCANCEL_UPDATE_SCREENSHOT=1` rewrites docs/web-ui.png from this run.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from helpers.orders import fast_refund_settings, one_seller_order, orders_file, unique
from helpers.stacks import dev_server
from helpers.wait import eventually, listed
from temporalio.client import Client, WorkflowHandle

from domain.models import (
    CancellationReason,
    CancellationStatus,
    Decision,
    RequestCancellationInput,
    SellerDecision,
)
from infra.client import connect
from ledger.db import create_pool
from ledger.orders import load_orders, parse_orders_file
from starter.requests import start_cancellation
from workers.worker import build_worker
from workflows.order_cancellation import OrderCancellation
from workflows.visibility import STAGE_TEXT

CHROMIUM = os.environ.get("ORDERCANCEL_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "web-ui.png"
# docs/temporal-notes.md: what headless Chromium needs here (Playwright adds --headless and
# its own fresh profile directory).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)),
        reason=f"no Chromium at {CHROMIUM}: `apt-get install chromium` (Debian) to run the"
        " Web UI test, or set ORDERCANCEL_CHROMIUM",
    ),
]

Handle = WorkflowHandle[Any, Any]


@dataclass
class UI:
    base: str
    client: Client
    waiting: list[Handle]  # awaiting their seller: what the list query must show
    rejected: Handle


@pytest.fixture(scope="module")
async def ui(tmp_path_factory: pytest.TempPathFactory, e2e_database_url: str) -> AsyncIterator[UI]:
    """A dev server with its Web UI, the product's worker, three cancellations: two waiting for
    their seller, one rejected."""
    async with dev_server(tmp_path_factory.mktemp("temporal-ui"), ui=True) as server:
        assert server.ui_url is not None
        client = await connect(server.address)
        pool = await create_pool(e2e_database_url, min_size=1, max_size=5)
        task_queue = f"ui-{uuid.uuid4().hex[:8]}"
        seller, buyer = unique("S-UI"), unique("B-UI")
        orders = [f"O-UI{n}-{uuid.uuid4().hex[:4]}" for n in range(3)]
        await load_orders(
            pool,
            parse_orders_file(
                orders_file(
                    *(one_seller_order(o, buyer_id=buyer, seller_id=seller) for o in orders)
                )
            ),
        )
        try:
            async with build_worker(client, pool, fast_refund_settings(), task_queue=task_queue):
                handles = [
                    await start_cancellation(
                        client,
                        RequestCancellationInput(
                            order_id=o,
                            seller_id=seller,
                            buyer_id=buyer,
                            reason=CancellationReason.OUT_OF_STOCK,
                            reason_text="The blue one is out of stock",
                        ),
                        task_queue=task_queue,
                    )
                    for o in orders
                ]
                for handle in handles:
                    await eventually(lambda h=handle: _is_waiting(h))  # type: ignore[misc]
                await handles[2].execute_update(
                    OrderCancellation.decide,
                    SellerDecision(seller_id=seller, decision=Decision.REJECT, reason="shipped"),
                )
                await handles[2].result()
                yield UI(server.ui_url, client, handles[:2], handles[2])
        finally:
            await pool.close()


async def _is_waiting(handle: Handle) -> None:
    view = await handle.query(OrderCancellation.status)
    assert view.status is CancellationStatus.AWAITING_SELLER


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def test_list_query_by_status_shows_exactly_the_expected_cancellations(
    ui: UI, browser: Any
) -> None:
    query = 'CancellationStatus="awaiting_seller"'
    expected = {h.id for h in ui.waiting}

    async def visible() -> None:  # visibility is eventually consistent
        assert set(await listed(ui.client, query)) == expected

    await eventually(visible)
    page = await browser.new_page(viewport={"width": 1280, "height": 720})
    try:
        await page.goto(f"{ui.base}/namespaces/default/workflows?query={quote(query)}")
        for wid in expected:
            await page.get_by_text(wid, exact=True).first.wait_for(timeout=20_000)
        shown = await page.locator("body").inner_text()
        assert all(wid in shown for wid in expected), shown
        assert ui.rejected.id not in shown
        # Every workflow id on the page, whatever its cell: exactly the expected ones.
        links = await page.locator("a[href*='/workflows/cancel-']").evaluate_all(
            "els => els.map(e => decodeURIComponent(e.getAttribute('href')))"
        )
        ids = {href.split("/workflows/")[1].split("/")[0] for href in links}
        assert ids == expected, links
    finally:
        await page.close()


async def test_workflow_page_shows_summary_and_current_details(ui: UI, browser: Any) -> None:
    """The page's "User Metadata" tab: summary, details and current details, each Markdown
    rendered by the UI in a frame of its own."""
    handle = ui.waiting[0]
    desc = await handle.describe()
    summary = await desc.static_summary()
    assert summary
    headline = STAGE_TEXT[CancellationStatus.AWAITING_SELLER][0]
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        await page.goto(
            f"{ui.base}/namespaces/default/workflows/{handle.id}/{desc.run_id}/user-metadata"
        )
        shown_summary = page.frame_locator("#user-metadata-summary").get_by_text(summary)
        await shown_summary.wait_for(timeout=20_000)
        details = page.frame_locator("#user-metadata-details")
        await details.get_by_text("The blue one is out of stock").wait_for(timeout=20_000)
        current = page.frame_locator("#user-metadata-current-details")
        # Markdown: the headline is rendered in bold.
        await current.locator("strong", has_text=headline).wait_for(timeout=20_000)
        text = await current.locator("body").inner_text()
        assert "Next: the seller accepts or rejects" in text, text
        assert "then approved automatically" in text, text
        # The main area (no navigation sidebar): small enough to keep in the repository.
        screenshot = await page.screenshot(clip={"x": 272, "y": 64, "width": 992, "height": 720})
        assert screenshot.startswith(b"\x89PNG")
        if os.environ.get("ORDERCANCEL_UPDATE_SCREENSHOT"):
            SCREENSHOT.write_bytes(screenshot)
    finally:
        await page.close()


# What docs/observability.md (and the README) say the workflow list shows by default: Temporal's
# own columns, not the summary nor our search attributes.
DEFAULT_COLUMNS = ["Status", "Workflow ID", "Run ID", "Type", "Start", "End"]


async def test_the_workflow_list_shows_the_documented_default_columns(ui: UI, browser: Any) -> None:
    """The list as a new browser sees it (no column settings saved): the headers are the ones
    the docs name, and neither the summary nor a search attribute of ours is among them."""
    page = await browser.new_page(viewport={"width": 1600, "height": 900})
    try:
        await page.goto(f"{ui.base}/namespaces/default/workflows")
        await page.get_by_text(ui.rejected.id, exact=True).first.wait_for(timeout=20_000)
        headers = [
            " ".join(text.split())
            for text in await page.locator("table thead th").all_inner_texts()
        ]
        # The first header is the row-selection checkbox ("Select all Workflows"), no column.
        shown = [h for h in headers if h and not h.startswith("Select all")]
        assert shown == DEFAULT_COLUMNS, headers
        summary = await (await ui.rejected.describe()).static_summary()
        assert summary and summary not in await page.locator("table").inner_text()
    finally:
        await page.close()
