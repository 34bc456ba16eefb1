"""The fault loop: one fault at a time, at random moments, while cancellations run.

Each fault is observed, not only injected: a SIGTERM'd worker must exit 0 within the drain
period; after PostgreSQL or Temporal comes back, the workers that lived through it (not new
ones) must finish a fresh cancellation, which proves their connection pool or client
reconnected. Every kind of fault happens at least once per run; after that they are drawn at
random until the run's fault period ends.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowExecutionStatus

from domain.models import CancellationStatus, RetryRefundRequest
from starter.refunds import failed_query, find_failed_ids, retry_refunds
from tools.chaos.driver import Driver, HarnessError, persist
from tools.chaos.plan import OrderPlan
from tools.chaos.stack import ChaosStack
from tools.worker_process import WorkerProcess, WorkerStartError
from workers.worker import GRACEFUL_SHUTDOWN

PROVIDER_CALLS = ("submit_refund", "submit_refund_and_confirm", "confirm_refund")


class FaultKind(StrEnum):
    SIGKILL = "worker SIGKILL at a random moment"
    SIGKILL_MID_REFUND = "worker SIGKILL during a provider call"
    SIGTERM_DRAIN = "worker SIGTERM, graceful drain"
    SECOND_WORKER = "second worker started (two at once)"
    POSTGRES_RESTART = "PostgreSQL stopped and restarted"
    TEMPORAL_RESTART = "Temporal dev server stopped and restarted"
    OPERATOR_RETRY = "operator bulk retry during faults"
    # Provider faults, counted from the provider's own records after the run.
    PROVIDER_TRANSIENT = "provider 503 before recording (per payment)"
    PROVIDER_TIMEOUT = "provider timeout (global transient rate)"
    PROVIDER_LOST_RESPONSE = "provider response lost after recording"
    PROVIDER_PENDING = "provider still pending when asked"
    PROVIDER_FINAL = "provider refused for good (declined)"
    PROVIDER_REVERSAL = "refund reversed after success (webhook)"


LOOP_KINDS = (
    FaultKind.SIGKILL,
    FaultKind.SIGKILL_MID_REFUND,
    FaultKind.SIGTERM_DRAIN,
    FaultKind.SECOND_WORKER,
    FaultKind.POSTGRES_RESTART,
    FaultKind.TEMPORAL_RESTART,
    FaultKind.OPERATOR_RETRY,
)
_RANDOM_WEIGHTS = {
    FaultKind.SIGKILL: 4,
    FaultKind.SIGKILL_MID_REFUND: 3,
    FaultKind.SIGTERM_DRAIN: 2,
    FaultKind.SECOND_WORKER: 1,
    FaultKind.POSTGRES_RESTART: 2,
    FaultKind.TEMPORAL_RESTART: 2,
    FaultKind.OPERATOR_RETRY: 1,
}


@dataclass
class FaultRecord:
    kind: FaultKind
    at: float  # seconds into the run
    detail: str
    violation: str | None = None


@dataclass
class MidCallKill:
    """A worker killed while it ran a provider call: did the call get cut (and retried)?"""

    workflow_id: str
    run_id: str
    activity_id: str
    activity_type: str
    attempt: int


@dataclass
class FaultLog:
    records: list[FaultRecord] = field(default_factory=list)
    mid_call_kills: list[MidCallKill] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)

    def count(self, kind: FaultKind) -> int:
        return sum(1 for r in self.records if r.kind is kind)

    def violations(self) -> list[str]:
        return [f"{r.kind.value}: {r.violation}" for r in self.records if r.violation]


class FaultLoop:
    def __init__(
        self,
        stack: ChaosStack,
        client: Client,
        driver: Driver,
        probes: list[OrderPlan],
        *,
        rng: random.Random,
        started_at: float,
        gap: tuple[float, float] = (2.0, 6.0),
        recovery_limit: float = 120.0,
        say: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.stack = stack
        self.client = client
        self.driver = driver
        self.probes = list(probes)
        self.rng = rng
        self.started_at = started_at
        self.gap = gap
        self.recovery_limit = recovery_limit
        self.say = say
        self.log = FaultLog()
        self.target_workers = 1
        self.used_probes: list[OrderPlan] = []
        self.retries_left = 5

    # --- the loop --------------------------------------------------------------------------

    async def run(self, *, until: asyncio.Event, min_seconds: float, max_seconds: float) -> None:
        """Faults until `until` is set and `min_seconds` have passed with every kind done once,
        or `max_seconds` have passed."""
        mandatory = list(LOOP_KINDS)
        self.rng.shuffle(mandatory)
        # A kill during a provider call needs refunds in flight: early, while requests start.
        mandatory.remove(FaultKind.SIGKILL_MID_REFUND)
        mandatory.append(FaultKind.SIGKILL_MID_REFUND)
        actions: dict[FaultKind, Callable[[], Awaitable[bool | None]]] = {
            FaultKind.SIGKILL: self.sigkill,
            FaultKind.SIGKILL_MID_REFUND: self.sigkill_mid_refund,
            FaultKind.SIGTERM_DRAIN: self.sigterm_drain,
            FaultKind.SECOND_WORKER: self.second_worker,
            FaultKind.POSTGRES_RESTART: self.restart_postgres,
            FaultKind.TEMPORAL_RESTART: self.restart_temporal,
            FaultKind.OPERATOR_RETRY: self.operator_retry,
        }
        kinds, weights = zip(*_RANDOM_WEIGHTS.items(), strict=True)
        while True:
            elapsed = self.elapsed()
            if elapsed >= max_seconds:
                break
            if not mandatory and until.is_set() and elapsed >= min_seconds:
                break
            await asyncio.sleep(self.rng.uniform(*self.gap))
            await self.ensure_workers()
            forced = bool(mandatory)
            kind = mandatory.pop() if mandatory else self.rng.choices(kinds, weights)[0]
            if kind is FaultKind.SECOND_WORKER and len(self.stack.alive_workers()) >= 2:
                kind = FaultKind.SIGKILL
            self.say(f"[{self.elapsed():6.1f}s] fault: {kind.value}")
            done_as_asked = await actions[kind]()
            if forced and done_as_asked is False and self.retries_left > 0:
                # Nothing to hit right now (no provider call in flight): try again later.
                self.retries_left -= 1
                mandatory.insert(0, kind)
        await self.ensure_workers()

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def record(self, kind: FaultKind, detail: str, violation: str | None = None) -> None:
        self.log.records.append(FaultRecord(kind, self.elapsed(), detail, violation))
        if violation:
            self.say(f"  VIOLATION: {violation}")

    async def ensure_workers(self) -> None:
        """Replace workers that died on their own (a finding: nothing here kills them
        silently), and start workers up to the target count."""
        for worker in list(self.stack.workers):
            if not worker.alive and not worker.stopped_on_purpose:
                worker.stopped_on_purpose = True  # reported once
                self.log.unexpected_exits.append(
                    f"{worker.name} (pid {worker.pid}) exited with {worker.returncode}"
                    f" at {self.elapsed():.0f}s:\n{worker.log_tail()}"
                )
        attempts = 0
        while len(self.stack.alive_workers()) < self.target_workers:
            try:
                await self.stack.start_worker()
            except WorkerStartError as err:
                attempts += 1
                if attempts >= 5:
                    raise HarnessError(f"cannot start a worker: {err}") from err
                await asyncio.sleep(2)

    def _pick(self) -> WorkerProcess:
        alive = self.stack.alive_workers()
        if not alive:
            raise HarnessError("no worker alive to inject a fault into")
        return self.rng.choice(alive)

    # --- workers ---------------------------------------------------------------------------

    async def sigkill(self) -> None:
        worker = self._pick()
        uptime = time.monotonic() - worker.started
        await worker.kill()
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))
        began = time.monotonic()
        await self.ensure_workers()
        self.record(
            FaultKind.SIGKILL,
            f"{worker.name} killed after {uptime:.0f}s; replacement ready in"
            f" {time.monotonic() - began:.1f}s",
        )

    async def _provider_call_in_flight(
        self, within: float
    ) -> tuple[WorkerProcess, MidCallKill] | None:
        """A worker running submit_refund or confirm_refund right now, from the server's view
        of pending activities."""
        query = (
            f'TaskQueue="{self.stack.task_queue}" AND ExecutionStatus="Running" AND'
            f' CancellationStatus IN ("{CancellationStatus.REFUND_REQUESTED.value}",'
            f' "{CancellationStatus.REFUND_SUBMITTED.value}")'
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            by_identity = {w.identity: w for w in self.stack.alive_workers()}
            try:
                ids = [e.id async for e in self.client.list_workflows(query, limit=40)]
                described = await asyncio.gather(
                    *(self.client.get_workflow_handle(i).describe() for i in ids),
                    return_exceptions=True,
                )
            except Exception:
                described = []
            for d in described:
                if isinstance(d, BaseException):
                    continue
                for p in d.raw_description.pending_activities:
                    worker = by_identity.get(p.last_worker_identity)
                    if (
                        p.activity_type.name in PROVIDER_CALLS
                        and p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                        and worker is not None
                    ):
                        return worker, MidCallKill(
                            workflow_id=d.id,
                            run_id=d.run_id,
                            activity_id=p.activity_id,
                            activity_type=p.activity_type.name,
                            attempt=p.attempt,
                        )
            await asyncio.sleep(0.1)
        return None

    async def sigkill_mid_refund(self) -> bool:
        found = await self._provider_call_in_flight(within=20)
        if found is None:
            self.say("  no provider call in flight: a random SIGKILL instead")
            await self.sigkill()
            return False
        worker, target = found
        await worker.kill()
        self.log.mid_call_kills.append(target)
        await asyncio.sleep(self.rng.uniform(0.2, 1.5))
        await self.ensure_workers()
        self.record(
            FaultKind.SIGKILL_MID_REFUND,
            f"{worker.name} killed while running {target.activity_type} of"
            f" {target.workflow_id} (attempt {target.attempt})",
        )
        return True

    async def sigterm_drain(self) -> None:
        """A rolling restart (or, with two workers, a scale-down): SIGTERM must drain the
        running activities and exit 0 within the grace period."""
        if len(self.stack.alive_workers()) < 2:
            await self.stack.start_worker()
        else:
            self.target_workers = 1
        found = await self._provider_call_in_flight(within=5)
        worker = found[0] if found else self._pick()
        busy = f" while it ran {found[1].activity_type}" if found else ""
        grace = GRACEFUL_SHUTDOWN.total_seconds()
        code, took = await worker.terminate(within=grace + 10)
        stopped = "worker_stopped" in worker.log_tail(40)
        violation = None
        if code is None:
            await worker.kill()
            violation = f"{worker.name} still running {grace + 10:.0f}s after SIGTERM"
        elif code != 0 or took > grace or not stopped:
            violation = (
                f"{worker.name} exited {code} after {took:.1f}s (grace {grace:.0f}s,"
                f" drain logged: {stopped}):\n{worker.log_tail()}"
            )
        self.record(
            FaultKind.SIGTERM_DRAIN,
            f"{worker.name} drained{busy}: exit {code} in {took:.1f}s",
            violation,
        )
        await self.ensure_workers()

    async def second_worker(self) -> None:
        self.target_workers = 2
        began = time.monotonic()
        await self.ensure_workers()
        self.record(
            FaultKind.SECOND_WORKER,
            f"{len(self.stack.alive_workers())} workers share the task queue (ready in"
            f" {time.monotonic() - began:.1f}s)",
        )

    # --- servers ---------------------------------------------------------------------------

    async def _probe(self, kind: FaultKind, what: str, pids: set[int], restarted: float) -> None:
        """A fresh instant-path cancellation must complete on the workers that lived through
        the restart: their pool or client reconnected by itself."""
        if not self.probes:
            self.record(kind, f"{what} (no probe left to check recovery)")
            return
        probe = self.probes.pop()
        self.used_probes.append(probe)
        workflow_id = probe.cancellations[0].workflow_id
        await self.driver.run_order(probe)
        deadline = time.monotonic() + self.recovery_limit
        closed = False
        while time.monotonic() < deadline:
            described = await self.driver.describe(workflow_id)
            if described.status is not WorkflowExecutionStatus.RUNNING:
                closed = described.status is WorkflowExecutionStatus.COMPLETED
                break
            await asyncio.sleep(0.3)
        took = time.monotonic() - restarted
        survivors = {w.pid for w in self.stack.alive_workers()}
        violation = None
        if not closed:
            tails = "\n".join(w.log_tail(8) for w in self.stack.alive_workers())
            violation = (
                f"{what}: probe {workflow_id} not completed {self.recovery_limit:.0f}s after"
                f" the restart (workers did not recover):\n{tails}"
            )
        elif not pids <= survivors:
            violation = f"{what}: workers {sorted(pids - survivors)} died meanwhile"
        self.record(
            kind,
            f"{what}; workers {sorted(pids)} kept running and finished probe {workflow_id}"
            f" {took:.1f}s after the restart",
            violation,
        )

    async def restart_postgres(self) -> None:
        pids = {w.pid for w in self.stack.alive_workers()}
        down = self.rng.uniform(1.0, 4.0)
        await self.stack.stop_postgres()
        await asyncio.sleep(down)
        await self.stack.start_postgres()
        await self._probe(
            FaultKind.POSTGRES_RESTART,
            f"down {down:.1f}s, same data directory",
            pids,
            time.monotonic(),
        )

    async def restart_temporal(self) -> None:
        pids = {w.pid for w in self.stack.alive_workers()}
        began = time.monotonic()
        await self.stack.stop_temporal()
        await asyncio.sleep(self.rng.uniform(0.5, 3.0))
        await self.stack.start_temporal()
        down = time.monotonic() - began
        await self._probe(
            FaultKind.TEMPORAL_RESTART,
            f"down {down:.1f}s, same SQLite file",
            pids,
            time.monotonic(),
        )

    # --- operators -------------------------------------------------------------------------

    async def operator_retry(self) -> None:
        outcome = await bulk_retry(self.client, self.stack.task_queue, reason="retry during faults")
        self.record(FaultKind.OPERATOR_RETRY, outcome)


async def bulk_retry(client: Client, task_queue: str, *, reason: str) -> str:
    """What an SRE runs: every parked cancellation of the run, `retry_refund` once each
    (starter/refunds.py, as `ordercancel refunds retry --all` does)."""
    query = failed_query(query=f'TaskQueue="{task_queue}"')
    ids = await persist("list parked", lambda: find_failed_ids(client, query))
    if not ids:
        return "nothing parked"
    summary = await persist(
        "bulk retry",
        lambda: retry_refunds(
            client,
            ids,
            request=RetryRefundRequest(operator_id="chaos-sre", reason=reason),
            concurrency=8,
        ),
        within=300,
        attempt_timeout=120,
    )
    totals = ", ".join(f"{k} {v}" for k, v in summary.totals().items())
    return f"{len(ids)} parked: {totals}"
