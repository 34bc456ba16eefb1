"""The invariants a chaos run must keep, read from three independent places once it is over: the
ledger (PostgreSQL), the payment provider's own records (`provider_sim`) and Temporal (describe,
visibility, histories). Each check counts what it looked at and lists every violation with what
is needed to find it again (workflow id, payment, keys).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHistory,
)

from domain.models import CancellationStatus
from domain.rules import cancellation_id
from payments.provider import SimulatedProvider
from starter.reconcile import reconcile
from tools.chaos.driver import persist
from tools.chaos.hostile import INTRUDER_BUYER, HostileStats
from tools.chaos.plan import OTHER, OWN, CancellationPlan, OrderPlan, Plan
from workflows import search_attributes as sa

# A workflow task the server failed for reasons that are not the workflow's: a signal or an
# update arrived while the task ran (the worker retries with it), or a sticky queue reset.
BENIGN_TASK_FAILURES = {
    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND,
    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_RESET_STICKY_TASK_QUEUE,
}

_OWN_KEY = re.compile(r"^(\d{3})-")
TERMINAL_KIND = {
    CancellationStatus.COMPLETED.value: "completed",
    CancellationStatus.REJECTED.value: "rejected",
    CancellationStatus.WITHDRAWN.value: "withdrawn",
}
# Audit rows a cancellation's own run writes that are not state transitions: refused signals
# may be written after the end (the workflow waits for them before it returns).
_SIDE_KINDS = (
    "seller_decision_refused",
    "withdraw_refused",
    "payment_event_refused",
    "refusals_counted",
)
_PARKS = ("refund_failed", "refund_declined", "refund_reversed")
LIVE_STAGES = ("requested", "submitted", "confirmed", "failed")
# What no audit row may carry (R20): C0 and C1 controls but newline and tab, lone surrogates.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
REFUSALS_RECORDED = 20  # the first refused signals written to the audit trail (R20)


@dataclass
class Invariant:
    name: str
    meaning: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.violations.append(message)


@dataclass
class Final:
    """Where one cancellation ended, in Temporal and in the ledger."""

    plan: CancellationPlan
    execution: str | None  # Temporal execution status of the latest run (None: not found)
    status_attr: str | None
    ledger_status: str | None
    path: str | None
    # (OrderId, SellerId, BuyerId) search attributes of that run (None: not described).
    attrs: tuple[str | None, str | None, str | None] | None = None

    @property
    def parked(self) -> bool:
        return (
            self.execution == WorkflowExecutionStatus.RUNNING.name
            and self.status_attr == CancellationStatus.REFUND_FAILED.value
        )


@dataclass
class CheckResult:
    invariants: list[Invariant]
    finals: dict[str, Final]
    task_failures: Counter[str]
    runs: int

    @property
    def violations(self) -> int:
        return sum(len(i.violations) for i in self.invariants)


def refund_owner(idempotency_key: str) -> str:
    """`cancel-…:refund-submit[-N]` -> `cancel-…` (R9's deterministic keys)."""
    return idempotency_key.split(":refund-submit", 1)[0]


def workflow_task_failures(history: WorkflowHistory) -> list[str]:
    """Causes of the workflow task failures in a history that are the workflow's own."""
    found = []
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            cause = event.workflow_task_failed_event_attributes.cause
            if cause not in BENIGN_TASK_FAILURES:
                message = event.workflow_task_failed_event_attributes.failure.message
                found.append(f"{WorkflowTaskFailedCause.Name(cause)}: {message[:300]}")
    return found


async def _describe_all(
    client: Client, ids: Iterable[str], runs: dict[str, str] | None = None
) -> dict[str, WorkflowExecutionDescription | None]:
    """The latest run of each, or the run `runs` names (the one that decided it, when a client
    started another run of an ended cancellation)."""
    gate = asyncio.Semaphore(16)
    runs = runs or {}

    async def one(workflow_id: str) -> tuple[str, WorkflowExecutionDescription | None]:
        async with gate:
            try:
                handle = client.get_workflow_handle(workflow_id, run_id=runs.get(workflow_id))
                return workflow_id, await persist(f"describe {workflow_id}", handle.describe)
            except Exception:
                return workflow_id, None

    return dict(await asyncio.gather(*(one(i) for i in ids)))


async def check_run(
    plan: Plan,
    probes_used: list[OrderPlan],
    *,
    client: Client,
    pool: asyncpg.Pool,
    task_queue: str,
    hostile: HostileStats | None = None,
) -> CheckResult:
    orders = [*plan.orders, *probes_used]
    cancellations = [c for o in orders for c in o.cancellations]
    by_id = {c.workflow_id: c for c in cancellations}
    ids = list(by_id)
    order_ids = [o.order_id for o in orders]
    payments = [o.payment_id for o in orders]

    async def fetch(sql: str, *args: Any) -> list[asyncpg.Record]:
        return await persist("read the ledger", lambda: pool.fetch(sql, *args))

    ledger_rows = {
        r["cancellation_id"]: r
        for r in await fetch(
            """
            SELECT c.cancellation_id, c.order_id, c.seller_id, c.buyer_id,
                   c.status, c.path, s.cash_minor, s.status AS sub_status,
                   p.payment_id, p.capture, p.currency
            FROM cancellations c
            JOIN sub_orders s ON s.order_id = c.order_id AND s.seller_id = c.seller_id
            JOIN payments p ON p.order_id = c.order_id
            WHERE c.order_id = ANY($1::text[])
            """,
            order_ids,
        )
    }
    refunds: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for r in await fetch(
        "SELECT * FROM refunds WHERE cancellation_id = ANY($1::text[]) ORDER BY generation", ids
    ):
        refunds[r["cancellation_id"]].append(r)
    at_provider: dict[str, list[asyncpg.Record]] = defaultdict(list)
    provider_by_payment: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for r in await fetch(
        "SELECT * FROM provider_sim.refunds WHERE payment_id = ANY($1::text[]) ORDER BY created_at",
        payments,
    ):
        at_provider[refund_owner(r["idempotency_key"])].append(r)
        provider_by_payment[r["payment_id"]].append(r)
    events: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for r in await fetch(
        "SELECT cancellation_id, event_id, event_key, kind, actor, detail FROM cancellation_events"
        " WHERE cancellation_id = ANY($1::text[]) ORDER BY event_id",
        ids,
    ):
        events[r["cancellation_id"]].append(r)
    payment_rows = {
        r["payment_id"]: r
        for r in await fetch(
            "SELECT payment_id, amount_minor, refunded_minor FROM payments"
            " WHERE payment_id = ANY($1::text[])",
            payments,
        )
    }
    hostile = hostile or HostileStats()
    described = await _describe_all(client, ids, hostile.deciding_runs)

    finals: dict[str, Final] = {}
    for wid, c in by_id.items():
        d = described.get(wid)
        row = ledger_rows.get(wid)
        finals[wid] = Final(
            plan=c,
            execution=d.status.name if d is not None and d.status is not None else None,
            status_attr=(
                d.typed_search_attributes.get(sa.CANCELLATION_STATUS) if d is not None else None
            ),
            ledger_status=row["status"] if row is not None else None,
            path=row["path"] if row is not None else None,
            attrs=(
                (
                    d.typed_search_attributes.get(sa.ORDER_ID),
                    d.typed_search_attributes.get(sa.SELLER_ID),
                    d.typed_search_attributes.get(sa.BUYER_ID),
                )
                if d is not None
                else None
            ),
        )

    # --- none lost; terminal or parked with a reason; as planned; ledger = Temporal ---------
    lost = Invariant("none lost", "every requested cancellation is in Temporal and the ledger")
    settled = Invariant(
        "terminal or parked",
        "each ended (completed, rejected, withdrawn) or waits in refund_failed with its reason",
    )
    planned = Invariant("outcome as planned", "the path's expected ending (parked ones aside)")
    agree = Invariant(
        "ledger = Temporal", "ledger status = the workflow's CancellationStatus attribute"
    )
    for wid, f in finals.items():
        lost.checked += 1
        if f.execution is None or f.ledger_status is None:
            lost.fail(f"{wid}: Temporal {f.execution}, ledger {f.ledger_status}")
            continue
        settled.checked += 1
        agree.checked += 1
        if f.ledger_status != f.status_attr:
            agree.fail(f"{wid}: ledger {f.ledger_status}, Temporal {f.status_attr}")
        if f.parked:
            last = refunds[wid][-1] if refunds[wid] else None
            if last is None or not last["last_error"]:
                settled.fail(f"{wid}: parked in refund_failed without a recorded reason")
            continue
        if f.execution != WorkflowExecutionStatus.COMPLETED.name:
            settled.fail(f"{wid}: execution {f.execution}, status {f.status_attr} (stuck)")
            continue
        if f.status_attr not in TERMINAL_KIND:
            settled.fail(f"{wid}: closed in non-terminal status {f.status_attr}")
            continue
        planned.checked += 1
        if f.status_attr != f.plan.expect.value:
            planned.fail(
                f"{wid} ({f.plan.scenario.value}): {f.status_attr}, planned {f.plan.expect.value}"
            )

    # --- exactly one refund, of the right amount, at the provider and in the ledger --------
    once = Invariant(
        "refunded exactly once",
        "one `succeeded` provider refund per approved cancellation, none otherwise",
    )
    amount = Invariant("right amount", "that refund = the sub-order's cash, kind and payment")
    ledger_once = Invariant(
        "one live refund in the ledger",
        "one confirmed refund (its key = the provider's), older generations dead",
    )
    for wid, f in finals.items():
        row = ledger_rows.get(wid)
        if row is None or f.parked:
            continue
        theirs = at_provider[wid]
        ours = refunds[wid]
        once.checked += 1
        ledger_once.checked += 1
        succeeded = [p for p in theirs if p["status"] == "succeeded"]
        if f.status_attr == CancellationStatus.COMPLETED.value:
            if len(succeeded) != 1:
                once.fail(
                    f"{wid}: {len(succeeded)} succeeded provider refunds"
                    f" ({[(p['idempotency_key'], p['status']) for p in theirs]})"
                )
            confirmed = [r for r in ours if r["stage"] == "confirmed"]
            others = [r["stage"] for r in ours if r["stage"] != "confirmed"]
            if len(confirmed) != 1 or any(s not in ("declined", "reversed") for s in others):
                ledger_once.fail(f"{wid}: ledger refunds {[r['stage'] for r in ours]}")
            elif succeeded and confirmed[0]["idempotency_key"] != succeeded[0]["idempotency_key"]:
                ledger_once.fail(
                    f"{wid}: ledger confirmed {confirmed[0]['idempotency_key']}, provider"
                    f" succeeded {succeeded[0]['idempotency_key']}"
                )
            for p in succeeded:
                amount.checked += 1
                kind = "void" if row["capture"] == "authorized" else "refund"
                got = (p["amount_minor"], p["payment_id"], p["kind"], p["currency"].strip())
                want = (row["cash_minor"], row["payment_id"], kind, row["currency"].strip())
                if got != want:
                    amount.fail(
                        f"{wid}: provider (amount, payment, kind, currency) {got}, want {want}"
                    )
        else:
            if theirs or ours:
                once.fail(
                    f"{wid} ended {f.status_attr} but has refunds: provider"
                    f" {[p['status'] for p in theirs]}, ledger {[r['stage'] for r in ours]}"
                )

    # --- never more than captured, ledger and provider side --------------------------------
    capped = Invariant(
        "refunded ≤ captured",
        "per payment: provider succeeded total and ledger reservation ≤ amount, and equal",
    )
    parked_payments = {
        ledger_rows[w]["payment_id"] for w, f in finals.items() if f.parked and w in ledger_rows
    }
    for payment_id, p in payment_rows.items():
        capped.checked += 1
        paid_back = sum(
            r["amount_minor"] for r in provider_by_payment[payment_id] if r["status"] == "succeeded"
        )
        if paid_back > p["amount_minor"]:
            capped.fail(f"{payment_id}: provider refunded {paid_back} of {p['amount_minor']}")
        if not 0 <= p["refunded_minor"] <= p["amount_minor"]:
            capped.fail(
                f"{payment_id}: ledger refunded_minor {p['refunded_minor']} of {p['amount_minor']}"
            )
        if payment_id not in parked_payments and p["refunded_minor"] != paid_back:
            capped.fail(
                f"{payment_id}: ledger says {p['refunded_minor']} refunded, provider {paid_back}"
            )

    # --- coupons ---------------------------------------------------------------------------
    coupons = Invariant(
        "coupon iff footprint refunded",
        "restored ⇔ every footprint sub-order cancelled, fully refunded, coupon not expired",
    )
    twice = Invariant("coupon never twice", "at most one standing restoration per coupon")
    redemptions = {
        r["redemption_id"]: r
        for r in await fetch(
            "SELECT redemption_id, order_id, expires_at, restored_at, restored_by"
            " FROM coupon_redemptions WHERE order_id = ANY($1::text[])",
            order_ids,
        )
    }
    standing: Counter[str] = Counter()
    for r in await fetch(
        "SELECT redemption_id, cancellation_id FROM coupon_decisions"
        " WHERE redemption_id = ANY($1::text[]) AND performed_restore AND superseded_at IS NULL",
        list(redemptions),
    ):
        standing[r["redemption_id"]] += 1
    confirmed_cash = {
        wid: any(
            r["stage"] == "confirmed" and r["amount_minor"] == ledger_rows[wid]["cash_minor"]
            for r in refunds[wid]
        )
        for wid in ledger_rows
    }
    for order in orders:
        for coupon in order.coupons:
            coupons.checked += 1
            twice.checked += 1
            red = redemptions.get(coupon.redemption_id)
            if red is None:
                coupons.fail(f"{coupon.redemption_id}: not in the ledger")
                continue
            footprint_done = all(
                confirmed_cash.get(cancellation_id(order.order_id, seller), False)
                and ledger_rows[cancellation_id(order.order_id, seller)]["sub_status"]
                == "cancelled"
                for seller in coupon.footprint
            )
            due = footprint_done and not coupon.expired
            restored = red["restored_at"] is not None
            if restored != due:
                coupons.fail(
                    f"{coupon.redemption_id}: restored {restored}, footprint fully refunded"
                    f" {footprint_done}, expired {coupon.expired}"
                )
            busy = any(
                finals[cancellation_id(order.order_id, s)].parked
                for s in coupon.footprint
                if cancellation_id(order.order_id, s) in finals
            )
            if not busy and restored != coupon.expect_restored:
                coupons.fail(
                    f"{coupon.redemption_id} ({order.scenario.value}): restored {restored},"
                    f" planned {coupon.expect_restored}"
                )
            if standing[coupon.redemption_id] > 1 or standing[coupon.redemption_id] != int(
                restored
            ):
                twice.fail(
                    f"{coupon.redemption_id}: {standing[coupon.redemption_id]} standing"
                    f" restorations, restored_at {red['restored_at']}"
                )

    # --- audit trail -----------------------------------------------------------------------
    audit = Invariant(
        "audit complete and in order",
        "`requested` first, the path, every park answered by a retry, the ending last",
    )
    for wid, f in finals.items():
        if f.ledger_status is None:
            continue
        audit.checked += 1
        trail = events[wid]
        keys = [e["event_key"] for e in trail]
        kinds = [e["kind"] for e in trail]
        problems = []
        if len(set(keys)) != len(keys):
            problems.append("an event key twice")
        if not trail or (keys[0], kinds[0]) != ("000-requested", "requested"):
            problems.append(f"first event {keys[:1]}")
        path_kind = "cancelled_instantly" if f.path == "instant" else "awaiting_seller"
        if ("001-path", path_kind) not in zip(keys, kinds, strict=True):
            problems.append(f"no 001-path {path_kind}")
        own = [
            (e["event_key"], e["kind"])
            for e in trail
            if _OWN_KEY.match(e["event_key"]) and e["kind"] not in _SIDE_KINDS
        ]
        if not f.parked:
            ending = TERMINAL_KIND.get(f.ledger_status or "")
            if not own or own[-1][1] != ending:
                problems.append(f"last transition {own[-1:]} (ending {ending})")
            # A reversal reopens a completed cancellation, which then completes again.
            endings = 1 + (kinds.count("refund_reversed") if ending == "completed" else 0)
            if kinds.count(ending or "?") != endings:
                problems.append(f"{kinds.count(ending or '?')} `{ending}` events, ending {endings}")
            parks = sum(kinds.count(k) for k in _PARKS)
            if kinds.count("refund_retry") != parks:
                problems.append(f"{parks} parks but {kinds.count('refund_retry')} refund_retry")
            generations = len(refunds[wid])
            if kinds.count("refund_requested") != generations:
                problems.append(
                    f"{generations} refund generations but {kinds.count('refund_requested')}"
                    " refund_requested events"
                )
            if f.ledger_status == CancellationStatus.COMPLETED.value:
                for needed in ("refund_submitted", "refund_confirmed"):
                    if needed not in kinds:
                        problems.append(f"no {needed}")
                if not any(k.startswith("coupon_") for k in kinds):
                    problems.append("no coupon decision")
        if problems:
            audit.fail(
                f"{wid}: {'; '.join(problems)} — trail {list(zip(keys, kinds, strict=True))}"
            )

    # --- the ledger agrees with the provider (ordercancel reconcile) ----------------------
    recon = Invariant(
        "reconcile clean",
        "`ordercancel reconcile` finds no mismatch between ledger and provider",
    )
    report = await persist(
        "reconcile", lambda: reconcile(pool, SimulatedProvider(pool)), attempt_timeout=120
    )
    recon.checked = report.ledger_refunds
    for finding in report.findings:
        if finding.cancellation_id is None or finding.cancellation_id in by_id:
            recon.fail(
                f"{finding.kind.value} {finding.idempotency_key}: {finding.detail}"
                f" (ledger stage {finding.ledger.stage.value if finding.ledger else None})"
            )

    # --- Temporal: visibility and histories ------------------------------------------------
    visible = Invariant(
        "visibility agrees",
        "listing by task queue finds every cancellation with its final status",
    )
    tasks = Invariant(
        "no workflow task failures", "no history has a workflow task failed by its code"
    )
    # Visibility is eventually consistent: a few seconds' lag is not a finding.
    for attempt in range(8):
        runs = await persist(
            "list workflows",
            lambda: _list_runs(client, f'TaskQueue="{task_queue}"'),
            attempt_timeout=120,
        )
        latest: dict[str, Any] = {}
        for execution in runs:
            known = latest.get(execution.id)
            deciding = hostile.deciding_runs.get(execution.id)
            if deciding is not None:
                if execution.run_id == deciding:
                    latest[execution.id] = execution
            elif known is None or execution.start_time > known.start_time:
                latest[execution.id] = execution
        mismatches = []
        for wid, f in finals.items():
            seen = latest.get(wid)
            if seen is None:
                mismatches.append(f"{wid}: not listed")
                continue
            attr = seen.typed_search_attributes.get(sa.CANCELLATION_STATUS)
            listed = seen.status.name if seen.status else None
            if attr != f.status_attr or listed != f.execution:
                mismatches.append(
                    f"{wid}: listed {listed} {attr}, described {f.execution} {f.status_attr}"
                )
        if not mismatches or attempt == 7:
            break
        await asyncio.sleep(2)
    visible.checked = len(finals)
    for mismatch in mismatches:
        visible.fail(mismatch)
    failures: Counter[str] = Counter()
    gate = asyncio.Semaphore(12)

    async def history_of(workflow_id: str, run_id: str) -> None:
        async with gate:
            handle = client.get_workflow_handle(workflow_id, run_id=run_id)
            history = await persist(f"history {workflow_id}", handle.fetch_history)
        tasks.checked += 1
        for failure in workflow_task_failures(history):
            failures[failure.split(":", 1)[0]] += 1
            tasks.fail(f"{workflow_id} run {run_id}: {failure}")

    await asyncio.gather(*(history_of(e.id, e.run_id) for e in runs))

    hostile_checks = await _hostile_invariants(
        client, orders, by_id, finals, ledger_rows, events, hostile, fetch
    )
    return CheckResult(
        invariants=[
            lost,
            settled,
            planned,
            agree,
            once,
            amount,
            ledger_once,
            capped,
            coupons,
            twice,
            audit,
            recon,
            visible,
            tasks,
            *hostile_checks,
        ],
        finals=finals,
        task_failures=failures,
        runs=len(runs),
    )


async def _list_runs(client: Client, query: str) -> list[Any]:
    return [e async for e in client.list_workflows(query)]


async def _hostile_invariants(
    client: Client,
    orders: list[OrderPlan],
    by_id: dict[str, CancellationPlan],
    finals: dict[str, Final],
    ledger_rows: dict[str, asyncpg.Record],
    events: dict[str, list[asyncpg.Record]],
    hostile: HostileStats,
    fetch: Any,
) -> list[Invariant]:
    """What hostile input (tools.chaos.hostile) must not have done: take effect, go uncounted,
    put a control character in the audit trail, merge two sub-orders or adopt another buyer's
    cancellation, change an ended one. (Nothing wedged, lost or paid twice: the invariants
    above, which cover the hostile cancellations too.)"""
    refused = Invariant(
        "hostile input refused",
        "hostile updates refused with a code; hostile signals counted (`refused_messages`),"
        " the first 20 in the audit trail",
    )
    for text in hostile.taken:
        refused.fail(text)
    gate = asyncio.Semaphore(8)

    async def view_of(wid: str) -> dict[str, Any] | None:
        async with gate:
            handle = client.get_workflow_handle(wid, run_id=hostile.deciding_runs.get(wid))
            try:
                view: dict[str, Any] = await persist(
                    f"status of {wid}", lambda: handle.query("status", result_type=dict)
                )
            except Exception:
                return None
            return view

    targets = [wid for wid, c in by_id.items() if c.hostile is not None and wid in ledger_rows]
    views = dict(zip(targets, await asyncio.gather(*(view_of(w) for w in targets)), strict=True))
    for wid in targets:
        plan = by_id[wid].hostile
        assert plan is not None
        refused.checked += 1
        view = views[wid]
        if view is None:
            refused.fail(f"{wid}: the status query did not answer")
            continue
        counted = int(view.get("refused_messages", 0))
        kinds = [e["kind"] for e in events[wid]]
        recorded = sum(k.endswith("_refused") for k in kinds)
        if counted < plan.counted_signals:
            refused.fail(f"{wid}: {counted} refused messages counted, {plan.counted_signals} sent")
        if recorded != min(counted, REFUSALS_RECORDED):
            refused.fail(f"{wid}: {recorded} refusals in the audit trail, {counted} counted")
        if ("refusals_counted" in kinds) != (counted > REFUSALS_RECORDED):
            refused.fail(
                f"{wid}: {counted} refused, refusals_counted rows {kinds.count('refusals_counted')}"
            )

    clean = Invariant(
        "no control character in the audit",
        "no audit row of the run (actor, kind, detail) holds a C0/C1 control or a lone surrogate",
    )
    for wid, trail in events.items():
        for e in trail:
            clean.checked += 1
            for column in ("actor", "kind", "detail"):
                if CONTROL.search(e[column] or ""):
                    clean.fail(f"{wid} {e['event_key']}: {column} {e[column][:80]!r}")

    one = Invariant(
        "one workflow per sub-order",
        "each workflow id, its ledger row and its attributes name its own sub-order and buyer;"
        " no other cancellation of the run's orders",
    )
    for wid, c in by_id.items():
        row = ledger_rows.get(wid)
        f = finals[wid]
        if row is None:
            continue
        one.checked += 1
        want = (c.order_id, c.seller_id, c.buyer_id)
        got = (row["order_id"], row["seller_id"], row["buyer_id"])
        if got != want or cancellation_id(row["order_id"], row["seller_id"]) != wid:
            one.fail(f"{wid}: ledger names {got}, planned {want}")
        if f.attrs is not None and f.attrs != want:
            one.fail(f"{wid}: attributes name {f.attrs}, planned {want}")
    for r in await fetch(
        "SELECT cancellation_id, order_id, seller_id, buyer_id FROM cancellations"
        " WHERE order_id = ANY($1::text[])",
        [o.order_id for o in orders],
    ):
        if r["cancellation_id"] not in by_id:
            one.fail(f"{r['cancellation_id']}: not requested by the run ({tuple(r)})")

    again = Invariant(
        "starting again changes nothing",
        "`temporal workflow start` of a running one refused; of an ended one, a run that"
        " reports it (its buyer) or fails SubOrderNotFound (another buyer)",
    )
    again.checked += hostile.cli_starts_running
    for text in hostile.restarted:
        again.fail(text)
    for echo in hostile.echo_runs:
        again.checked += 1
        expected = "completed" if echo.buyer == OWN else "failed: SubOrderNotFound"
        if echo.outcome != expected:
            again.fail(f"{echo.workflow_id} run {echo.run_id} ({echo.buyer}): {echo.outcome}")
        if echo.buyer == OTHER:
            described = await _describe_all(
                client, [echo.workflow_id], {echo.workflow_id: echo.run_id}
            )
            d = described.get(echo.workflow_id)
            if d is not None and d.typed_search_attributes.get(sa.BUYER_ID) == INTRUDER_BUYER:
                again.fail(f"{echo.workflow_id} run {echo.run_id}: shows the intruder as buyer")
    return [refused, clean, one, again]
