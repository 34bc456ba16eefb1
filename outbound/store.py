"""The outbox in the ledger (migration 011): the events in stream order, and each subscriber's
position. The events themselves are written by the ledger's trigger, never here."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict


class OutboundEvent(BaseModel):
    """One event as subscribers receive it (the webhook body) and `events tail` shows it."""

    model_config = ConfigDict(frozen=True)

    id: str
    position: int
    type: str
    cancellation_id: str
    order_id: str
    seller_id: str
    buyer_id: str
    occurred_at: datetime
    data: dict[str, Any]

    def body(self) -> bytes:
        """The exact bytes that are signed and sent."""
        return self.model_dump_json().encode()


class SubscriberState(BaseModel):
    name: str
    position: int
    attempts: int
    last_error: str | None
    failing_since: datetime | None
    delivered_at: datetime | None
    # Events after its position in the stream (all types), and when the oldest was written.
    behind: int
    oldest_undelivered_at: datetime | None


_COLUMNS = (
    "event_id AS id, position, type, cancellation_id, order_id, seller_id, buyer_id,"
    " occurred_at, data"
)


def _event(row: asyncpg.Record) -> OutboundEvent:
    values = dict(row)
    if isinstance(values["data"], str):
        values["data"] = json.loads(values["data"])
    return OutboundEvent(**values)


class OutboxStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def sequence(self) -> int:
        """Give positions to the events no running transaction can precede any more (one
        caller at a time in the whole database; another gets 0). Returns how many."""
        n: int = await self._pool.fetchval("SELECT outbox_sequence()")
        return n

    async def events_after(
        self,
        position: int,
        *,
        limit: int = 100,
        cancellation_id: str | None = None,
        event_type: str | None = None,
    ) -> list[OutboundEvent]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM outbox"
            " WHERE position > $1 AND ($2::text IS NULL OR cancellation_id = $2)"
            " AND ($3::text IS NULL OR type = $3)"
            " ORDER BY position LIMIT $4",
            position,
            cancellation_id,
            event_type,
            limit,
        )
        return [_event(r) for r in rows]

    async def last_positions(
        self, n: int, *, cancellation_id: str | None = None, event_type: str | None = None
    ) -> list[int]:
        """The positions of the last `n` matching events, newest first."""
        rows = await self._pool.fetch(
            "SELECT position FROM outbox WHERE position IS NOT NULL"
            " AND ($2::text IS NULL OR cancellation_id = $2)"
            " AND ($3::text IS NULL OR type = $3)"
            " ORDER BY position DESC LIMIT $1",
            n,
            cancellation_id,
            event_type,
        )
        return [r["position"] for r in rows]

    async def last_position(self) -> int:
        value: int = await self._pool.fetchval("SELECT coalesce(max(position), 0) FROM outbox")
        return value

    async def ensure_subscriber(self, name: str) -> int:
        """The subscriber's position; a new subscriber starts at the beginning of the stream."""
        await self._pool.execute(
            "INSERT INTO outbox_subscribers (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
            name,
        )
        position: int = await self._pool.fetchval(
            "SELECT position FROM outbox_subscribers WHERE name = $1", name
        )
        return position

    async def position(self, name: str) -> int | None:
        """The subscriber's stored position (None for an unknown subscriber)."""
        position: int | None = await self._pool.fetchval(
            "SELECT position FROM outbox_subscribers WHERE name = $1", name
        )
        return position

    async def delivered(self, name: str, expected: int, position: int) -> bool:
        """Acknowledged up to `position`, if the position is still `expected`. False when a
        replay (`reset`) moved it meanwhile: a delivery in flight does not undo the replay."""
        result = await self._pool.execute(
            """
            UPDATE outbox_subscribers SET position = $3, attempts = 0, last_error = NULL,
                failing_since = NULL, delivered_at = now(), updated_at = now()
            WHERE name = $1 AND position = $2
            """,
            name,
            expected,
            position,
        )
        return bool(result == "UPDATE 1")

    async def failed(self, name: str, error: str) -> int:
        """One more failed attempt at the subscriber's next event; returns the attempts."""
        attempts: int = await self._pool.fetchval(
            """
            UPDATE outbox_subscribers SET attempts = attempts + 1, last_error = $2,
                failing_since = coalesce(failing_since, now()), updated_at = now()
            WHERE name = $1
            RETURNING attempts
            """,
            name,
            error[:500],
        )
        return attempts

    async def reset(self, name: str, position: int) -> int | None:
        """Move the subscriber's position to `position` (replay: the next event it gets is the
        one after it). Returns the position it had (None: unknown subscriber)."""
        return await self._pool.fetchval(
            """
            WITH old AS (SELECT position FROM outbox_subscribers WHERE name = $1 FOR UPDATE)
            UPDATE outbox_subscribers s SET position = $2, attempts = 0, last_error = NULL,
                failing_since = NULL, updated_at = now()
            FROM old WHERE s.name = $1
            RETURNING old.position
            """,
            name,
            position,
        )

    async def state(self, name: str) -> SubscriberState | None:
        row = await self._pool.fetchrow(
            """
            SELECT s.*,
                   -- Positions are gap-free: the last one less the subscriber's is how many
                   -- are after it (two index lookups, however far behind it is; the
                   -- dispatcher asks every few seconds).
                   greatest((SELECT max(o.position) FROM outbox o) - s.position, 0) AS behind,
                   (SELECT o.occurred_at FROM outbox o WHERE o.position > s.position
                    ORDER BY o.position LIMIT 1) AS oldest_undelivered_at
            FROM outbox_subscribers s WHERE s.name = $1
            """,
            name,
        )
        if row is None:
            return None
        return SubscriberState(
            **{k: row[k] for k in SubscriberState.model_fields if k != "behind"},
            behind=row["behind"],
        )

    async def subscribers(self) -> list[SubscriberState]:
        names = await self._pool.fetch("SELECT name FROM outbox_subscribers ORDER BY name")
        found = [await self.state(r["name"]) for r in names]
        return [s for s in found if s is not None]
