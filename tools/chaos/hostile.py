"""Hostile input during a chaos run (R20, issue 18): what a careless or malicious client sends
to a cancellation, through the real Temporal client and through the `temporal` CLI, next to its
buyer's and seller's own messages. What the plan gives each hostile cancellation is in
`tools.chaos.plan.HostilePlan`; what must follow is checked by `tools.chaos.checks`.

Every hostile update must be refused with a refusal code; every hostile signal changes nothing
(it is recorded and counted); a `temporal workflow start` of a running cancellation is refused,
one of an ended cancellation starts a run that reports the outcome (its own buyer's request) or
fails as `SubOrderNotFound` (another buyer's) and writes nothing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowUpdateFailedError,
)
from temporalio.common import RawValue
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from devstack.embedded import temporal_binary
from domain.errors import RefusalCode
from domain.models import CancellationReason, RequestCancellationInput
from tools.chaos.driver import HarnessError, persist
from tools.chaos.plan import OTHER, Action, CancellationPlan, Probe

INTRUDER_SELLER = "S-intruder"
INTRUDER_BUYER = "B-intruder"
_REFUSAL_CODES = {code.value for code in RefusalCode}
# What the SDK answered an update whose payload it could not decode (a lone surrogate: pydantic's
# JSON parser refuses it) before the workflow's validator saw it. The product's data converter
# (infra/converter.py) now hands such a payload to the validator, which refuses it as
# `invalid_payload`; should this come back, it is reported as input the product mishandled.
UNDECODABLE = "RuntimeError: Failed decoding arguments"
# What the CLI prints when the server is not there (a restart of the fault loop): try again.
_CLI_OUTAGE = re.compile(
    r"unavailable|connection refused|deadline exceeded|failed reaching server|"
    r"transport|EOF|connection reset",
    re.IGNORECASE,
)


@dataclass
class EchoRun:
    """A run a `temporal workflow start` of an ended cancellation started."""

    workflow_id: str
    run_id: str
    buyer: str  # OWN or OTHER
    outcome: str  # "completed", or "failed: <type>", or what else it did


@dataclass
class HostileStats:
    client_signals: Counter[str] = field(default_factory=Counter)
    client_updates: Counter[str] = field(default_factory=Counter)
    update_refusals: Counter[str] = field(default_factory=Counter)
    cli_signals: int = 0
    cli_starts_running: int = 0
    cli_starts_ended: int = 0
    cli_duplicate_updates: int = 0
    cli_duplicate_signals: int = 0
    # Workflow id -> the run that decided it (describe it, not a later echo run).
    deciding_runs: dict[str, str] = field(default_factory=dict)
    echo_runs: list[EchoRun] = field(default_factory=list)
    # Hostile input the product took (an update accepted, a second decision accepted).
    taken: list[str] = field(default_factory=list)
    # Starts of a running cancellation that started another run.
    restarted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, int, str]]:
        """(kind, count, observed) for the report."""
        signals = sum(self.client_signals.values())
        updates = sum(self.client_updates.values())
        refusals = ", ".join(f"{k} {n}" for k, n in sorted(self.update_refusals.items()))
        echoes = Counter(f"{e.buyer}: {e.outcome}" for e in self.echo_runs)
        return [
            (
                "signals, Temporal client",
                signals,
                ", ".join(f"{k} {n}" for k, n in sorted(self.client_signals.items())),
            ),
            (
                "updates, Temporal client",
                updates,
                ", ".join(f"{k} {n}" for k, n in sorted(self.client_updates.items())),
            ),
            (
                "update refusals",
                sum(self.update_refusals.values()),
                refusals,
            ),
            ("signals, `temporal` CLI", self.cli_signals, "ESC and NUL in a seller's decision"),
            (
                "duplicate decisions, `temporal` CLI",
                self.cli_duplicate_updates + self.cli_duplicate_signals,
                f"{self.cli_duplicate_updates} updates then"
                f" {self.cli_duplicate_signals} signals after the decision",
            ),
            (
                "duplicate starts of running ones, `temporal` CLI",
                self.cli_starts_running,
                "refused: already running",
            ),
            (
                "duplicate starts of ended ones, `temporal` CLI",
                self.cli_starts_ended,
                ", ".join(f"{k} {n}" for k, n in sorted(echoes.items())),
            ),
        ]


def _raw_json(text: str) -> RawValue:
    """A payload as a client in another language may send it: JSON text, as it is."""
    return RawValue(Payload(metadata={"encoding": b"json/plain"}, data=text.encode()))


def signal_probe(probe: Probe, c: CancellationPlan) -> tuple[str, Any]:
    seller, buyer = c.seller_id, c.buyer_id
    if probe is Probe.NUL:
        return "seller_decision", {"seller_id": seller, "decision": "accept", "reason": "ok\x00"}
    if probe is Probe.ESCAPE:
        return "withdraw", {"buyer_id": buyer, "reason": "\x1b[31mchanged my mind\x1b[0m"}
    if probe is Probe.SURROGATE:
        text = json.dumps({"seller_id": seller, "decision": "accept"})
        return "seller_decision", _raw_json(text[:-1] + ', "reason": "\\ud800"}')
    if probe is Probe.OVERSIZED:
        return "withdraw", {"buyer_id": buyer, "reason": "x" * 2_001}
    if probe is Probe.WRONG_ID:
        return "withdraw", {"buyer_id": INTRUDER_BUYER, "reason": "not mine"}
    return "seller_decision", {"seller_id": seller, "decision": "maybe", "extra": [1, 2]}


def update_probe(probe: Probe, c: CancellationPlan) -> Any:
    seller = c.seller_id
    if probe is Probe.NUL:
        return {"seller_id": seller + "\x00", "decision": "accept"}
    if probe is Probe.ESCAPE:
        return {"seller_id": seller, "decision": "reject", "reason": "\x1b]0;pwned\x07"}
    if probe is Probe.SURROGATE:
        text = json.dumps({"seller_id": seller, "decision": "accept"})
        return _raw_json(text[:-1] + ', "reason": "\\udc80"}')
    if probe is Probe.OVERSIZED:
        return {"seller_id": seller, "decision": "accept", "reason": "y" * 20_000}
    if probe is Probe.WRONG_ID:
        return {"seller_id": INTRUDER_SELLER, "decision": "accept"}
    return ["accept", seller]


def _decision(c: CancellationPlan) -> dict[str, Any]:
    accept = c.action in (Action.ACCEPT_UPDATE, Action.ACCEPT_SIGNAL, Action.WITHDRAW)
    return {"seller_id": c.seller_id, "decision": "accept" if accept else "reject"}


class HostileSender:
    def __init__(self, client: Client, *, address: Callable[[], str], task_queue: str) -> None:
        self.client = client
        self.address = address
        self.task_queue = task_queue
        self.stats = HostileStats()
        self._cli_gate = asyncio.Semaphore(4)

    # --- the `temporal` CLI ----------------------------------------------------------------

    async def cli(self, *args: str, within: float = 120) -> tuple[int, str]:
        """`temporal ARGS`, tried again while the server is down (the fault loop restarts it)."""
        deadline = time.monotonic() + within
        while True:
            async with self._cli_gate:
                proc = await asyncio.create_subprocess_exec(
                    temporal_binary(),
                    *args,
                    "--address",
                    self.address(),
                    "--namespace",
                    self.client.namespace,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                try:
                    out, _ = await asyncio.wait_for(proc.communicate(), 60)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                    out = b"deadline exceeded (the CLI ran over 60 s)"
            code = proc.returncode if proc.returncode is not None else -1
            text = out.decode(errors="replace")
            if code == 0 or not _CLI_OUTAGE.search(text) or time.monotonic() > deadline:
                return code, text
            await asyncio.sleep(1.0)

    async def cli_start(self, c: CancellationPlan, buyer: str) -> tuple[int, str]:
        request = RequestCancellationInput(
            order_id=c.order_id,
            seller_id=c.seller_id,
            buyer_id=c.buyer_id if buyer != OTHER else INTRUDER_BUYER,
            reason=CancellationReason.OTHER,
            reason_text="started again from the temporal CLI",
        )
        return await self.cli(
            "workflow",
            "start",
            "--type",
            "OrderCancellation",
            "--task-queue",
            self.task_queue,
            "--workflow-id",
            c.workflow_id,
            "--input",
            request.model_dump_json(),
        )

    # --- while it awaits its seller ----------------------------------------------------------

    async def before_decision(self, c: CancellationPlan) -> None:
        h = c.hostile
        if h is None:
            return
        handle = self.client.get_workflow_handle(c.workflow_id)
        for probe in h.signals:
            name, payload = signal_probe(probe, c)
            send = functools.partial(handle.signal, name, payload)
            await persist(f"hostile {name} {c.workflow_id}", send)
            self.stats.client_signals[probe.value] += 1
        for probe in h.updates:
            await self._refused_update(c, probe)
        if h.cli_signal:
            payload = {"seller_id": c.seller_id, "decision": "accept", "reason": "\x1b[2J\x00"}
            code, out = await self.cli(
                "workflow",
                "signal",
                "-w",
                c.workflow_id,
                "--name",
                "seller_decision",
                "--input",
                json.dumps(payload),
            )
            if code != 0:
                raise HarnessError(f"{c.workflow_id}: CLI signal not sent: {out[-300:]}")
            self.stats.cli_signals += 1
        if h.cli_start_running:
            before = await persist("describe", handle.describe)
            code, out = await self.cli_start(c, h.cli_start_running)
            self.stats.cli_starts_running += 1
            after = await persist("describe", handle.describe)
            if code == 0 and after.run_id != before.run_id:
                self.stats.restarted.append(
                    f"{c.workflow_id}: `temporal workflow start` ({h.cli_start_running}) of a"
                    f" running cancellation started run {after.run_id}"
                )

    async def _refused_update(self, c: CancellationPlan, probe: Probe) -> None:
        handle = self.client.get_workflow_handle(c.workflow_id)
        payload = update_probe(probe, c)

        async def update() -> str:
            try:
                await handle.execute_update("decide", payload)
            except WorkflowUpdateFailedError as err:
                cause = err.cause
                if not isinstance(cause, ApplicationError):
                    return repr(cause)
                if cause.type == "RuntimeError" and cause.message == "Failed decoding arguments":
                    return UNDECODABLE
                return cause.type or "?"
            return "accepted"

        code = await persist(f"hostile decide {c.workflow_id}", update)
        self.stats.client_updates[probe.value] += 1
        self.stats.update_refusals[code] += 1
        if code not in _REFUSAL_CODES:
            self.stats.taken.append(
                f"{c.workflow_id}: hostile update ({probe.value}) answered {code}, not a refusal"
            )

    # --- after the decision ------------------------------------------------------------------

    async def after_decision(self, c: CancellationPlan) -> None:
        """The decision again from the CLI, as an update and then as a signal: refused, or the
        cancellation has already ended (the server says so)."""
        if c.hostile is None or not c.hostile.cli_duplicate_decision:
            return
        payload = json.dumps(_decision(c))
        code, _ = await self.cli(
            "workflow", "update", "execute", "-w", c.workflow_id, "--name", "decide",
            "--input", payload,
        )  # fmt: skip
        self.stats.cli_duplicate_updates += 1
        if code == 0:
            self.stats.taken.append(f"{c.workflow_id}: a second decision (CLI update) accepted")
        await self.cli(
            "workflow", "signal", "-w", c.workflow_id, "--name", "seller_decision",
            "--input", payload,
        )  # fmt: skip
        self.stats.cli_duplicate_signals += 1

    # --- once everything ended -----------------------------------------------------------------

    async def after_end(self, cancellations: list[CancellationPlan]) -> None:
        """`temporal workflow start` of ended cancellations, each with its own buyer's request
        or another buyer's: the run it starts must end at once, having written nothing."""
        await asyncio.gather(
            *(
                self._start_ended(c)
                for c in cancellations
                if c.hostile and c.hostile.cli_start_ended
            )
        )

    async def _start_ended(self, c: CancellationPlan) -> None:
        assert c.hostile is not None and c.hostile.cli_start_ended is not None
        try:
            handle = self.client.get_workflow_handle(c.workflow_id)
            deciding = await persist("describe", handle.describe)
            if deciding.status is WorkflowExecutionStatus.RUNNING:
                return  # parked in refund_failed: not ended
            self.stats.deciding_runs[c.workflow_id] = deciding.run_id
            code, out = await self.cli_start(c, c.hostile.cli_start_ended)
            self.stats.cli_starts_ended += 1
            latest = await persist("describe", handle.describe)
            if code != 0 or latest.run_id == deciding.run_id:
                outcome = f"not started: {out.strip()[-120:]}"
            else:
                outcome = await self._echo_outcome(c.workflow_id, latest.run_id)
            self.stats.echo_runs.append(
                EchoRun(c.workflow_id, latest.run_id, c.hostile.cli_start_ended, outcome)
            )
        except Exception as err:
            self.stats.errors.append(f"start again {c.workflow_id}: {type(err).__name__}: {err}")

    async def _echo_outcome(self, workflow_id: str, run_id: str) -> str:
        run = self.client.get_workflow_handle(workflow_id, run_id=run_id)
        try:
            await persist("echo run", run.result, within=120, attempt_timeout=60)
        except WorkflowFailureError as err:
            cause: BaseException | None = err.cause
            if isinstance(cause, ActivityError):
                cause = cause.cause
            kind = getattr(cause, "type", None) or type(cause).__name__
            return f"failed: {kind}"
        except RPCError as err:
            if err.status is RPCStatusCode.NOT_FOUND:
                return "not found"
            raise
        return "completed"
