"""A hot read sent on the request's own connection without SQLAlchemy's per-statement work.

Through a session, one short SELECT costs ~0.3 ms of CPU where the driver alone spends
~0.09 ms (bench/README B1c): the compiled-cache lookup, the ORM's execution context, the
result objects and the greenlet hand-offs around each call. For the few statements the
busiest routes send on every request (the team, the device list's count), :class:`LeanRead`
compiles the statement once per dialect and sends it on the connection the session holds:
the same connection and transaction the session's own statements use, so what it reads is
what ``db.execute`` would have read, before or after a write of the same request. A session
that holds no connection yet has no transaction either, and there the read takes a pooled
connection for itself and returns it at once: what it sees is what the session's first
statement would have seen (on PostgreSQL a plain read outside a transaction, on SQLite the
last commit), and the request holds no connection afterwards. Pending objects in the session
send the read through the session instead, which flushes them first. The engine's
``before_cursor_execute``/``after_cursor_execute`` listeners are told of the statement, as
of any other.

Bind values go through the column types' bind processors and rows through their result
processors, as SQLAlchemy's own execution would (a DateTime stored as text on SQLite comes
back a ``datetime``, JSON comes back decoded). Rows are plain tuples (SQLite) or asyncpg
records: index them, unpack them.

On PostgreSQL the statement takes the adapter's prepared-statement cache and its lock, and
runs outside a transaction only where :mod:`corral.db.pg_driver` would run it so (a plain
read at READ COMMITTED before the session's first write); otherwise the session's
transaction is begun first, as the adapter begins it. On SQLite it is one job on the
connection's thread, as :mod:`corral.db.sqlite_driver` sends any statement.

Any error from the driver sends the statement again through the session, whose error
handling (exception wrapping, a dead connection invalidated, the pool emptied) then applies:
a read that failed on the lean path is either answered the ordinary way or fails the
ordinary way.

Only SELECTs without expanding (``IN``) parameters; a statement the lean path cannot send is
refused when it is built, not at its first request.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.util.concurrency import greenlet_spawn

from corral.db import pg_driver

Processor = Callable[[Any], Any] | None


class _Plan:
    """The statement compiled for one dialect: its SQL, its parameters in order (with the
    values of the ones the statement carries) and the processors of both directions."""

    __slots__ = ("binds", "defaults", "names", "processing", "results", "sql")

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = _compiled(statement, dialect)
        self.sql: str = compiled.string
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        self.defaults = {name: bp.effective_value for name, bp in compiled.binds.items()
                         if not bp.required}
        bind_processors = compiled._bind_processors  # name -> processor, only where needed
        self.binds: tuple[Processor, ...] = tuple(bind_processors.get(name)
                                                  for name in self.names)
        self.results: tuple[Processor, ...] = tuple(
            entry.type._cached_result_processor(dialect, None)
            for entry in compiled._result_columns)
        self.processing = any(p is not None for p in self.results)

    def arguments(self, params: dict[str, Any]) -> tuple[Any, ...]:
        defaults = self.defaults
        return tuple(
            value if process is None or value is None else process(value)
            for value, process in (
                (params[name] if name in params else defaults[name], process)
                for name, process in zip(self.names, self.binds, strict=True)))

    def rows(self, raw: Sequence[Any]) -> list[Any]:
        if not self.processing:
            return list(raw)
        procs = self.results
        return [tuple(value if p is None or value is None else p(value)
                      for p, value in zip(procs, row, strict=True)) for row in raw]


def _compiled(statement: Select[Any], dialect: Dialect) -> Any:
    compiled = statement.compile(dialect=dialect)
    if (any(bp.expanding for bp in compiled.binds.values()) or compiled.literal_execute_params
            or compiled.post_compile_params):
        raise ValueError("LeanRead sends no expanding (IN) or rendered-at-execution parameters")
    return compiled


def _fetch(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> list[Any]:
    """On the SQLite connection's thread: the rows of one statement."""
    cur = conn.execute(sql, args)
    try:
        return cur.fetchall()
    finally:
        cur.close()


class LeanRead:
    """One SELECT, built once at import; ``await read.rows(db, **params)`` its rows."""

    __slots__ = ("_plans", "statement")

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self._plans: dict[str, _Plan] = {}
        if not isinstance(statement, Select):
            raise TypeError("LeanRead sends SELECTs only")
        for dialect in (sqlite.dialect(), postgresql.dialect()):  # refused now, not at a request
            _compiled(statement, dialect)

    def _plan(self, dialect: Dialect) -> _Plan:
        key = f"{dialect.name}+{dialect.driver}"
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan(self.statement, dialect)
        return plan

    async def rows(self, db: AsyncSession, **params: Any) -> list[Any]:
        """The statement's rows for ``params`` (its named bind parameters), read on the
        session's connection when it holds one (the request's transaction: a write it made
        is seen), else on a connection taken from the pool for this read alone."""
        sync = db.sync_session
        if sync._new or sync._deleted or sync.identity_map._modified:
            # changes a query through the session would flush first (autoflush): read them
            return list((await db.execute(self.statement, params)).all())
        transaction = sync._transaction
        pooled: Any = None
        conn: Any = None
        if transaction is not None and transaction._connections:
            conn = (await db.connection()).sync_connection
            engine = conn.engine
            adapted: Any = conn.connection.dbapi_connection
        else:
            engine = db.get_bind()
            pooled = await greenlet_spawn(engine.raw_connection)
            adapted = pooled.dbapi_connection
        dialect = engine.dialect
        plan = self._plan(dialect)
        try:
            sql, args = plan.sql, plan.arguments(params)
            if engine._has_events:  # what the session's statements tell listeners
                for before in engine.dispatch.before_cursor_execute:
                    sql, args = before(conn, None, sql, args, None, False)
            if dialect.name == "sqlite":
                driver = adapted._connection  # aiosqlite.Connection
                raw = await driver._execute(_fetch, driver._conn, sql, args)
            else:
                raw = await _pg_fetch(adapted, dialect, sql, args)
            if engine._has_events:
                for after in engine.dispatch.after_cursor_execute:
                    after(conn, None, sql, args, None, False)
        except Exception:
            # sent again the ordinary way, which answers or fails the ordinary way: errors
            # wrapped as SQLAlchemy's, a dead connection invalidated and the pool emptied
            if pooled is not None:
                await greenlet_spawn(pooled.invalidate)
                pooled = None
            return list((await db.execute(self.statement, params)).all())
        except BaseException:
            # cancelled mid-read (a client gone, a timeout): on SQLite the statement would
            # run on, and the next request's queue behind it (tests/test_lean_read.py), so
            # it is interrupted; the connection is closed rather than handed on either way
            # (asyncpg cancels its statement itself: there it costs a reconnect, on a
            # cancel only). The session's own connection is the session's to end.
            if pooled is not None:
                gone, pooled = pooled, None
                if dialect.name == "sqlite":  # stop the statement (thread-safe in sqlite3)
                    adapted._connection._conn.interrupt()
                await asyncio.shield(greenlet_spawn(gone.invalidate))
            raise
        finally:
            if pooled is not None:
                await greenlet_spawn(pooled.close)
        return plan.rows(raw)


async def _pg_fetch(adapted: Any, dialect: Any, sql: str, args: Sequence[Any]) -> Sequence[Any]:
    async with adapted._execute_mutex:
        if adapted._transaction is None and not pg_driver.may_run_outside(adapted, sql):
            await adapted._start_transaction()
        prepared, _ = await adapted._prepare(sql, dialect._invalidate_schema_cache_asof)
        return await prepared.fetch(*args)
