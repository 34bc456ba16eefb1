"""Connection pool and versioned migrations for the ledger."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from importlib import resources

import asyncpg

# Serialises concurrent `migrate` calls (two workers starting at once) across processes.
_MIGRATION_LOCK = 0x0C_A9_CE_11

ConnectionHook = Callable[[asyncpg.Connection], Awaitable[None]]


async def keep_session(conn: asyncpg.Connection) -> None:
    """What the pool runs on a connection given back to it: nothing.

    asyncpg's default sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL` on every release: one more round trip and one more server transaction per acquire
    (11.5 per cancellation, docs/performance.md, P1). Skipping it is safe because nothing that
    uses the ledger's pools leaves session state on a connection:

    - advisory locks: the only one is `migrate`'s, and it is transaction-scoped
      (`pg_advisory_xact_lock`), released by COMMIT or ROLLBACK whatever happens;
    - LISTEN, cursors (`DECLARE`), temporary tables, `SET` / `set_config(..., false)`: none are
      used anywhere (every statement is a plain `execute`/`fetch*`, in `conn.transaction()`
      or on its own);
    - prepared statements: asyncpg's per-connection statement cache is not touched by the
      reset query either (`RESET ALL` does not deallocate), so nothing changes there;
    - an open transaction (a task cancelled mid-way): asyncpg still rolls it back before this
      hook runs (`Connection._reset`), and terminates the connection if that fails.

    Anything that one day needs session state must use its own connection
    (`asyncpg.connect`), not the pool, or undo it before releasing the connection.
    """
    return None


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    init: ConnectionHook | None = None,
    reset: ConnectionHook = keep_session,
) -> asyncpg.Pool:
    """The ledger's pool. `init` runs on each new connection (the bench counts statements
    there); `reset` on each release after asyncpg's rollback of an open transaction (default:
    nothing, see `keep_session`)."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        # Fail fast on a stuck statement instead of hanging an activity until its timeout.
        command_timeout=30,
        init=init,
        reset=reset,
    )
    assert pool is not None
    return pool


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped with the package, in order."""
    found = []
    for entry in resources.files("ledger.migrations").iterdir():
        match = re.fullmatch(r"(\d{3})_([a-z0-9_]+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the migrations not applied yet, each in its own transaction. Safe to run twice and
    from several processes at once. Returns the versions applied now.

    Each transaction takes the migration lock with `pg_advisory_xact_lock`: released at its
    COMMIT or ROLLBACK, so no advisory lock can outlive the call on a pooled connection (the
    pool does not reset sessions, see `keep_session`). A process waiting for the lock reads the
    applied versions once it has it, so each migration is applied once, in order."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    int PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
    for version, name, sql in migration_files():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            done = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)", version
            )
            if done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
        applied_now.append(version)
    return applied_now
