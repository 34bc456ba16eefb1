"""One chaos run, start to finish: servers up, orders loaded, faults planned; cancellations
requested over the start window while the fault loop runs; then the faults stop, the provider
is fixed, an operator retries what is parked (starter/refunds.py), everything settles, and the
invariants are checked. Everything it started is stopped before it returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from temporalio.client import Client
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

from domain.models import CancellationStatus
from infra.client import connect
from ledger.db import create_pool
from ledger.orders import load_orders, parse_orders_file
from ledger.policies import set_policy
from payments.provider import SimulatedProvider
from tools.chaos import DEFAULT_COUNT
from tools.chaos.checks import CheckResult, check_run
from tools.chaos.driver import Driver, DriverStats, persist
from tools.chaos.faults import FaultKind, FaultLog, FaultLoop, MidCallKill, bulk_retry
from tools.chaos.hostile import HostileSender
from tools.chaos.plan import FaultMix, Plan, Scenario, make_plan
from tools.chaos.stack import ChaosStack
from workflows import search_attributes as sa


@dataclass
class ChaosConfig:
    count: int = DEFAULT_COUNT
    seed: int | None = None
    # Cancellations requested per second; the start window is count / rate (at least 30 s).
    start_rate: float = 2.0
    # Faults go on at least this long after the start window (and stop by max_fault_seconds).
    fault_tail: float = 30.0
    max_fault_seconds: float | None = None
    fault_gap: tuple[float, float] = (2.0, 6.0)
    # After the faults: how long everything may take to end or park, per retry round.
    settle_timeout: float = 240.0
    recovery_limit: float = 120.0
    retry_rounds: int = 4
    # Provider faults for every call (global) on top of the per-payment ones.
    transient_rate: float = 0.05
    latency: str = "100ms"
    probes: int = 24
    # Per-payment provider faults: the share of payments that get each.
    fault_mix: FaultMix = field(default_factory=FaultMix)
    driver_concurrency: int = 48
    # Share of the single-seller cancellations awaiting their seller that also get hostile
    # input (control characters, oversized text, wrong ids, malformed payloads, CLI starts and
    # duplicate decisions: tools.chaos.hostile). 0 for none.
    hostile_share: float = 0.35
    data_dir: Path | None = None
    keep: bool = False


@dataclass
class PathRow:
    path: str
    cancellations: int = 0
    completed: int = 0
    rejected: int = 0
    withdrawn: int = 0
    parked: int = 0
    other: int = 0
    refund_generations_2plus: int = 0
    coupons_restored: int = 0


@dataclass
class FaultRow:
    kind: str
    count: int
    detail: str


@dataclass
class InvariantRow:
    name: str
    meaning: str
    checked: int
    violations: int


@dataclass
class ChaosReport:
    seed: int
    count: int
    tag: str
    seconds: float
    phases: dict[str, float]
    faults: list[FaultRow]
    paths: list[PathRow]
    invariants: list[InvariantRow]
    violations: list[str]
    data_dir: str | None
    workflow_runs: int = 0
    operator_retries: list[str] = field(default_factory=list)
    # Hostile input sent (kind, count, what came of it).
    hostile: list[FaultRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fault_counts(self) -> dict[str, int]:
        return {row.kind: row.count for row in self.faults}

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)


def worker_env(config: ChaosConfig) -> dict[str, str]:
    """The workers' configuration: fast refund timings (a run lasts minutes, not days) and the
    simulator's global faults."""
    return {
        "ORDERCANCEL_SIM_TRANSIENT_RATE": str(config.transient_rate),
        "ORDERCANCEL_SIM_LATENCY": config.latency,
        "ORDERCANCEL_SIM_CONFIRM_AFTER_POLLS": "1",
        "ORDERCANCEL_REFUND_POLL_INTERVAL": "500ms",
        "ORDERCANCEL_SELLER_RESPONSE_WINDOW_FLOOR": "1s",
        "ORDERCANCEL_REFUND_POLL_MAX_INTERVAL": "2s",
        "ORDERCANCEL_REFUND_SUBMIT_INITIAL_INTERVAL": "200ms",
        "ORDERCANCEL_REFUND_SUBMIT_MAX_INTERVAL": "2s",
        "ORDERCANCEL_REFUND_SUBMIT_MAX_ATTEMPTS": "6",
        "ORDERCANCEL_DB_POOL_MIN": "2",
        "ORDERCANCEL_DB_POOL_MAX": "10",
        "ORDERCANCEL_LOG_LEVEL": "info",
    }


