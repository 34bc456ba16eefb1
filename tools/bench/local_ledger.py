"""Experiment `ordercancel bench --local-ledger`: the ledger's activities as local activities.

The product schedules every ledger write as a regular activity, which operators see as a step
of its own (summary, attempts, pending state in the Web UI and `temporal workflow describe`).
A local activity runs in the worker that runs the workflow task and is only a marker in the
history: fewer events and server round trips, less to see. To measure what that price buys,
`LocalLedgerInterceptor` (on the bench's product worker only) turns each ledger activity the
workflow starts into a local activity with the same input, timeout, retry policy and summary.
The workflow code is untouched; `bench.shape` reproduces the markers on the limit side with
local activities of the same sizes. Docs: docs/performance.md ("Tuning tried").
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from temporalio import workflow
from temporalio.worker import (
    Interceptor,
    StartActivityInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from activities.ledger_activities import LedgerActivities

# The activity types of activities.ledger_activities.LedgerActivities (each is named after its
# method: `@activity.defn` without a name).
LEDGER_ACTIVITIES = frozenset(
    name
    for name, member in vars(LedgerActivities).items()
    if hasattr(member, "__temporal_activity_definition")
)


class LocalLedgerInterceptor(Interceptor):
    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _Inbound


class _Inbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_Outbound(outbound))


class _Outbound(WorkflowOutboundInterceptor):
    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        if input.activity not in LEDGER_ACTIVITIES:
            return super().start_activity(input)
        # Every field the two inputs share, as given (a local activity has no task queue,
        # heartbeat, eager dispatch, versioning or priority), and the SDK's default threshold
        # for retrying inside the workflow task.
        shared = {
            f.name: getattr(input, f.name)
            for f in fields(StartLocalActivityInput)
            if f.name != "local_retry_threshold"
        }
        return super().start_local_activity(
            StartLocalActivityInput(**shared, local_retry_threshold=None)
        )
