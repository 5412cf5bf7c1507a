"""corral.db.lean.LeanRead: a hot SELECT sent on the request's connection without the
session's per-statement work reads exactly what ``db.execute`` reads (types converted both
ways, the session's own writes and pending objects included), tells the engine's listeners,
fails the ordinary way and hands every connection back. On SQLite, and on PostgreSQL in the
suite's PostgreSQL pass."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Boolean,
    Integer,
    String,
    bindparam,
    event,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from corral.db.base import UTCDateTime
from corral.db.engine import make_engine, make_sessionmaker
from corral.db.lean import LeanRead


class _Base(DeclarativeBase):
    pass


class Probe(_Base):
    __tablename__ = "lean_read_probe"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    on: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    doc: Mapped[Any] = mapped_column(JSON, nullable=True)
    at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


T = Probe.__table__
SINCE = bindparam("since", type_=UTCDateTime())
# a bound filter of each kind, a literal the statement carries, a NULL-able column of each type
READ = LeanRead(select(T.c.id, T.c.name, T.c.on, T.c.doc, T.c.at, literal(7).label("seven"))
                .where(T.c.id >= bindparam("low"), T.c.at >= SINCE).order_by(T.c.id))
BY_NAME = LeanRead(select(T.c.id).where(T.c.name == bindparam("name")))
AT = dt.datetime(2026, 12, 6, 21, 30, 5, 123000, tzinfo=dt.UTC)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[Any]:
    engine = make_engine(database_url, **({} if database_url.startswith("sqlite")
                                          else {"pool_size": 3}))
    async with engine.begin() as conn:
        await conn.run_sync(_Base.metadata.drop_all)
        await conn.run_sync(_Base.metadata.create_all)
        await conn.execute(insert(T), [
            {"id": 1, "name": "one", "on": True, "doc": {"a": [1, 2], "b": None},
             "at": AT - dt.timedelta(days=1)},
            {"id": 2, "name": "two", "on": False, "doc": ["x"], "at": AT},
            {"id": 3, "name": "three", "on": None, "doc": None,
             "at": AT + dt.timedelta(seconds=1)},
        ])
    yield engine
    async with engine.begin() as conn:
        await conn.run_sync(_Base.metadata.drop_all)
    await engine.dispose()


def _tuples(rows: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in rows]


async def test_rows_are_what_the_session_reads(engine: Any) -> None:
    sessions = make_sessionmaker(engine)
    params = {"low": 2, "since": AT}
    async with sessions() as db:
        lean = _tuples(await READ.rows(db, **params))
        ordinary = _tuples(list((await db.execute(READ.statement, params)).all()))
    assert lean == ordinary
    assert lean == [(2, "two", False, ["x"], AT, 7),
                    (3, "three", None, None, AT + dt.timedelta(seconds=1), 7)]
    assert lean[0][4].tzinfo is not None  # the column type's result processing ran
    async with sessions() as db:  # a naive bound datetime is UTC, as the type binds it
        naive = AT.replace(tzinfo=None) - dt.timedelta(days=1)
        assert [r[0] for r in await READ.rows(db, low=0, since=naive)] == [1, 2, 3]
    assert engine.sync_engine.pool.checkedout() == 0


async def test_a_write_and_a_pending_object_of_the_same_session_are_read(engine: Any) -> None:
    sessions = make_sessionmaker(engine)
    async with sessions() as db:
        await db.execute(insert(T).values(id=4, name="four", at=AT))
        assert _tuples(await BY_NAME.rows(db, name="four")) == [(4,)]  # the session's own write
        db.add(Probe(id=5, name="five", at=AT))  # not flushed yet: flushed as a query would
        assert _tuples(await BY_NAME.rows(db, name="five")) == [(5,)]
        await db.rollback()
        assert await BY_NAME.rows(db, name="four") == []
        assert await BY_NAME.rows(db, name="five") == []
    assert engine.sync_engine.pool.checkedout() == 0


async def test_a_committed_change_elsewhere_is_read(engine: Any) -> None:
    sessions = make_sessionmaker(engine)
    async with sessions() as db:
        assert await BY_NAME.rows(db, name="six") == []
        async with engine.begin() as other:
            await other.execute(insert(T).values(id=6, name="six"))
        assert _tuples(await BY_NAME.rows(db, name="six")) == [(6,)]


async def test_listeners_are_told_of_the_statement(engine: Any) -> None:
    seen: list[tuple[str, Any]] = []
    done: list[str] = []

    def before(_conn: Any, _cursor: Any, sql: str, params: Any, *_rest: Any) -> None:
        seen.append((sql, params))

    def after(_conn: Any, _cursor: Any, sql: str, *_rest: Any) -> None:
        done.append(sql)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    event.listen(engine.sync_engine, "after_cursor_execute", after)
    try:
        async with make_sessionmaker(engine)() as db:
            await BY_NAME.rows(db, name="two")
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)
        event.remove(engine.sync_engine, "after_cursor_execute", after)
    assert len(seen) == 1 and "lean_read_probe" in seen[0][0] and tuple(seen[0][1]) == ("two",)
    assert done == [seen[0][0]]


async def test_a_failed_read_fails_as_the_session_fails_and_returns_its_connection(
        engine: Any) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_Base.metadata.drop_all)
    async with make_sessionmaker(engine)() as db:
        with pytest.raises(DBAPIError):  # SQLAlchemy's error, which the API's handlers know
            await BY_NAME.rows(db, name="one")
    assert engine.sync_engine.pool.checkedout() == 0


async def test_a_read_alone_begins_no_transaction_on_postgresql(engine: Any) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's transactions (the suite's PostgreSQL pass)")
    async with make_sessionmaker(engine)() as db:
        await db.execute(text("SELECT 1"))  # the session holds a connection, no transaction
        raw = (await (await db.connection()).get_raw_connection()).driver_connection
        assert _tuples(await BY_NAME.rows(db, name="one")) == [(1,)]
        assert not raw.is_in_transaction()
        await db.execute(insert(T).values(id=7, name="seven"))
        assert raw.is_in_transaction()
        assert _tuples(await BY_NAME.rows(db, name="seven")) == [(7,)]


async def test_a_cancelled_read_hands_no_busy_connection_to_the_next(
        engine: Any, database_url: str) -> None:
    """A read cancelled while the database still works on it (a client gone) stops it or
    closes its pooled connection, instead of handing the next request a connection still
    busy with it: with one pooled connection, the next read is answered at once."""
    if engine.dialect.name == "sqlite":  # a statement that runs for seconds
        slow = select(literal_column(
            "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
            "WHERE x < 200000000) SELECT count(*) FROM c)"))
    else:
        slow = select(func.pg_sleep(30))
    read = LeanRead(slow)
    one = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        sessions = make_sessionmaker(one)
        async with sessions() as db:
            task = asyncio.create_task(read.rows(db))
            await asyncio.sleep(0.3)
            task.cancel()
            started = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - started < 10  # stopped, not waited for
        assert one.sync_engine.pool.checkedout() == 0
        async with sessions() as db:
            rows = await asyncio.wait_for(BY_NAME.rows(db, name="one"), 10)
            assert _tuples(rows) == [(1,)]
    finally:
        await one.dispose()


def test_a_statement_the_lean_path_cannot_send_is_refused_when_built() -> None:
    with pytest.raises(ValueError):
        LeanRead(select(T.c.id).where(T.c.id.in_(bindparam("ids", expanding=True))))
    with pytest.raises(TypeError):
        LeanRead(text("SELECT 1"))  # type: ignore[arg-type]
