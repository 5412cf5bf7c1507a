"""The SQLite engine's adapter (corral.db.sqlite_driver): a statement is one job on
aiosqlite's thread, a COMMIT or ROLLBACK outside a transaction none, and everything else
behaves as SQLAlchemy's own aiosqlite adapter: rows, rowcount, lastrowid, transactions,
errors, server-side streams, the pragmas set at connect, two connections' locks."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from corral.db.engine import make_engine
from corral.db.sqlite_driver import OneTripConnection


@pytest.fixture
async def engine(tmp_path: Path) -> Any:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}")
    async with engine.begin() as conn:
        await conn.execute(text(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, n INTEGER)"))
    yield engine
    await engine.dispose()


@pytest.fixture
def jobs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every job handed to an aiosqlite connection's thread, by name."""
    seen: list[str] = []
    queue_job = aiosqlite.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(getattr(fn, "__name__", repr(fn)))
        return await queue_job(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return seen


async def test_engine_uses_the_one_trip_adapter(engine: Any) -> None:
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert isinstance(raw.dbapi_connection, OneTripConnection)
        assert isinstance(raw.driver_connection, aiosqlite.Connection)
        pragmas = [(await conn.execute(text(f"PRAGMA {p}"))).scalar_one()
                   for p in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")]
    assert pragmas == ["wal", 1, 1, 30000]


async def test_a_statement_is_one_job_and_no_transaction_none(engine: Any,
                                                             jobs: list[str]) -> None:
    async with engine.connect() as conn:
        jobs.clear()
        rows = (await conn.execute(text("SELECT 1, 'a' UNION ALL SELECT 2, 'b'"))).all()
        assert [tuple(r) for r in rows] == [(1, "a"), (2, "b")]
        assert jobs == ["_run"]
        await conn.rollback()  # nothing began: sqlite3 would do nothing, so nothing is sent
        assert jobs == ["_run"]
    async with engine.begin() as conn:
        jobs.clear()
        await conn.execute(text("INSERT INTO t (name, n) VALUES ('x', 1)"))
    assert jobs == ["_run", "commit"]  # the insert began a transaction: its COMMIT is sent


async def test_rows_rowcount_lastrowid_and_executemany(engine: Any) -> None:
    async with engine.begin() as conn:
        r = await conn.execute(text("INSERT INTO t (name, n) VALUES ('a', 1)"))
        assert r.lastrowid == 1 and r.rowcount == 1
        r = await conn.execute(text("INSERT INTO t (name, n) VALUES (:name, :n)"),
                               [{"name": f"m{i}", "n": i} for i in range(5)])
        assert r.rowcount == 5
        r = await conn.execute(text("UPDATE t SET n = n + 10 WHERE n < 3"))
        assert r.rowcount == 4  # a (1) and m0..m2
        r = await conn.execute(text("INSERT INTO t (name, n) VALUES ('r', 7) RETURNING id, n"))
        assert tuple(r.one()) == (7, 7)
        r = await conn.execute(text("SELECT name FROM t ORDER BY id"))
        assert r.fetchone() == ("a",)
        assert r.fetchmany(2) == [("m0",), ("m1",)]
        assert [row[0] for row in r.fetchall()] == ["m2", "m3", "m4", "r"]
        assert (await conn.execute(text("SELECT name FROM t WHERE 0"))).all() == []


async def test_rollback_discards_and_errors_are_sqlalchemys(engine: Any) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO t (name, n) VALUES ('gone', 1)"))
        await conn.rollback()
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0
        await conn.execute(text("INSERT INTO t (name, n) VALUES ('dup', 1)"))
        with pytest.raises(IntegrityError):
            await conn.execute(text("INSERT INTO t (name, n) VALUES ('dup', 2)"))
        await conn.commit()  # the first insert's transaction is still open: it commits
        with pytest.raises(OperationalError):
            await conn.execute(text("SELECT nope FROM t"))
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT name FROM t"))).scalars().all() == ["dup"]


async def test_a_server_side_stream_still_works(engine: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO t (name, n) VALUES (:name, :n)"),
                           [{"name": f"s{i}", "n": i} for i in range(50)])
    async with engine.connect() as conn:
        result = await conn.stream(text("SELECT n FROM t ORDER BY n"))
        assert [n async for n in result.scalars()] == list(range(50))


async def test_a_second_writer_waits_for_the_first(engine: Any) -> None:
    """One writer at a time, as before: a second connection's write waits (busy timeout)
    while the first holds its transaction, then goes through."""
    import asyncio

    async with engine.connect() as first, engine.connect() as second:
        await first.execute(text("INSERT INTO t (name, n) VALUES ('first', 1)"))
        waiting = asyncio.ensure_future(
            second.execute(text("INSERT INTO t (name, n) VALUES ('second', 2)")))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await first.commit()
        await asyncio.wait_for(waiting, 10)
        await second.commit()
    async with engine.connect() as conn:
        names = (await conn.execute(text("SELECT name FROM t ORDER BY id"))).scalars().all()
    assert names == ["first", "second"]


async def test_requests_in_flight_keep_their_connections(engine: Any) -> None:
    """32 sessions at once (bench B1's wrk connections) each get a pooled connection and
    give it back: none is opened for one request and closed after it (an aiosqlite thread
    and the pragmas each time, with SQLAlchemy's default pool of 5)."""
    import asyncio

    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import AsyncSession

    from corral.db.engine import SQLITE_POOL_SIZE

    opened: list[Any] = []
    closed: list[Any] = []
    event.listen(engine.sync_engine, "connect", lambda *a: opened.append(a))
    event.listen(engine.sync_engine, "close", lambda *a: closed.append(a))
    gate = asyncio.Event()

    async def request() -> None:
        async with AsyncSession(engine) as db:
            await db.execute(text("SELECT count(*) FROM t"))
            await gate.wait()  # all in flight together

    for _round in range(2):
        tasks = [asyncio.create_task(request()) for _ in range(SQLITE_POOL_SIZE)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*tasks)
        gate.clear()
    assert SQLITE_POOL_SIZE >= 32
    assert len(opened) <= SQLITE_POOL_SIZE and closed == []
    assert engine.sync_engine.pool.checkedin() == SQLITE_POOL_SIZE  # all kept, all idle


async def test_execute_and_commit_is_one_job_and_commits(engine: Any, jobs: list[str],
                                                         tmp_path: Path) -> None:
    """A transaction's last statement and its COMMIT in one trip; the caller's commit
    afterwards sends nothing, and another connection sees the rows at once."""
    from corral.db.sqlite_driver import execute_and_commit

    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO t (name, n) VALUES ('first', 0)"))
        jobs.clear()
        await execute_and_commit(conn, "INSERT INTO t (name, n) VALUES (?, ?)",
                                 [("a", 1), ("b", 2)])
        await conn.commit()
    assert jobs == ["_run_and_commit"]
    async with aiosqlite.connect(tmp_path / "driver.db") as other:
        rows = await (await other.execute("SELECT name, n FROM t ORDER BY id")).fetchall()
    assert rows == [("first", 0), ("a", 1), ("b", 2)]


async def test_execute_and_commit_failing_leaves_the_rollback(engine: Any) -> None:
    """A failing statement commits nothing: the transaction stays open (the earlier
    statement in it too) and the caller's rollback discards it."""
    from corral.db.sqlite_driver import execute_and_commit

    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO t (name, n) VALUES ('first', 0)"))
        with pytest.raises(Exception, match="UNIQUE"):
            await execute_and_commit(conn, "INSERT INTO t (name, n) VALUES (?, ?)",
                                     [("a", 1), ("a", 2)])
        await conn.rollback()
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0


async def test_commit_alone_commits_or_leaves_nothing(engine: Any, jobs: list[str],
                                                      tmp_path: Path) -> None:
    """A transaction of its own on a pooled connection, one job: committed when it returns;
    a failing one commits none of its rows and leaves no transaction open on the connection
    the pool gets back (the next user of the pool sees and locks nothing stale)."""
    from corral.db.sqlite_driver import commit_alone

    await commit_alone(engine, "INSERT INTO t (name, n) VALUES (?, ?)", [("a", 1), ("b", 2)])
    assert jobs == ["_run_and_commit"]
    async with aiosqlite.connect(tmp_path / "driver.db") as other:
        rows = await (await other.execute("SELECT name, n FROM t ORDER BY id")).fetchall()
    assert rows == [("a", 1), ("b", 2)]
    with pytest.raises(sqlite3.IntegrityError):
        await commit_alone(engine, "INSERT INTO t (name, n) VALUES (?, ?)", [("c", 3), ("a", 4)])
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert not raw.driver_connection.in_transaction
        names = (await conn.execute(text("SELECT name FROM t ORDER BY id"))).scalars().all()
    assert names == ["a", "b"]
    async with aiosqlite.connect(tmp_path / "driver.db") as other:  # no lock left behind
        await other.execute("INSERT INTO t (name, n) VALUES ('d', 5)")
        await other.commit()
