import asyncpg

from ledger.db import migrate, migration_files


async def test_migrations_apply_once_and_twice_is_harmless(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # The template already applied everything: a second run applies nothing.
        assert await migrate(conn) == []
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert versions == [v for v, _, _ in migration_files()]
    finally:
        await conn.close()


async def test_audit_trail_is_append_only(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO checkout_orders VALUES ('O-1','B-1','EUR','h', now(), now())"
        )
        await conn.execute(
            "INSERT INTO sub_orders (order_id, seller_id, status, items_minor, discount_minor,"
            " shipping_minor, cash_minor) VALUES ('O-1','S-1','accepted',100,0,0,100)"
        )
        await conn.execute(
            "INSERT INTO cancellations (cancellation_id, order_id, seller_id, buyer_id, reason,"
            " fault, path, status) VALUES ('c','O-1','S-1','B-1','other','seller','request','x')"
        )
        await conn.execute(
            "INSERT INTO cancellation_events (cancellation_id, event_key, actor, kind)"
            " VALUES ('c','k','buyer:B-1','requested')"
        )
        for statement in (
            "UPDATE cancellation_events SET kind = 'forged'",
            "DELETE FROM cancellation_events",
        ):
            try:
                await conn.execute(statement)
            except asyncpg.InsufficientPrivilegeError as err:
                assert "append-only" in str(err)
            else:
                raise AssertionError(f"{statement} was allowed")
        assert await conn.fetchval("SELECT kind FROM cancellation_events") == "requested"