async def _load(pool: asyncpg.Pool, plan: Plan) -> None:
    documents = [o.document for o in plan.all_orders()]
    for i in range(0, len(documents), 500):
        text = json.dumps({"orders": documents[i : i + 500]})
        await load_orders(pool, parse_orders_file(text))
    # R19: the timed-out scenarios' windows are their sellers' policies.
    windows = {c.seller_id: c.window for c in plan.cancellations() if c.window is not None}
    for seller_id, window in windows.items():
        await set_policy(pool, seller_id=seller_id, response_window=window, floor=window)
    provider = SimulatedProvider(pool)
    for order in plan.all_orders():
        if order.faults is not None:
            await provider.set_faults(order.payment_id, order.faults)


async def _running(client: Client, task_queue: str) -> dict[str, str | None]:
    query = f'TaskQueue="{task_queue}" AND ExecutionStatus="Running"'
    return {
        e.id: e.typed_search_attributes.get(sa.CANCELLATION_STATUS)
        async for e in client.list_workflows(query)
    }


async def settle(
    client: Client, task_queue: str, *, within: float, say: Callable[[str], None]
) -> list[str]:
    """Wait until every cancellation of the run has ended or parked in refund_failed; the
    ids still busy after `within` seconds (described, not only listed) are returned."""
    deadline = time.monotonic() + within
    last = -1
    while True:
        running = await persist("list running", lambda: _running(client, task_queue))
        busy = sorted(i for i, s in running.items() if s != CancellationStatus.REFUND_FAILED.value)
        if len(busy) != last:
            say(f"  {len(busy)} cancellations still moving, {len(running) - len(busy)} parked")
            last = len(busy)
        if not busy:
            # Visibility may lag: confirm with the workflows themselves.
            confirmed = []
            for workflow_id in running:
                described = await persist(
                    "describe", client.get_workflow_handle(workflow_id).describe
                )
                status = described.typed_search_attributes.get(sa.CANCELLATION_STATUS)
                if status != CancellationStatus.REFUND_FAILED.value:
                    confirmed.append(workflow_id)
            if not confirmed:
                return []
        if time.monotonic() > deadline:
            return busy
        await asyncio.sleep(2)


async def _clear_faults(pool: asyncpg.Pool, payments: list[str]) -> None:
    """The provider is fixed (the card replaced, the outage over): no more injected faults."""
    await pool.execute(
        "UPDATE provider_sim.faults SET transient_failures = 0, lose_response = false,"
        " final_failure = NULL, confirm_after_polls = 0, fail_after_success = false"
        " WHERE payment_id = ANY($1::text[])",
        payments,
    )
    # Nor will a refund that has not failed yet fail later: `fail_after_success` is also stamped
    # on each refund made while the fault was set (a second generation made by the bulk retry
    # during faults, say), and `ordercancel reconcile` reads confirmed refunds again, which
    # would flip them into reversals the plan never sent.
    await pool.execute(
        "UPDATE provider_sim.refunds SET fail_after_success = false"
        " WHERE payment_id = ANY($1::text[]) AND status <> 'failed'",
        payments,
    )


