"""`BenchLimitShape`: the engine's limit for the cancellation's event shape.

A no-op workflow that replays the steps `bench.shape.derive_shape` read from a real
`OrderCancellation` history: the same search-attribute upserts (same attributes and values),
memo upsert, patch marker, activities (payloads and summaries of the same sizes; the activity
returns at once and touches no database), timers, and the seller's decision as update `decide`
or signal `seller_decision`, refused (like the product) until the workflow waits for it.
Its own workflow type, never part of the product's contract.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributeUpdate
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from tools.bench.shape import LimitInput, SaValue

LIMIT_WORKFLOW = "BenchLimitShape"
NOOP_ACTIVITY = "bench_noop"
_TIMEOUT = timedelta(seconds=30)
_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500), maximum_interval=timedelta(seconds=30)
)


class NoopIn(BaseModel):
    out_size: int
    pad: str = ""


@activity.defn(name=NOOP_ACTIVITY)
async def bench_noop(params: NoopIn) -> str:
    """Returns at once a result as large as the product activity's."""
    return "r" * params.out_size


def _key(attr: SaValue) -> SearchAttributeKey[Any]:
    makers: dict[str, Any] = {
        "Keyword": SearchAttributeKey.for_keyword,
        "Text": SearchAttributeKey.for_text,
        "Int": SearchAttributeKey.for_int,
        "Double": SearchAttributeKey.for_float,
        "Bool": SearchAttributeKey.for_bool,
        "Datetime": SearchAttributeKey.for_datetime,
        "KeywordList": SearchAttributeKey.for_keyword_list,
    }
    key: SearchAttributeKey[Any] = makers[attr.kind](attr.name)
    return key


def sa_update(attr: SaValue) -> SearchAttributeUpdate[Any]:
    key = _key(attr)
    if attr.value is None:
        return key.value_unset()
    value = attr.value
    if attr.kind == "Datetime" and isinstance(value, str):
        value = datetime.fromisoformat(value)
    return key.value_set(value)


@workflow.defn(name=LIMIT_WORKFLOW)
class BenchLimitShape:
    @workflow.init
    def __init__(self, params: LimitInput) -> None:
        self._waiting = False
        self._decided = False
        self._reply_size = 0

    @workflow.run
    async def run(self, params: LimitInput) -> str:
        for step in params.steps:
            if step.op == "upsert":
                workflow.upsert_search_attributes([sa_update(a) for a in step.attrs])
            elif step.op == "memo":
                workflow.upsert_memo(step.memo)
            elif step.op == "patch":
                workflow.patched(step.patch_id)
            elif step.op == "signal":
                # To a workflow that does not run: the same two events as the product's
                # signal to a sibling that has ended.
                nobody = workflow.get_external_workflow_handle(
                    f"{workflow.info().workflow_id}~none"
                )
                with contextlib.suppress(Exception):
                    await nobody.signal(step.label)
            elif step.op == "activity":
                await workflow.execute_activity(
                    bench_noop,
                    NoopIn(out_size=max(step.out_size - 2, 0), pad="i" * max(step.in_size - 30, 0)),
                    start_to_close_timeout=_TIMEOUT,
                    retry_policy=_RETRY,
                    summary="s" * step.summary if step.summary else None,
                )
            elif step.op == "wait":
                self._waiting, self._decided, self._reply_size = True, False, step.reply_size
                try:
                    await workflow.wait_condition(
                        lambda: self._decided,
                        timeout=timedelta(milliseconds=step.timeout_ms),
                        timeout_summary="t" * step.summary if step.summary else None,
                    )
                except TimeoutError:
                    pass
                self._waiting = False
        await workflow.wait_condition(workflow.all_handlers_finished)
        return "r" * max(params.result_size - 2, 0)

    @workflow.update
    def decide(self, payload: Any) -> str:
        self._decided = True
        return "d" * max(self._reply_size - 2, 0)

    @decide.validator
    def _validate_decide(self, payload: Any) -> None:
        if not self._waiting or self._decided:
            raise ApplicationError("not pending", type="not_pending", non_retryable=True)

    @workflow.signal
    def seller_decision(self, payload: Any) -> None:
        if self._waiting:
            self._decided = True
