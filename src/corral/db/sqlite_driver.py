"""SQLAlchemy's aiosqlite adapter, each statement in one trip to the database thread.

aiosqlite runs a sqlite3 connection on a thread of its own; every call on it is a job handed
to that thread (a queue put, the thread's wake-up, a future resolved back on the event loop,
and two GIL hand-offs). SQLAlchemy's adapter makes four of them per statement (open a cursor,
execute, fetch the rows, close the cursor) and one per COMMIT or ROLLBACK, even when there
is no transaction to end. Here a statement is one job (the same sqlite3 calls, run back to
back on the connection's thread, the rows and the cursor's facts carried back), and a COMMIT
or ROLLBACK outside a transaction, which sqlite3 would skip, is not sent.

Everything else is aiosqlite's and SQLAlchemy's own: the same sqlite3 connection on the same
thread (so the transactions, the pragmas set at connect, the busy timeout and the one writer
at a time are unchanged), the same dialect, server-side cursors (``stream()``) unchanged, and
``driver_connection`` is still the ``aiosqlite.Connection``.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util.concurrency import greenlet_spawn

try:
    from sqlalchemy.util.concurrency import await_
except ImportError:  # SQLAlchemy 2.0 names it await_only
    from sqlalchemy.util.concurrency import await_only as await_

_Facts = tuple[Any, list[Any], int, int | None]


def _run(conn: sqlite3.Connection, operation: str, parameters: Any, many: bool) -> _Facts:
    """On the database thread: the statement, its rows and the cursor's facts."""
    cur = conn.cursor()
    try:
        if many:
            cur.executemany(operation, parameters)
        elif parameters is None:
            cur.execute(operation)
        else:
            cur.execute(operation, parameters)
        description = cur.description
        rows = cur.fetchall() if description else []
        return description, rows, cur.rowcount, cur.lastrowid
    finally:
        cur.close()


def _run_and_commit(conn: sqlite3.Connection, operation: str, parameters: Sequence[Any]) -> None:
    """On the database thread: ``operation`` once per parameter set, then COMMIT."""
    conn.executemany(operation, parameters).close()
    conn.commit()


async def execute_and_commit(conn: AsyncConnection, operation: str,
                             parameters: Sequence[Any]) -> None:
    """Run ``operation`` once per parameter set in ``conn``'s transaction and COMMIT it, in
    ONE job on the connection's thread (through SQLAlchemy: the statement, then the COMMIT,
    two). The session's own commit afterwards finds no transaction open and sends nothing;
    if the statement or the COMMIT fails, the transaction stays open for the caller's
    rollback, as after a failed statement."""
    driver: Any = (await conn.get_raw_connection()).driver_connection  # aiosqlite.Connection
    await driver._execute(_run_and_commit, driver._conn, operation, parameters)


async def commit_alone(engine: AsyncEngine, operation: str, parameters: Sequence[Any]) -> None:
    """Run ``operation`` once per parameter set in a transaction of its own on one of
    ``engine``'s pooled connections and COMMIT it, as one job, without a SQLAlchemy session
    or connection around it (what those cost per transaction is several times the job's:
    bench B18). Committed when this returns; on a failure nothing is, and the pool's reset
    rolls the connection's transaction back as it takes the connection back."""
    pooled = await engine.raw_connection()
    try:
        driver: Any = pooled.driver_connection  # aiosqlite.Connection
        await driver._execute(_run_and_commit, driver._conn, operation, parameters)
    finally:
        await greenlet_spawn(pooled.close)  # a reset's ROLLBACK, if any, awaits the thread


class OneTripCursor:
    """A client-side cursor whose ``execute`` is one job on the connection's thread; the
    rows are held here, as SQLAlchemy's adapter holds them after its ``fetchall``."""

    server_side = False
    __slots__ = ("_adapt", "_rows", "arraysize", "description", "lastrowid", "rowcount")

    def __init__(self, adapt: OneTripConnection) -> None:
        self._adapt = adapt
        self._rows: deque[Any] = deque()
        self.arraysize = 1
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    def _go(self, operation: str, parameters: Any, many: bool) -> None:
        driver: Any = self._adapt._connection  # aiosqlite.Connection
        try:
            facts = await_(driver._execute(_run, driver._conn, operation, parameters, many))
        except Exception as error:
            self._adapt._handle_exception(error)
        self.description, rows, self.rowcount, self.lastrowid = facts
        self._rows = deque(rows)

    def execute(self, operation: str, parameters: Any = None) -> None:
        self._go(operation, parameters, False)

    def executemany(self, operation: str, seq_of_parameters: Sequence[Any]) -> None:
        self._go(operation, seq_of_parameters, True)

    def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[Any]:
        rows = self._rows
        return [rows.popleft() for _ in range(min(size or self.arraysize, len(rows)))]

    def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    def __iter__(self) -> Iterator[Any]:
        while self._rows:
            yield self._rows.popleft()

    def setinputsizes(self, *sizes: Any) -> None:
        return None

    def close(self) -> None:
        self._rows.clear()

    async def _async_soft_close(self) -> None:
        """SQLAlchemy's asyncio results call this before handing a result out; the sqlite3
        cursor is closed already and the rows are here."""
        return None

    def __enter__(self) -> OneTripCursor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class OneTripConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()

    def cursor(self, server_side: bool = False) -> Any:
        if server_side:
            return self._ss_cursor_cls(self)
        return OneTripCursor(self)

    def _in_transaction(self) -> bool:
        # sqlite3_get_autocommit: a flag read, safe from this thread while no job runs (the
        # pool ends a transaction only once its statements have answered)
        raw = self._connection._connection
        return raw is not None and raw.in_transaction

    def commit(self) -> None:
        if self._in_transaction():
            super().commit()

    def rollback(self) -> None:
        if self._in_transaction():
            super().rollback()


class OneTripDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """The DB-API module SQLAlchemy's aiosqlite dialect is given (``module=``)."""

    def connect(self, *arg: Any, **kw: Any) -> OneTripConnection:
        adapted = super().connect(*arg, **kw)
        return OneTripConnection(self, adapted._connection)


def dbapi() -> OneTripDBAPI:
    return OneTripDBAPI(aiosqlite, sqlite3)