async def _provider_fault_counts(
    pool: asyncpg.Pool, plan: Plan
) -> dict[FaultKind, tuple[int, str]]:
    """Provider faults that actually happened, from the provider's own records (before they
    are cleared)."""
    lost_planned = [o.payment_id for o in plan.all_orders() if o.faults and o.faults.lose_response]
    calls = {
        (r["operation"], r["outcome"]): r["n"]
        for r in await pool.fetch(
            "SELECT operation, outcome, count(*) AS n FROM provider_sim.calls GROUP BY 1, 2"
        )
    }
    lost = await pool.fetchval(
        "SELECT count(*) FROM provider_sim.faults f WHERE payment_id = ANY($1::text[])"
        " AND NOT lose_response AND EXISTS (SELECT 1 FROM provider_sim.calls c"
        " WHERE c.payment_id = f.payment_id AND c.outcome IN ('created', 'replayed'))",
        lost_planned,
    )
    replayed = calls.get(("create_refund", "replayed"), 0)
    return {
        FaultKind.PROVIDER_TRANSIENT: (
            calls.get(("create_refund", "transient"), 0),
            "calls refused before anything was recorded; retried with the same key",
        ),
        FaultKind.PROVIDER_LOST_RESPONSE: (
            int(lost or 0),
            f"refund recorded, answer lost; {replayed} retries found the existing refund",
        ),
        FaultKind.PROVIDER_PENDING: (
            calls.get(("get_refund", "pending"), 0),
            "confirmation asked again on a durable timer",
        ),
        FaultKind.PROVIDER_FINAL: (
            calls.get(("create_refund", "final"), 0),
            f"refused for good ({'card_declined'}): parked, declined, new generation on retry",
        ),
    }


def _global_timeouts(stack: ChaosStack) -> int:
    """Provider calls failed by the global transient rate (they leave no provider record; the
    workers log each failed attempt)."""
    total = 0
    for worker in stack.workers:
        try:
            text = worker.log.read_text(errors="replace")
        except OSError:
            continue
        # One log line per failed attempt (the message recurs in its traceback).
        total += sum(1 for line in text.splitlines() if "simulated provider timeout" in line)
    return total


async def _mid_call_cut(client: Client, kills: list[MidCallKill]) -> int:
    """Kills that cut a provider call: the history shows the call ran again afterwards."""
    cut = 0
    for kill in kills:
        handle = client.get_workflow_handle(kill.workflow_id, run_id=kill.run_id)
        history = await persist("history", handle.fetch_history)
        scheduled = None
        for event in history.events:
            attrs = event.activity_task_scheduled_event_attributes
            if event.HasField("activity_task_scheduled_event_attributes") and (
                attrs.activity_id == kill.activity_id
            ):
                scheduled = event.event_id
            started = event.activity_task_started_event_attributes
            if (
                scheduled is not None
                and event.HasField("activity_task_started_event_attributes")
                and started.scheduled_event_id == scheduled
                and started.attempt > kill.attempt
            ):
                cut += 1
                break
    return cut


def _fault_rows(
    log: FaultLog,
    provider: dict[FaultKind, tuple[int, str]],
    *,
    timeouts: int,
    reversals: int,
    mid_call_cut: int,
    transient_rate: float,
) -> list[FaultRow]:
    rows = []
    for kind in FaultKind:
        records = [r for r in log.records if r.kind is kind]
        if kind in provider:
            count, detail = provider[kind]
        elif kind is FaultKind.PROVIDER_TIMEOUT:
            count, detail = timeouts, f"{transient_rate:.0%} of all provider calls"
        elif kind is FaultKind.PROVIDER_REVERSAL:
            count, detail = reversals, "reopened, reversed, parked; retried as generation 2"
        else:
            count = len(records)
            detail = records[-1].detail if records else ""
            if kind is FaultKind.SIGKILL_MID_REFUND and records:
                detail = f"{mid_call_cut} of {count} cut a call that then ran again; " + detail
            if kind is FaultKind.SIGTERM_DRAIN and records:
                detail = "all exit 0 in the grace period; last: " + detail
        rows.append(FaultRow(kind.value, count, detail))
    return rows


