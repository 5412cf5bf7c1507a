"""PostgreSQL's driver adapter (corral.db.pg_driver): a session's plain reads before its first
write run outside a transaction (no BEGIN, no ROLLBACK: two round trips of a read-only
request's three), and everything that needs a transaction still gets one: writes, locking
reads, functions with transactional effects, other isolation levels, work on the bare
asyncpg connection after ``pg_driver.begin``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.db import pg_driver
from corral.db.engine import make_engine


@pytest.mark.parametrize("sql", [
    "SELECT users.id FROM users WHERE users.id = $1",
    "  select 1",
    "SELECT anon_1.part FROM (SELECT 1 AS part UNION ALL SELECT 2) AS anon_1",
])
def test_plain_reads(sql: str) -> None:
    assert pg_driver.plain_read(sql)


@pytest.mark.parametrize("sql", [
    "INSERT INTO t (a) VALUES ($1)",
    "UPDATE t SET a = 1",
    "DELETE FROM t",
    "WITH ids AS (SELECT nextval('s')) SELECT * FROM ids",
    "SELECT t.id FROM t WHERE t.id = $1 FOR UPDATE",
    "SELECT t.id FROM t FOR UPDATE SKIP LOCKED",
    "SELECT t.id FROM t FOR NO KEY UPDATE",
    "SELECT t.id FROM t FOR SHARE",
    "SELECT t.id FROM t\nFOR KEY SHARE",
    "SELECT pg_try_advisory_xact_lock(42), 1",
    "SELECT pg_advisory_xact_lock(hashtext('x'))",
    "SELECT set_config('a.b', 'c', true)",
    "SELECT nextval('events_id_seq')",
    "SELECT txid_current()",
    "SAVEPOINT sa_savepoint_1",
    "LOCK TABLE t",
    "SET LOCAL statement_timeout = 5",
    # the test is on the text: a literal that reads like a lock takes the safe side
    "SELECT devices.id FROM devices WHERE devices.name = 'x for update'",
])
def test_statements_that_need_a_transaction(sql: str) -> None:
    assert not pg_driver.plain_read(sql)


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[Any]:
    if database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's driver adapter (the suite's PostgreSQL pass)")
    engine = make_engine(database_url, pool_size=3)
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS pg_driver_probe"))
        await conn.execute(text("CREATE TABLE pg_driver_probe (id int PRIMARY KEY, v text)"))
        await conn.execute(text("INSERT INTO pg_driver_probe VALUES (1, 'one')"))
    yield engine
    async with engine.begin() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS pg_driver_probe"))
    await engine.dispose()


async def _in_transaction(db: AsyncSession) -> bool:
    raw = (await (await db.connection()).get_raw_connection()).driver_connection
    assert raw is not None
    return bool(raw.is_in_transaction())


async def _state(engine: Any, pid: int) -> str:
    async with engine.connect() as conn:
        return str((await conn.execute(text(
            "SELECT state FROM pg_stat_activity WHERE pid = :p"), {"p": pid})).scalar_one())


async def test_a_read_only_session_sends_no_begin_and_leaves_no_transaction(pg: Any) -> None:
    assert isinstance(pg.sync_engine.dialect.loaded_dbapi, pg_driver.LazyBeginDBAPI)
    sent: list[str] = []
    async with AsyncSession(pg) as db:
        raw = (await (await db.connection()).get_raw_connection()).driver_connection
        original = raw._protocol.query

        async def spy(query: str, *args: Any, **kwargs: Any) -> Any:
            sent.append(query)  # simple-query protocol: BEGIN, COMMIT, ROLLBACK
            return await original(query, *args, **kwargs)

        raw._protocol.query = spy
        try:
            pid = raw.get_server_pid()
            assert (await db.execute(text("SELECT v FROM pg_driver_probe WHERE id = 1"))
                    ).scalar_one() == "one"
            assert not await _in_transaction(db)
            assert await _state(pg, pid) == "idle"  # not "idle in transaction"
            await db.commit()
        finally:
            raw._protocol.query = original
    assert not any(q.strip().upper().startswith(("BEGIN", "ROLLBACK", "COMMIT")) for q in sent)


async def test_the_first_write_begins_the_transaction_and_rollback_undoes_it(pg: Any) -> None:
    async with AsyncSession(pg) as db:
        await db.execute(text("SELECT v FROM pg_driver_probe WHERE id = 1"))
        assert not await _in_transaction(db)
        await db.execute(text("INSERT INTO pg_driver_probe VALUES (2, 'two')"))
        assert await _in_transaction(db)
        # read your writes: the reads after the first write run in its transaction
        assert (await db.execute(text("SELECT count(*) FROM pg_driver_probe"))
                ).scalar_one() == 2
        await db.rollback()
    async with AsyncSession(pg) as db:
        assert (await db.execute(text("SELECT count(*) FROM pg_driver_probe"))
                ).scalar_one() == 1


async def test_a_locking_read_holds_its_lock_until_the_commit(pg: Any) -> None:
    maker = async_sessionmaker(pg, expire_on_commit=False)
    async with maker() as holder, maker() as other:
        await holder.execute(text("SELECT v FROM pg_driver_probe WHERE id = 1 FOR UPDATE"))
        assert await _in_transaction(holder)
        with pytest.raises(DBAPIError, match="could not obtain lock"):
            await other.execute(text(
                "SELECT v FROM pg_driver_probe WHERE id = 1 FOR UPDATE NOWAIT"))
        await other.rollback()
        await holder.commit()
        await other.execute(text("SELECT v FROM pg_driver_probe WHERE id = 1 FOR UPDATE NOWAIT"))
        await other.commit()


async def test_an_advisory_transaction_lock_is_held_until_the_commit(pg: Any) -> None:
    maker = async_sessionmaker(pg)
    async with maker() as holder, maker() as other:
        assert (await holder.execute(text("SELECT pg_try_advisory_xact_lock(8675309)"))
                ).scalar_one() is True
        assert (await other.execute(text("SELECT pg_try_advisory_xact_lock(8675309)"))
                ).scalar_one() is False
        await other.rollback()
        await holder.commit()
        assert (await other.execute(text("SELECT pg_try_advisory_xact_lock(8675309)"))
                ).scalar_one() is True
        await other.commit()


async def test_repeatable_read_keeps_one_snapshot(pg: Any) -> None:
    async with AsyncSession(pg) as db:
        conn = await db.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        first = (await conn.execute(text("SELECT v FROM pg_driver_probe WHERE id = 1"))
                 ).scalar_one()
        async with pg.begin() as writer:
            await writer.execute(text("UPDATE pg_driver_probe SET v = 'changed' WHERE id = 1"))
        again = (await conn.execute(text("SELECT v FROM pg_driver_probe WHERE id = 1"))
                 ).scalar_one()
        assert first == again == "one"
        await db.rollback()
    async with AsyncSession(pg) as db:  # back at READ COMMITTED: lazy again, sees the change
        assert (await db.execute(text("SELECT v FROM pg_driver_probe WHERE id = 1"))
                ).scalar_one() == "changed"
        assert not await _in_transaction(db)


async def test_begin_puts_work_on_the_bare_connection_in_the_session_transaction(pg: Any) -> None:
    async with AsyncSession(pg) as db:
        conn = await db.connection()
        await conn.execute(text("SELECT 1"))  # a read: no transaction yet
        await pg_driver.begin(conn)
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None and raw.is_in_transaction()
        await raw.copy_records_to_table("pg_driver_probe", records=[(3, "three")],
                                        columns=("id", "v"))
        await db.rollback()  # the COPY goes with it
    async with AsyncSession(pg) as db:
        assert (await db.execute(text("SELECT count(*) FROM pg_driver_probe WHERE id = 3"))
                ).scalar_one() == 0


async def test_a_streamed_read_still_runs_in_a_transaction(pg: Any) -> None:
    async with AsyncSession(pg) as db:
        result = await db.stream(text("SELECT id FROM pg_driver_probe ORDER BY id"))
        assert [row[0] async for row in result] == [1]
        await db.rollback()


async def test_a_failed_read_leaves_the_session_usable(pg: Any) -> None:
    async with AsyncSession(pg) as db:
        with pytest.raises(DBAPIError):
            await db.execute(text("SELECT 1 / 0"))
        await db.rollback()
        assert (await db.execute(text("SELECT v FROM pg_driver_probe WHERE id = 1"))
                ).scalar_one() == "one"
