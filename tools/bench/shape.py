"""The event shape of a cancellation, read from a real history, and what a history costs.

`derive_shape` turns one `OrderCancellation` history into the steps `BenchLimitShape` replays:
every search-attribute upsert (same attributes, same values), memo upsert, patch marker,
activity (same input, result and summary sizes), timer (fired, or cancelled by a seller's
decision) and the update or signal that decided it, in history order. Workflow-task boundaries
follow from the awaits, exactly as in the product.

`billable_actions` counts Temporal Cloud actions from a history, following
https://docs.temporal.io/cloud/actions: workflow started, each activity attempt, each timer
started, each `UpsertSearchAttributes` command, each signal, each accepted update (the product
runs no local activities). Memo upserts (`WorkflowPropertiesModified`) and patch markers are not
actions. Queries and rejected updates are actions too but are not in histories: the bench sends
no queries and counts the updates its driver saw rejected.

This module is passed through the workflow sandbox (its models are workflow inputs); it imports
nothing but pydantic and the Temporal API protos.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

# The product's activities whose completion means "refund confirmed" (dot 3): the last of them
# in a history (the lean shape's submit confirms when the provider answers at once).
CONFIRM_ACTIVITY = "confirm_refund"
CONFIRM_ACTIVITIES = (CONFIRM_ACTIVITY, "submit_refund_and_confirm")
PATCH_MARKER = "core_patch"
CHANGE_VERSION = "TemporalChangeVersion"


class SaValue(BaseModel):
    """One search attribute of an upsert (or of the start request). `value` None: unset."""

    name: str
    kind: str
    value: Any = None


class Step(BaseModel):
    op: Literal["upsert", "activity", "wait", "memo", "patch", "signal"]
    attrs: list[SaValue] = Field(default_factory=list)
    # activity: payload sizes in bytes (JSON data), summary length; `label` is the product's
    # activity type (for reading histories), never sent to the server by the limit.
    in_size: int = 0
    out_size: int = 0
    summary: int = 0
    label: str = ""
    # wait: the timer's duration and whether a decision cancels it (else it fires).
    timeout_ms: int = 0
    decided: bool = False
    reply_size: int = 0
    memo: dict[str, Any] = Field(default_factory=dict)
    patch_id: str = ""


class LimitInput(BaseModel):
    """The input of `BenchLimitShape`: the steps and the size of the result to return."""

    path: str
    steps: list[Step]
    result_size: int = 0


class Shape(BaseModel):
    """One path of the product, as its history shows it."""

    path: str
    steps: list[Step]
    start_attrs: list[SaValue] = Field(default_factory=list)
    summary_len: int = 0
    details_len: int = 0
    input_size: int = 0
    result_size: int = 0
    # How the seller's decision arrives ("update", "signal") or "" (instant path, timer fired).
    message: str = ""
    # Index among the activity steps of the refund confirmation (None: no refund).
    confirm_index: int | None = None
    event_counts: dict[str, int] = Field(default_factory=dict)

    def limit_input(self) -> LimitInput:
        return LimitInput(path=self.path, steps=self.steps, result_size=self.result_size)


def event_name(event: HistoryEvent) -> str:
    """`ACTIVITY_TASK_SCHEDULED` for EVENT_TYPE_ACTIVITY_TASK_SCHEDULED."""
    return EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")


def event_counts(events: Iterable[HistoryEvent]) -> dict[str, int]:
    return dict(sorted(Counter(event_name(e) for e in events).items()))


def _size(payloads: Any) -> int:
    return sum(len(p.data) for p in payloads.payloads)


def _decode(payload: Any) -> Any:
    if not payload.data:
        return None
    return json.loads(payload.data)


def _attrs(indexed_fields: Any) -> list[SaValue]:
    found = []
    for name in sorted(indexed_fields):
        payload = indexed_fields[name]
        kind = payload.metadata.get("type", b"Keyword").decode()
        found.append(SaValue(name=name, kind=kind, value=_decode(payload)))
    return found


def _patch_id(marker: Any) -> str:
    """The id of a `workflow.patched` marker (Core keeps it in the marker's details)."""
    for payloads in marker.details.values():
        for payload in payloads.payloads:
            try:
                value = json.loads(payload.data)
            except ValueError:
                continue
            if isinstance(value, dict) and isinstance(value.get("id"), str):
                return str(value["id"])
            if isinstance(value, str):
                return value
    raise ValueError(f"no patch id in marker details {dict(marker.details)!r}")


def _metadata_len(event: HistoryEvent, field: str) -> int:
    if not event.HasField("user_metadata"):
        return 0
    payload = getattr(event.user_metadata, field)
    return len(_decode(payload) or "") if payload.data else 0


def derive_shape(path: str, events: Sequence[HistoryEvent]) -> Shape:
    """The steps that reproduce `events` (one closed `OrderCancellation` history)."""
    shape = Shape(path=path, steps=[], event_counts=event_counts(events))
    steps = shape.steps  # appended to in place (the model holds its own list)
    completed_results: dict[int, int] = {}
    update_replies: list[int] = []
    for e in events:
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            done = e.activity_task_completed_event_attributes
            completed_results[done.scheduled_event_id] = _size(done.result)
        elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            update_replies.append(
                _size_one(e.workflow_execution_update_completed_event_attributes.outcome.success)
            )
    pending_wait: Step | None = None
    activities = 0
    for e in events:
        t = e.event_type
        if t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            start = e.workflow_execution_started_event_attributes
            shape.input_size = _size(start.input)
            shape.start_attrs = _attrs(start.search_attributes.indexed_fields)
            shape.summary_len = _metadata_len(e, "summary")
            shape.details_len = _metadata_len(e, "details")
        elif t == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            fields = e.upsert_workflow_search_attributes_event_attributes.search_attributes
            attrs = [a for a in _attrs(fields.indexed_fields) if a.name != CHANGE_VERSION]
            # The SDK's own upsert of TemporalChangeVersion comes with the patch step.
            if attrs:
                steps.append(Step(op="upsert", attrs=attrs))
        elif t == EventType.EVENT_TYPE_WORKFLOW_PROPERTIES_MODIFIED:
            memo = e.workflow_properties_modified_event_attributes.upserted_memo.fields
            steps.append(Step(op="memo", memo={k: _decode(v) for k, v in memo.items()}))
        elif t == EventType.EVENT_TYPE_MARKER_RECORDED:
            marker = e.marker_recorded_event_attributes
            if marker.marker_name != PATCH_MARKER:
                raise ValueError(f"{path}: marker {marker.marker_name!r} is not reproduced")
            steps.append(Step(op="patch", patch_id=_patch_id(marker)))
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled = e.activity_task_scheduled_event_attributes
            if scheduled.activity_type.name in CONFIRM_ACTIVITIES:
                shape.confirm_index = activities
            activities += 1
            steps.append(
                Step(
                    op="activity",
                    label=scheduled.activity_type.name,
                    in_size=_size(scheduled.input),
                    out_size=completed_results.get(e.event_id, 0),
                    summary=_metadata_len(e, "summary"),
                )
            )
        elif t == EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED:
            # A sibling told that the coupon is settled (`coupon_settled`); one that has ended
            # already answers with a failed signal, as the limit's signal to nobody does.
            steps.append(Step(op="signal", label="coupon_settled"))
        elif t == EventType.EVENT_TYPE_TIMER_STARTED:
            timer = e.timer_started_event_attributes
            pending_wait = Step(
                op="wait",
                timeout_ms=int(timer.start_to_fire_timeout.ToMilliseconds()),
                summary=_metadata_len(e, "summary"),
            )
            steps.append(pending_wait)
        elif t in (
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED,
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
        ):
            shape.message = (
                "signal" if t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED else "update"
            )
            if pending_wait is not None:
                pending_wait.decided = True
                if update_replies and shape.message == "update":
                    pending_wait.reply_size = update_replies[0]
        elif t in (EventType.EVENT_TYPE_TIMER_FIRED, EventType.EVENT_TYPE_TIMER_CANCELED):
            pending_wait = None
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            shape.result_size = _size(e.workflow_execution_completed_event_attributes.result)
    return shape


def _size_one(payloads: Any) -> int:
    return _size(payloads) if payloads is not None else 0


# --- what a history costs ------------------------------------------------------------------


def billable_actions(events: Sequence[HistoryEvent]) -> dict[str, int]:
    """Temporal Cloud actions recorded in a history, by kind (see the module docstring)."""
    counts: Counter[str] = Counter()
    for e in events:
        t = e.event_type
        if t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            counts["workflow_started"] += 1
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            counts["activity_attempts"] += max(e.activity_task_started_event_attributes.attempt, 1)
        elif t == EventType.EVENT_TYPE_TIMER_STARTED:
            counts["timers"] += 1
        elif t == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            fields = e.upsert_workflow_search_attributes_event_attributes.search_attributes
            if set(fields.indexed_fields) - {CHANGE_VERSION}:
                counts["search_attribute_upserts"] += 1
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            counts["signals"] += 1
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            counts["updates"] += 1
    return dict(counts)


def event_time(event: HistoryEvent) -> datetime:
    return event.event_time.ToDatetime().astimezone()


def confirmed_at(events: Sequence[HistoryEvent], confirm_index: int | None) -> datetime | None:
    """When the refund-confirming activity completed: the `confirm_index`-th activity of the
    history (the same position in the product's and the limit's histories)."""
    if confirm_index is None:
        return None
    scheduled = [
        e.event_id for e in events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    if confirm_index >= len(scheduled):
        return None
    target = scheduled[confirm_index]
    for e in events:
        if (
            e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
            and e.activity_task_completed_event_attributes.scheduled_event_id == target
        ):
            return event_time(e)
    return None


def timer_fired_at(events: Sequence[HistoryEvent]) -> datetime | None:
    for e in events:
        if e.event_type == EventType.EVENT_TYPE_TIMER_FIRED:
            return event_time(e)
    return None


# --- the fixed reference: reference-4 ------------------------------------------------------

REFERENCE = "reference-4"
# The reference's seller window: long enough that the driver's update always decides it.
REFERENCE_WINDOW_MS = 3_600_000
REFERENCE_ACTIVITIES = 4


def reference_shape(path: str) -> Shape:
    """`reference-4`, the same for every path: a no-op workflow that is started (no search
    attributes, no memo, no summary), waits on one timer that the update `decide` cancels, then
    runs 4 no-op activities. A fixed yardstick: whatever the product's shape, the product's
    cost against it says what a cancellation costs over "a timer, an update, four steps"."""
    steps = [Step(op="wait", timeout_ms=REFERENCE_WINDOW_MS, decided=True, reply_size=2)]
    steps += [
        Step(op="activity", label=f"noop{i}", in_size=30, out_size=2)
        for i in range(REFERENCE_ACTIVITIES)
    ]
    # "decision -> refund confirmed": the decision to the third step's completion (the
    # product confirms its refund in its third business step).
    return Shape(path=path, steps=steps, message="update", confirm_index=2)
