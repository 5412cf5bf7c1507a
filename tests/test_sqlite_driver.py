"""The SQLite engine's adapter (corral.db.sqlite_driver): a statement is one job on
aiosqlite's thread, a read outside a transaction and a COMMIT or ROLLBACK outside a
transaction none (a read that runs long is interrupted and finishes there), and everything else
behaves as SQLAlchemy's own aiosqlite adapter: rows, rowcount, lastrowid, transactions,
errors, server-side streams, the pragmas set at connect, two connections' locks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from corral.db import sqlite_driver
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
        assert jobs == []  # a read outside a transaction: on this thread
        await conn.rollback()  # nothing began: sqlite3 would do nothing, so nothing is sent
        assert jobs == []
    async with engine.begin() as conn:
        jobs.clear()
        await conn.execute(text("INSERT INTO t (name, n) VALUES ('x', 1)"))
        # inside the transaction the insert began, a read goes to the thread, in order
        assert (await conn.execute(text("SELECT n FROM t WHERE name = 'x'"))).scalar_one() == 1
    assert jobs == ["_run", "_run", "commit"]  # the insert began a transaction: COMMIT sent


async def test_a_read_outside_a_transaction_runs_on_the_event_loops_thread(
        engine: Any, jobs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    threads: list[int] = []
    run = sqlite_driver._run

    def spied(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return run(*args)

    monkeypatch.setattr(sqlite_driver, "_run", spied)
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert raw.dbapi_connection.reads_inline  # the journal is a WAL
        jobs.clear()
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0
        await conn.execute(text("INSERT INTO t (name, n) VALUES ('y', 2)"))
        await conn.commit()
    assert jobs == ["spied", "commit"]  # the insert and its COMMIT went to the thread
    assert threads[0] == threading.get_ident() and threads[1] != threads[0]


async def test_a_long_read_is_interrupted_and_finishes_on_the_database_thread(
        engine: Any, jobs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A read past the budget does not hold the event loop: the progress handler stops it,
    it runs again on the connection's thread with the same answer, and the same SQL goes
    there directly from then on."""
    monkeypatch.setattr(sqlite_driver, "_slow", set())
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO t (name, n) VALUES (:name, :n)"),
                           [{"name": f"r{i}", "n": i} for i in range(1000)])
    long_read = "SELECT count(*) FROM t a, t b WHERE a.n + b.n >= :least"
    compiled = long_read.replace(":least", "?")  # the SQL sqlite3 is given
    ticks: list[float] = []
    loop = asyncio.get_running_loop()

    def tick() -> None:
        ticks.append(loop.time())
        handle[0] = loop.call_later(0.001, tick)

    handle = [loop.call_soon(tick)]
    inline_tries: list[str] = []
    run_here = sqlite_driver._run_here
    monkeypatch.setattr(sqlite_driver, "_run_here",
                        lambda conn, op, p: inline_tries.append(op) or run_here(conn, op, p))
    async with engine.connect() as conn:
        jobs.clear()
        started = loop.time()
        count = (await conn.execute(text(long_read), {"least": 0})).scalar_one()
        took = loop.time() - started
        assert count == 1000 * 1000 and jobs == ["_run"]
        assert compiled in sqlite_driver._slow
        # the loop kept turning while the read ran on the thread (it takes far longer
        # than the budget here: the 1,000,000 pairs)
        assert took > 5 * sqlite_driver.INLINE_BUDGET
        assert len([t for t in ticks if t >= started]) >= 3
        assert (await conn.execute(text(long_read), {"least": 1998})).scalar_one() == 1
        assert jobs == ["_run", "_run"] and inline_tries == [compiled]
        # a short read is still answered here
        assert (await conn.execute(text("SELECT n FROM t WHERE name = 'r7'"))).scalar_one() == 7
        assert jobs == ["_run", "_run"]
    handle[0].cancel()


async def test_a_read_does_not_wait_for_a_writer(engine: Any, jobs: list[str]) -> None:
    """In a WAL a reader takes no lock the writer holds: a read on the event loop's thread
    answers at once, with the last committed data, while another connection's write
    transaction is open."""
    async with engine.connect() as writer, engine.connect() as reader:
        await writer.execute(text("INSERT INTO t (name, n) VALUES ('open', 1)"))
        jobs.clear()
        started = asyncio.get_running_loop().time()
        assert (await reader.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0
        assert asyncio.get_running_loop().time() - started < 0.5 and jobs == []
        await writer.commit()
        assert (await reader.execute(text("SELECT count(*) FROM t"))).scalar_one() == 1


async def test_only_a_wal_reads_inline(engine: Any) -> None:
    """A rollback journal would make a reader wait for a writer (the busy timeout, on the
    event loop): only a WAL connection reads on the caller's thread. A database in memory
    (one connection the pool shares) keeps every statement on its thread."""
    memory = make_engine("sqlite+aiosqlite://")
    try:
        async with memory.connect() as conn:
            raw = await conn.get_raw_connection()
            assert raw.dbapi_connection.reads_inline is False
    finally:
        await memory.dispose()
    async with engine.connect() as conn:
        adapted = (await conn.get_raw_connection()).dbapi_connection
        assert adapted.reads_inline is True
        try:
            assert adapted.read_inline("delete") is False and adapted.reads_inline is False
            assert adapted.read_inline("memory") is False
        finally:
            assert adapted.read_inline("WAL") is True


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