def _path_rows(
    result: CheckResult, generations: dict[str, int], restored_by: Counter[str]
) -> list[PathRow]:
    rows: dict[str, PathRow] = {s.value: PathRow(s.value) for s in Scenario}
    for workflow_id, final in result.finals.items():
        row = rows[final.plan.scenario.value]
        row.cancellations += 1
        if final.parked:
            row.parked += 1
        elif final.status_attr == CancellationStatus.COMPLETED.value:
            row.completed += 1
        elif final.status_attr == CancellationStatus.REJECTED.value:
            row.rejected += 1
        elif final.status_attr == CancellationStatus.WITHDRAWN.value:
            row.withdrawn += 1
        else:
            row.other += 1
        if generations.get(workflow_id, 0) >= 2:
            row.refund_generations_2plus += 1
        row.coupons_restored += restored_by[workflow_id]
    return [r for r in rows.values() if r.cancellations]


async def run_chaos(config: ChaosConfig, *, say: Callable[[str], None] = print) -> ChaosReport:
    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    tag = f"{rng.randrange(16**5):05x}"
    start_window = max(30.0, config.count / config.start_rate)
    plan = make_plan(
        config.count,
        seed=seed,
        tag=tag,
        start_window=start_window,
        probes=config.probes,
        mix=config.fault_mix,
        hostile_share=config.hostile_share,
    )
    root = config.data_dir or Path(tempfile.mkdtemp(prefix="ordercancel-chaos-"))
    stack = ChaosStack(root, task_queue=f"chaos-{tag}", worker_env=worker_env(config))
    began = time.monotonic()
    phases: dict[str, float] = {}
    violations: list[str] = []
    pool: asyncpg.Pool | None = None
    say(
        f"chaos run seed {seed}: {len(plan.cancellations())} cancellations in {len(plan.orders)}"
        f" orders, data in {root}"
    )
    # This process's own pool complains loudly while PostgreSQL is down on purpose.
    pool_log = logging.getLogger("asyncpg.pool")
    pool_log_level = pool_log.level
    pool_log.setLevel(logging.CRITICAL)
    try:
        await stack.start_servers()
        pool = await create_pool(stack.database_url, min_size=2, max_size=12)
        # The client's core logs every retried call while Temporal is down on purpose.
        quiet = Runtime(
            telemetry=TelemetryConfig(
                logging=LoggingConfig(
                    filter=TelemetryFilter(core_level="ERROR", other_level="ERROR")
                )
            )
        )
        client = await connect(stack.temporal_address, runtime=quiet)
        await _load(pool, plan)
        await stack.start_worker()
        phases["setup"] = time.monotonic() - began

        # --- requests and faults, side by side ------------------------------------------
        stats = DriverStats()
        hostile = HostileSender(
            client, address=lambda: stack.temporal_address, task_queue=stack.task_queue
        )
        driver = Driver(client, pool, task_queue=stack.task_queue, stats=stats, hostile=hostile)
        t0 = time.monotonic()
        loop = FaultLoop(
            stack,
            client,
            driver,
            plan.probes,
            rng=random.Random(seed + 1),
            started_at=t0,
            gap=config.fault_gap,
            recovery_limit=config.recovery_limit,
            say=say,
        )
        gate = asyncio.Semaphore(config.driver_concurrency)

        async def drive(order: Any) -> None:
            await asyncio.sleep(max(0.0, order.start_at - (time.monotonic() - t0)))
            async with gate:
                await driver.run_order(order)

        drivers_done = asyncio.Event()
        fault_task = asyncio.create_task(
            loop.run(
                until=drivers_done,
                min_seconds=start_window + config.fault_tail,
                max_seconds=config.max_fault_seconds or 2 * start_window + 180,
            )
        )
        say(f"requesting over {start_window:.0f}s while faults are injected")
        try:
            await asyncio.gather(*(drive(o) for o in plan.orders))
        finally:
            drivers_done.set()
        await fault_task
        phases["requests and faults"] = time.monotonic() - t0

        # --- faults over: let everything end, fix the provider, retry what is parked ----
        t1 = time.monotonic()
        say("faults stopped; waiting for every cancellation to end or park")
        busy = await settle(client, stack.task_queue, within=config.settle_timeout, say=say)
        provider_counts = await _provider_fault_counts(pool, plan)
        await _clear_faults(pool, [o.payment_id for o in plan.all_orders()])
        retries: list[str] = []
        for round_ in range(config.retry_rounds):
            outcome = await bulk_retry(client, stack.task_queue, reason="provider fixed")
            retries.append(outcome)
            say(f"operator bulk retry {round_ + 1}: {outcome}")
            busy = await settle(client, stack.task_queue, within=config.settle_timeout, say=say)
            if outcome == "nothing parked" and not busy:
                break
        # Ended cancellations started again from the `temporal` CLI (the hostile ones).
        await hostile.after_end(plan.cancellations())
        phases["settle and operator retry"] = time.monotonic() - t1

        # --- the invariants -----------------------------------------------------------
        t2 = time.monotonic()
        say("checking the ledger, the provider's records and Temporal")
        result = await check_run(
            plan,
            loop.used_probes,
            client=client,
            pool=pool,
            task_queue=stack.task_queue,
            hostile=hostile.stats,
        )
        generations = {
            r["cancellation_id"]: r["n"]
            for r in await pool.fetch(
                "SELECT cancellation_id, count(*) AS n FROM refunds GROUP BY 1"
            )
        }
        restored_by: Counter[str] = Counter(
            r["restored_by"]
            for r in await pool.fetch(
                "SELECT restored_by FROM coupon_redemptions WHERE restored_at IS NOT NULL"
            )
        )
        reversals = await pool.fetchval("SELECT count(*) FROM refunds WHERE stage = 'reversed'")
        mid_call_cut = await _mid_call_cut(client, loop.log.mid_call_kills)
        phases["checks"] = time.monotonic() - t2

        for invariant in result.invariants:
            violations += [f"{invariant.name}: {v}" for v in invariant.violations]
        violations += loop.log.violations()
        violations += [f"worker exited on its own: {e}" for e in loop.log.unexpected_exits]
        violations += [f"harness: {e}" for e in stats.errors]
        violations += [f"harness (hostile): {e}" for e in hostile.stats.errors]
        violations += [f"never settled: {i}" for i in busy]
        invariants = [
            InvariantRow(i.name, i.meaning, i.checked, len(i.violations)) for i in result.invariants
        ]
        invariants.append(
            InvariantRow(
                "workers drain and recover",
                "SIGTERM: exit 0 within the grace; after a restart the same workers go on",
                loop.log.count(FaultKind.SIGTERM_DRAIN)
                + loop.log.count(FaultKind.POSTGRES_RESTART)
                + loop.log.count(FaultKind.TEMPORAL_RESTART),
                len(loop.log.violations()) + len(loop.log.unexpected_exits),
            )
        )
        invariants.append(
            InvariantRow(
                "harness did what it planned",
                "every request, decision, withdrawal and webhook delivered",
                stats.started,
                len(stats.errors) + len(hostile.stats.errors) + len(busy),
            )
        )
        faults = _fault_rows(
            loop.log,
            provider_counts,
            timeouts=_global_timeouts(stack),
            reversals=int(reversals or 0),
            mid_call_cut=mid_call_cut,
            transient_rate=config.transient_rate,
        )
        report = ChaosReport(
            seed=seed,
            count=len(plan.cancellations()),
            tag=tag,
            seconds=0.0,
            phases=phases,
            faults=faults,
            paths=_path_rows(result, generations, restored_by),
            invariants=invariants,
            violations=violations,
            data_dir=None,
            workflow_runs=result.runs,
            operator_retries=retries,
            hostile=[FaultRow(*row) for row in hostile.stats.rows()],
        )
    finally:
        if pool is not None:
            await pool.close()
        await stack.close()
        pool_log.setLevel(pool_log_level)
    report.seconds = time.monotonic() - began
    if config.keep or report.violations:
        report.data_dir = str(root)
    elif config.data_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return report
