"""asyncpg under SQLAlchemy, with the transaction begun at the first statement that needs one.

SQLAlchemy's asyncpg adapter sends ``BEGIN`` before a connection's first statement and
``ROLLBACK`` (or ``COMMIT``) when the session ends: a request that only reads one row makes
three round trips to the server, two of them for a transaction that changes nothing
(bench/README B1). corral's sessions run at READ COMMITTED (the engine asks for it at
connect), where every statement takes its own snapshot whether or not it is inside a
transaction, so a plain read before the first write sees exactly what it would see inside
one. Here such a read runs outside a transaction; the first statement that is anything else
(a write, a locking read, a savepoint, a function with a side effect, a server-side cursor,
``executemany``) begins the transaction as before, and everything after it runs inside, so
read-your-writes, locks and commit/rollback are unchanged. A session that read only has no
transaction to end: its ``COMMIT``/``ROLLBACK`` and the pool's reset send nothing.

Not lazy (begun as SQLAlchemy does): a connection at any other isolation level
(``execution_options(isolation_level=...)``, e.g. the metering fold's REPEATABLE READ) or
read-only/deferrable mode.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.dialects.postgresql.asyncpg import (
    AsyncAdapt_asyncpg_connection,
    AsyncAdapt_asyncpg_cursor,
    AsyncAdapt_asyncpg_dbapi,
)
from sqlalchemy.ext.asyncio import AsyncConnection

try:
    from sqlalchemy.util.concurrency import await_
except ImportError:  # SQLAlchemy 2.0 names it await_only
    from sqlalchemy.util.concurrency import await_only as await_

# A statement that may run outside a transaction: a SELECT that takes no row lock and calls
# none of the functions whose effect belongs to a transaction (advisory transaction locks,
# set_config(..., true), sequences, large objects, NOTIFY) or that reads the transaction
# itself. Anything not matched begins the transaction: the safe side.
_SELECT = re.compile(r"\s*SELECT\b", re.IGNORECASE)
_NEEDS_TRANSACTION = re.compile(
    r"\bFOR\s+(?:UPDATE|SHARE|NO\s+KEY\s+UPDATE|KEY\s+SHARE)\b"
    r"|\b(?:pg_\w+|nextval|setval|currval|lastval|set_config|lo_\w+|txid_\w+|dblink\w*)\s*\(",
    re.IGNORECASE)
_LAZY_LEVELS = (None, "read_committed")
_verdicts: dict[str, bool] = {}
_VERDICTS_MAX = 4096


def plain_read(operation: str) -> bool:
    """Whether ``operation`` (SQL text) may run outside a transaction at READ COMMITTED."""
    verdict = _verdicts.get(operation)
    if verdict is None:
        verdict = bool(_SELECT.match(operation)) and not _NEEDS_TRANSACTION.search(operation)
        if len(_verdicts) >= _VERDICTS_MAX:
            _verdicts.clear()
        _verdicts[operation] = verdict
    return verdict


def may_run_outside(conn: Any, operation: str) -> bool:
    """Whether ``operation`` may run on ``conn`` (an adapted asyncpg connection with no
    transaction begun) without beginning one."""
    return (isinstance(conn, LazyBeginConnection) and conn.isolation_level in _LAZY_LEVELS
            and not conn.readonly and not conn.deferrable and plain_read(operation))


class LazyBeginCursor(AsyncAdapt_asyncpg_cursor):
    __slots__ = ()

    async def _prepare_and_execute(self, operation: Any, parameters: Any) -> None:
        conn = self._adapt_connection
        if conn._transaction is None and may_run_outside(conn, operation):
            # the adapter begins no transaction in autocommit; the connection is used by one
            # session, one statement at a time, so the level is back before anything else runs
            level = conn.isolation_level
            conn.isolation_level = "autocommit"
            try:
                await super()._prepare_and_execute(operation, parameters)
            finally:
                conn.isolation_level = level
            return
        await super()._prepare_and_execute(operation, parameters)


class LazyBeginConnection(AsyncAdapt_asyncpg_connection):
    __slots__ = ()
    _cursor_cls = LazyBeginCursor


class LazyBeginDBAPI(AsyncAdapt_asyncpg_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> Any:
        creator_fn = kw.pop("async_creator_fn", self.asyncpg.connect)
        cache_size = kw.pop("prepared_statement_cache_size", 100)
        name_func = kw.pop("prepared_statement_name_func", None)
        return await_(LazyBeginConnection.create(
            self, creator_fn(*arg, **kw), prepared_statement_cache_size=cache_size,
            prepared_statement_name_func=name_func))


async def begin(conn: AsyncConnection) -> None:
    """Begin ``conn``'s transaction now if no statement has begun it: before work on the bare
    asyncpg connection (``COPY``) that must commit or roll back with the session's (on the
    bare connection outside a transaction it would commit on its own)."""
    adapted: Any = (await conn.get_raw_connection()).dbapi_connection
    if getattr(adapted, "_transaction", False) is None:
        await adapted._start_transaction()
        if adapted._transaction is None:
            raise RuntimeError("the connection is in autocommit: no transaction to begin")


def dbapi() -> LazyBeginDBAPI:
    return LazyBeginDBAPI(asyncpg)
