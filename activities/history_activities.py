"""R19's timeliness: when the server received a signal, from the workflow's own history.

The Python SDK runs every signal of a workflow task before the timer that fired in the same
task, whatever their order in history, and tells a handler neither when the server received
the signal nor its event id. A seller's decision handled at or after the deadline may have
reached the server before it (no worker ran then) or after it: this activity counts how many
signals of that name the server recorded in this run before the deadline, so the workflow can
tell the k-th one it handled was in time."""

from __future__ import annotations

from datetime import UTC

from temporalio import activity
from temporalio.client import Client

from domain.models import SignalsBeforeInput


class HistoryActivities:
    def __init__(self, client: Client) -> None:
        self._client = client

    @activity.defn
    async def signals_before(self, params: SignalsBeforeInput) -> int:
        handle = self._client.get_workflow_handle(params.workflow_id, run_id=params.run_id)
        count = 0
        async for event in handle.fetch_history_events():
            if not event.HasField("workflow_execution_signaled_event_attributes"):
                continue
            attributes = event.workflow_execution_signaled_event_attributes
            received = event.event_time.ToDatetime(tzinfo=UTC)
            if attributes.signal_name == params.signal_name and received < params.deadline:
                count += 1
        return count
