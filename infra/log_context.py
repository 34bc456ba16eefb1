"""Every log line about a cancellation carries its ids, whoever writes it.

`LogContextInterceptor` is registered on the worker. It binds structlog context variables
(merged into stdlib records too, see `infra.logging`) for the task that runs each activity and
each workflow run, signal and update:

- activities: `workflow_id`, `run_id`, `activity`, `attempt` from `activity.info()`, and
  `order_id`, `seller_id`, `buyer_id` from a header the workflow side puts on every activity it
  schedules (the workflow id `cancel-{order}~{seller}` is not split back here);
- workflows: the same ids, read from the workflow input (or, before the run has started, from
  the search attributes the starter set). `workflow.logger` adds `workflow_id` and `run_id`
  itself through its `extra`, which `infra.logging` turns into fields.

Binding context variables and adding a header change no workflow command, so this is safe for
running workflows and replays. Each activity, workflow run, signal and update runs in an asyncio
task of its own, whose context is a copy: what is bound there stays there, and lasts until the
task ends, so the SDK's own lines about the task ("Completing activity as failed") carry it too.
Validators and queries run outside such a task and bind nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadConverter
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    ExecuteWorkflowInput,
    HandleSignalInput,
    HandleUpdateInput,
    Interceptor,
    StartActivityInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

HEADER = "ordercancel-log-context"
ID_FIELDS = ("order_id", "seller_id", "buyer_id")
# Search attributes holding the same ids (see workflows/search_attributes.py).
_SEARCH_ATTRIBUTES = {"OrderId": "order_id", "SellerId": "seller_id", "BuyerId": "buyer_id"}


def ids_of(value: Any) -> dict[str, str]:
    """The business ids of a workflow or activity input: `RequestCancellationInput`, or a
    model holding one as `request` (`OpenCancellationInput`), or either as the JSON object the
    workflow's untyped input decodes to (read once per run, not from the search attributes
    on every activity it schedules)."""
    if isinstance(value, Mapping):
        request = value.get("request", value)
        pairs = (
            {name: request.get(name) for name in ID_FIELDS} if isinstance(request, Mapping) else {}
        )
    else:
        request = getattr(value, "request", value)
        pairs = {name: getattr(request, name, None) for name in ID_FIELDS}
    return {name: v for name, v in pairs.items() if isinstance(v, str)}


def _encode(ids: Mapping[str, str]) -> Payload:
    # The default converter on both sides, whatever data converter the client uses.
    return PayloadConverter.default.to_payloads([dict(ids)])[0]


def _decode(headers: Mapping[str, Payload]) -> dict[str, str]:
    payload = headers.get(HEADER)
    if payload is None:
        return {}
    try:
        value = PayloadConverter.default.from_payloads([payload])[0]
    except Exception:  # a foreign or newer header must never fail the activity
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if k in ID_FIELDS and isinstance(v, str)}


class LogContextInterceptor(Interceptor):
    """Worker interceptor binding cancellation ids into the logging context."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityInbound(next)

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _WorkflowInbound


class _ActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        fields: dict[str, Any] = {
            "workflow_id": info.workflow_id,
            "run_id": info.workflow_run_id,
            "activity": info.activity_type,
            "attempt": info.attempt,
        }
        ids = _decode(input.headers)
        if not ids and input.args:
            ids = ids_of(input.args[0])
        # Not reset afterwards on purpose: this task runs this one activity attempt only.
        structlog.contextvars.bind_contextvars(**fields, **ids)
        return await self.next.execute_activity(input)


class _WorkflowInbound(WorkflowInboundInterceptor):
    def __init__(self, next: WorkflowInboundInterceptor) -> None:
        super().__init__(next)
        self.ids: dict[str, str] = {}

    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_WorkflowOutbound(outbound, self))

    def current_ids(self) -> dict[str, str]:
        if self.ids:
            return self.ids
        return {
            _SEARCH_ATTRIBUTES[pair.key.name]: pair.value
            for pair in workflow.info().typed_search_attributes
            if pair.key.name in _SEARCH_ATTRIBUTES and isinstance(pair.value, str)
        }

    def _bind(self) -> None:
        info = workflow.info()
        structlog.contextvars.bind_contextvars(
            workflow_id=info.workflow_id, run_id=info.run_id, **self.current_ids()
        )

    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        if input.args:
            self.ids = ids_of(input.args[0])
        self._bind()
        return await super().execute_workflow(input)

    async def handle_signal(self, input: HandleSignalInput) -> None:
        self._bind()
        await super().handle_signal(input)

    async def handle_update_handler(self, input: HandleUpdateInput) -> Any:
        self._bind()
        return await super().handle_update_handler(input)


class _WorkflowOutbound(WorkflowOutboundInterceptor):
    def __init__(self, next: WorkflowOutboundInterceptor, inbound: _WorkflowInbound) -> None:
        super().__init__(next)
        self._inbound = inbound
        # The header of the ids last encoded: a run's ids do not change, and each activity it
        # schedules carries them (one encoding per run instead of one per activity).
        self._encoded: tuple[dict[str, str], Payload] | None = None

    def _with_ids(self, headers: Mapping[str, Payload]) -> Mapping[str, Payload]:
        ids = self._inbound.current_ids()
        if not ids:
            return headers
        if self._encoded is None or self._encoded[0] != ids:
            self._encoded = (dict(ids), _encode(ids))
        return {**headers, HEADER: self._encoded[1]}

    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = self._with_ids(input.headers)
        return super().start_activity(input)

    def start_local_activity(self, input: StartLocalActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = self._with_ids(input.headers)
        return super().start_local_activity(input)
