"""Replay safety: every history in tests/histories/ must replay against today's `OrderCancellation`.

Cancellations live for days (the 48 h seller window, refunds parked in `refund_failed` until an
operator acts), so a worker running new code replays histories that old code wrote. A change to
the workflow that emits different commands for the same history (a new, removed or reordered
activity, timer or search-attribute upsert; a different branch for the same events) fails those
running cancellations with a non-determinism error. This test catches that before a deploy.

The histories were recorded on the real dev server and PostgreSQL, one per path of the rule book
(`REQUIRED_PATHS`), by

    .venv/bin/python -m tests.record_histories

They were all recorded again, once, when the patch guards of the first versions were folded in
before any cancellation had run in production: none of them is older than today's code, and the
workflow asks `workflow.patched` nowhere. From now on every change to the commands goes through
a patch, as docs/workflow-changes.md describes:

* When this test fails after a workflow change, do NOT re-record to make it green: the failure
  is exactly what production would see. Guard the change with `workflow.patched("<patch-id>")`
  (the old behaviour in the other branch), so that these files replay again, unchanged.
* Record the new behaviour next to them, never over them
  (`.venv/bin/python -m tests.record_histories --tag <patch-id>` writes
  `instant.<patch-id>.json` and so on); both generations must replay.
* Only once no cancellation started before the change can still be running does the old branch
  go (`workflow.deprecate_patch`, then nothing), together with the files that needed it.

`test_an_incompatible_change_fails_the_replay` shows that this check can fail; tests/test_upgrade.py
shows a patched change taking over a cancellation recorded before it.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from activities.ledger_activities import LedgerActivities
from domain.models import (
    CancellationPath,
    CancellationResult,
    CancellationStatus,
    EventInput,
    OpenCancellationInput,
    RequestCancellationInput,
)
from domain.rules import cancellation_id
from workers.worker import workflow_runner
from workflows import search_attributes as sa
from workflows.order_cancellation import OrderCancellation

HISTORIES = Path(__file__).resolve().parent / "histories"

SIGNALED = "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED"
UPDATED = "EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED"
TIMER_FIRED = "EVENT_TYPE_TIMER_FIRED"
TIMER_CANCELED = "EVENT_TYPE_TIMER_CANCELED"
ACTIVITY_FAILED = "EVENT_TYPE_ACTIVITY_TASK_FAILED"

# Every path that must have a recorded history: (how it must end, events it must contain).
REQUIRED_PATHS: dict[str, tuple[CancellationStatus, Counter[str]]] = {
    "instant": (CancellationStatus.COMPLETED, Counter()),
    "accepted_update": (CancellationStatus.COMPLETED, Counter({UPDATED: 1, TIMER_CANCELED: 1})),
    "accepted_signal": (CancellationStatus.COMPLETED, Counter({SIGNALED: 1, TIMER_CANCELED: 1})),
    "rejected": (CancellationStatus.REJECTED, Counter({UPDATED: 1})),
    "timed_out": (CancellationStatus.COMPLETED, Counter({TIMER_FIRED: 1})),
    "withdrawn": (CancellationStatus.WITHDRAWN, Counter({SIGNALED: 1})),
    "escalated_resolved": (CancellationStatus.COMPLETED, Counter({TIMER_FIRED: 1, UPDATED: 1})),
    "refund_failed_retried": (
        CancellationStatus.COMPLETED,
        Counter({ACTIVITY_FAILED: 1, UPDATED: 2}),
    ),
    "refused_signal": (CancellationStatus.COMPLETED, Counter({SIGNALED: 3})),
    # The provider said "pending"; its webhook cut the hour-long wait short.
    "pending_then_webhook": (
        CancellationStatus.COMPLETED,
        Counter({UPDATED: 1, SIGNALED: 1, TIMER_CANCELED: 2}),
    ),
    # A new run of an ended cancellation, started with the reversal event; parked, retried.
    "reversed_reopened": (CancellationStatus.COMPLETED, Counter({SIGNALED: 1, UPDATED: 1})),
    # The buyer's withdrawal and the seller's acceptance in one task: the withdrawal wins.
    "withdrawn_then_decided": (CancellationStatus.WITHDRAWN, Counter({SIGNALED: 2})),
}


def history_files() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


def path_of(file: Path) -> str:
    """`instant.json` and `instant.<tag>.json` both record the path `instant`."""
    return file.name.split(".", 1)[0]


def _payload(payload: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(payload["data"]))


def load(file: Path) -> tuple[WorkflowHistory, dict[str, Any]]:
    """The history, with the workflow id it ran under (derived from its input, as
    `start_cancellation` derives it), and the raw JSON."""
    data = json.loads(file.read_text())
    started = data["events"][0]["workflowExecutionStartedEventAttributes"]
    request = RequestCancellationInput.model_validate(_payload(started["input"]["payloads"][0]))
    workflow_id = cancellation_id(request.order_id, request.seller_id)
    return WorkflowHistory.from_json(workflow_id, data), data


def replayer(*workflows: type) -> Replayer:
    """Configured like the worker: same converter, same sandbox runner."""
    return Replayer(
        workflows=list(workflows),
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )


def test_histories_cover_every_path() -> None:
    recorded = {path_of(f) for f in history_files()}
    missing = sorted(set(REQUIRED_PATHS) - recorded)
    assert not missing, f"no recorded history for {missing}: run `python -m tests.record_histories`"
    unknown = sorted(recorded - set(REQUIRED_PATHS))
    assert not unknown, f"histories of unknown paths {unknown}: add them to REQUIRED_PATHS"


@pytest.mark.parametrize("file", history_files(), ids=lambda f: f.name)
def test_history_records_its_path(file: Path) -> None:
    """Each file really is the path its name says, and a finished one (a replay of a history
    that stops half-way proves less)."""
    _, data = load(file)
    events = data["events"]
    status, needed = REQUIRED_PATHS[path_of(file)]
    last = events[-1]
    assert last["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED"
    attrs = last["workflowExecutionCompletedEventAttributes"]
    result = CancellationResult.model_validate(_payload(attrs["result"]["payloads"][0]))
    assert result.status is status
    expected_path = (
        CancellationPath.INSTANT if path_of(file) == "instant" else CancellationPath.REQUEST
    )
    assert result.path is expected_path
    seen = Counter(e["eventType"] for e in events)
    assert all(seen[kind] >= n for kind, n in needed.items()), (needed, seen)


@pytest.mark.parametrize("file", history_files(), ids=lambda f: f.name)
async def test_history_replays_against_current_code(file: Path) -> None:
    history, _ = load(file)
    result = await replayer(OrderCancellation).replay_workflow(history)
    assert result.replay_failure is None


# --- the replay test can fail ------------------------------------------------------------------
#
# Two deliberately incompatible versions of the workflow, under the same workflow type name.
# They run unsandboxed: non-determinism is detected by the SDK core comparing the commands the
# code emits with the events in the history, not by the sandbox, and this keeps the test module
# from being re-imported inside one.


@workflow.defn(name="OrderCancellation", sandboxed=False)
class WritesAuditFirst:
    """Records an audit row before reading the sub-order: a different first activity."""

    @workflow.run
    async def run(self, request: RequestCancellationInput) -> CancellationResult:
        workflow.upsert_search_attributes(
            [sa.ORDER_ID.value_set(request.order_id), sa.SELLER_ID.value_set(request.seller_id)]
        )
        wid = workflow.info().workflow_id
        await workflow.execute_activity_method(
            LedgerActivities.record_event,
            EventInput(cancellation_id=wid, actor="system", kind="hello", event_key="000-hello"),
            start_to_close_timeout=timedelta(seconds=30),
        )
        raise AssertionError("never reached in a replay of a recorded history")


@workflow.defn(name="OrderCancellation", sandboxed=False)
class SkipsEverythingAfterOpening:
    """Opens the cancellation and returns: the activities the history has next are skipped."""

    @workflow.run
    async def run(self, request: RequestCancellationInput) -> CancellationResult:
        workflow.upsert_search_attributes(
            [
                sa.ORDER_ID.value_set(request.order_id),
                sa.SELLER_ID.value_set(request.seller_id),
                sa.BUYER_ID.value_set(request.buyer_id),
                sa.CANCELLATION_STATUS.value_set(CancellationStatus.OPENING.value),
                sa.REFUND_STAGE.value_set(0),
            ]
        )
        wid = workflow.info().workflow_id
        opened = await workflow.execute_activity_method(
            LedgerActivities.open_cancellation,
            OpenCancellationInput(cancellation_id=wid, request=request),
            start_to_close_timeout=timedelta(seconds=30),
        )
        return CancellationResult(
            cancellation_id=wid, status=CancellationStatus.COMPLETED, path=opened.path
        )


@pytest.mark.parametrize(
    ("changed", "path"),
    [(WritesAuditFirst, "instant"), (SkipsEverythingAfterOpening, "rejected")],
    ids=["different-first-activity", "skipped-activities"],
)
async def test_an_incompatible_change_fails_the_replay(changed: type, path: str) -> None:
    (file,) = [f for f in history_files() if f.name == f"{path}.json"]
    history, _ = load(file)
    await replayer(OrderCancellation).replay_workflow(history)  # the control: it does replay
    with pytest.raises(workflow.NondeterminismError, match=r"\[TMPRL1100\] Nondeterminism"):
        await replayer(changed).replay_workflow(history)
