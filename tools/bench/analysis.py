"""Figures from what a side did: percentiles, and what the histories of its cancellations say
(events, billable actions, when the refund was confirmed)."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from tools.bench.driver import Timing
from tools.bench.shape import Shape, billable_actions, confirmed_at, event_counts, timer_fired_at


def percentiles(values: Sequence[float], points: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """Linear-interpolated percentiles (`p50`, ...); empty input gives an empty dict."""
    data = sorted(values)
    if not data:
        return {}
    found = {}
    for p in points:
        rank = (len(data) - 1) * p / 100
        low, high = math.floor(rank), math.ceil(rank)
        found[f"p{p}"] = data[low] + (data[high] - data[low]) * (rank - low)
    return found


async def fetch_events(client: Client, workflow_id: str) -> list[HistoryEvent]:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return list(history.events)


@dataclass
class HistoryFigures:
    sample: int = 0
    events: list[int] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    actions_by_kind: Counter[str] = field(default_factory=Counter)
    decision_to_confirmed: list[float] = field(default_factory=list)
    counts_by_shape: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        n = max(self.sample, 1)
        return {
            "sample": self.sample,
            "events_per_cancellation": sum(self.events) / n,
            "actions_per_cancellation": sum(self.actions) / n,
            "actions_by_kind": {k: v / n for k, v in sorted(self.actions_by_kind.items())},
        }


async def analyse_histories(
    client: Client,
    timings: Sequence[Timing],
    shapes: dict[str, Shape],
    *,
    sample: int,
    concurrency: int = 8,
    seed: int = 11,
) -> HistoryFigures:
    """Fetch the histories of up to `sample` finished cancellations (a uniform sample)."""
    done = [t for t in timings if t.error is None and t.workflow_id]
    chosen = done if len(done) <= sample else random.Random(seed).sample(done, sample)
    figures = HistoryFigures(sample=len(chosen))
    gate = asyncio.Semaphore(concurrency)

    async def one(timing: Timing) -> None:
        async with gate:
            events = await fetch_events(client, timing.workflow_id)
        figures.events.append(len(events))
        actions = billable_actions(events)
        figures.actions.append(sum(actions.values()) + timing.rejected_updates)
        figures.actions_by_kind.update(actions)
        if timing.rejected_updates:
            figures.actions_by_kind["rejected_updates"] += timing.rejected_updates
        figures.counts_by_shape.setdefault(timing.shape_key, event_counts(events))
        shape = shapes.get(timing.shape_key)
        confirmed = confirmed_at(events, shape.confirm_index if shape else None)
        decided: float | None = timing.decided
        if decided is None:
            fired = timer_fired_at(events)
            decided = fired.timestamp() if fired is not None else None
        if confirmed is not None and decided is not None:
            figures.decision_to_confirmed.append(confirmed.timestamp() - decided)

    await asyncio.gather(*(one(t) for t in chosen))
    return figures
