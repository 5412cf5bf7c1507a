"""Async engine and session factory for SQLite (WAL) and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, make_url, text
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from corral.db import pg_driver, sqlite_driver

# SQLite connections the pool keeps. Above the pool's size, SQLAlchemy opens an overflow
# connection for a request and closes it when the request ends; on SQLite that is a new
# aiosqlite thread, the sqlite3 connect and its pragmas each time: with 32 requests in flight
# and the default 5, about a fifth of /v1/user's CPU (0.95-1.01 -> 0.78-0.79 ms per request,
# bench/README B1). An idle connection is a thread blocked on its queue and the pages
# SQLite cached for it (at most 2 MiB, cache_size's default).
SQLITE_POOL_SIZE = 32

# PostgreSQL connections a pool keeps, and the ones it opens beyond them for a burst and
# closes when they are returned (CORRAL_DATABASE_POOL_SIZE / _MAX_OVERFLOW override them).
# With 10 kept and 32 requests in flight, a third of the requests opened a connection (a
# forked backend): /healthz 866 -> 2,050-2,284 req/s with 30 kept (bench/README B1).
PG_POOL_SIZE = 30
PG_MAX_OVERFLOW = 10


def make_engine(url: str, **kw: Any) -> AsyncEngine:
    if url.startswith("sqlite"):
        # aiosqlite under SQLAlchemy, each statement one trip to the database thread
        kw.setdefault("module", sqlite_driver.dbapi())
        if _file_database(url):  # an in-memory one has a single connection (StaticPool)
            kw.setdefault("pool_size", SQLITE_POOL_SIZE)
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kw)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kw.setdefault("pool_size", PG_POOL_SIZE)
    kw.setdefault("max_overflow", PG_MAX_OVERFLOW)
    # SQLAlchemy's pre-ping on asyncpg is three round trips per checkout (BEGIN, ";",
    # ROLLBACK), six of a function call's fifteen; a checkout tests the socket instead
    # (_closed_by_server), unless pool_pre_ping=True is asked for
    local_check = not kw.get("pool_pre_ping", False)
    # No JIT: corral's statements are short, and the planner's guesses for rows that were
    # just appended and not analyzed yet (the pending usage the metering tick folds) pushed
    # their cost past jit_above_cost: a 90,000-row fold spent 330 ms compiling, 200 running.
    connect_args = dict(kw.pop("connect_args", {}))
    # READ COMMITTED whatever the server's default: corral is written for it, and the driver
    # runs a session's reads before its first write outside a transaction (pg_driver)
    settings = {"jit": "off", "default_transaction_isolation": "read committed",
                **connect_args.get("server_settings", {})}
    connect_args["server_settings"] = settings
    if (make_url(url).drivername == "postgresql+asyncpg"
            and settings["default_transaction_isolation"] == "read committed"):
        kw.setdefault("module", pg_driver.dbapi())
    engine = create_async_engine(url, connect_args=connect_args, **kw)
    if local_check:
        event.listen(engine.sync_engine, "checkout", _closed_by_server)
    return engine


def _file_database(url: str) -> bool:
    database = make_url(url).database
    return bool(database) and database != ":memory:" and "mode=memory" not in url


def _closed_by_server(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """A pooled PostgreSQL connection the server has closed (a restart, an administrator's
    ``pg_terminate_backend``, an idle timeout) is replaced at checkout, as the pre-ping would
    replace it, without a round trip: the server's goodbye and the socket's end reach asyncpg
    while the connection idles in the pool, and it then reports itself closed. A connection
    that dies with no word (a cut network) fails its first statement instead, and SQLAlchemy
    then empties the pool of the connections made before it."""
    if dbapi_conn.driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


# rows ANALYZE samples per index on SQLite: bounded work on a million-row table, and close
# enough for the planner to choose between corral's indexes
SQLITE_ANALYSIS_LIMIT = 1000


async def refresh_statistics(engine: AsyncEngine) -> bool:
    """Refresh the query planner's statistics where the database does not do it itself.
    SQLite keeps none until ``ANALYZE`` runs, and without them it guesses every table's size:
    the plans corral's indexes were chosen for (tests/test_query_plans.py reads them with
    statistics) need them. PostgreSQL's autovacuum analyzes by itself: nothing to do there.
    Returns whether it ran."""
    if engine.dialect.name != "sqlite":
        return False
    async with engine.begin() as conn:
        await conn.execute(text(f"PRAGMA analysis_limit={SQLITE_ANALYSIS_LIMIT}"))
        await conn.execute(text("ANALYZE"))
    return True


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=True)


def sync_url(url: str) -> str:
    """The synchronous driver URL for Alembic."""
    return (
        url.replace("sqlite+aiosqlite", "sqlite")
        .replace("postgresql+asyncpg", "postgresql+psycopg2")
    )
