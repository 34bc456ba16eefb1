"""Every statement a process sends to PostgreSQL, counted through asyncpg's query loggers.

`counting_pool` makes the product's asyncpg pool (`ledger.db.create_pool`) whose every
connection reports each statement it executes (`Connection.add_query_logger`, asyncpg >= 0.29).
That covers all of asyncpg's entry points (`execute`, `fetch*`, `executemany`), the `BEGIN` /
`COMMIT` / `ROLLBACK` of `conn.transaction()` and the pool's reset query on release, should one
be sent (the product's pool sends none since P1, docs/performance.md; `pool_reset` puts asyncpg's
default back so that tests/test_ledger_round_trips.py can show the counter would see one).
Each statement is at least one network round trip (a prepared-statement cache miss adds a Parse
round trip, not counted).

Statements touching schema `provider_sim` belong to the payment-provider simulator (in
production that is an HTTPS call, not the ledger); the others to the ledger. Transactions are
explicit (`BEGIN`) or implicit (a statement outside a transaction commits on its own).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from temporalio import activity

from ledger.db import create_pool

LEDGER = "ledger"
PROVIDER = "provider_sim"


@dataclass
class _Conn:
    in_transaction: bool = False
    statements: int = 0
    provider: bool = False
    last: str = LEDGER


@dataclass
class SqlCounter:
    """Totals by category (`ledger`, `provider_sim`): `.statements` (round trips, pool resets
    included), `.transactions`, `.resets`; and `rollbacks`.

    An explicit transaction (`BEGIN` ... `COMMIT`), with its `BEGIN` and `COMMIT`, belongs to the
    provider simulator if one of its statements touched schema `provider_sim`; a statement
    outside a transaction (an implicit transaction) by its own text; a pool reset to whatever
    the connection did last."""

    totals: Counter[str] = field(default_factory=Counter)
    _conns: dict[int, _Conn] = field(default_factory=dict)

    def logger_for(self, conn: asyncpg.Connection) -> Any:
        state = self._conns.setdefault(id(conn), _Conn())

        def log(record: Any) -> None:
            self._record(state, record.query)
            # asyncpg calls loggers with `call_soon` from the task that ran the statement, so
            # the activity's context (and its type) is the current one here.
            self.totals[f"by_activity.{_activity_type()}"] += 1

        return log

    def _add(self, category: str, statements: int, transactions: int, resets: int = 0) -> None:
        self.totals[f"{category}.statements"] += statements
        self.totals[f"{category}.transactions"] += transactions
        self.totals[f"{category}.resets"] += resets

    def _record(self, state: _Conn, query: str) -> None:
        head = query.lstrip()[:40].upper()
        if head.startswith("BEGIN"):
            state.in_transaction, state.statements, state.provider = True, 1, False
        elif head.startswith(("COMMIT", "ROLLBACK")):
            category = PROVIDER if state.provider else LEDGER
            self._add(category, state.statements + 1, 1)
            if head.startswith("ROLLBACK"):
                self.totals["rollbacks"] += 1
            state.in_transaction, state.statements, state.last = False, 0, category
        elif head.startswith("SELECT PG_ADVISORY_UNLOCK_ALL"):
            # The pool's reset on release (`Connection.get_reset_query`).
            self._add(state.last, 1, 0, resets=1)
        elif state.in_transaction:
            state.statements += 1
            state.provider = state.provider or "provider_sim." in query
        else:
            category = PROVIDER if "provider_sim." in query else LEDGER
            self._add(category, 1, 1)
            state.last = category

    def snapshot(self) -> dict[str, int]:
        """Totals so far (statements of transactions still open are counted at their end)."""
        return dict(self.totals)

    def reset(self) -> None:
        self.totals.clear()


def _activity_type() -> str:
    try:
        return activity.info().activity_type
    except RuntimeError:
        return "(outside activities)"


async def counting_pool(
    dsn: str,
    counter: SqlCounter,
    *,
    min_size: int = 2,
    max_size: int = 10,
    pool_reset: bool = False,
) -> asyncpg.Pool:
    """`ledger.db.create_pool`'s pool, every statement counted in `counter`; with
    `pool_reset`, connections go back to the pool through asyncpg's default reset query (to
    show the counter sees it)."""

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(counter.logger_for(conn))

    if pool_reset:
        return await create_pool(
            dsn, min_size=min_size, max_size=max_size, init=init, reset=session_reset
        )
    return await create_pool(dsn, min_size=min_size, max_size=max_size, init=init)


async def session_reset(conn: asyncpg.Connection) -> None:
    """asyncpg's default reset on release (`SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`), which the product's pool skips (`ledger.db.keep_session`)."""
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)
