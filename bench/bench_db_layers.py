"""B1c: one trivial statement (``SELECT 1``) through each layer of corral's database stack.

    .venv/bin/python bench/bench_db_layers.py [--n 3000] [--rounds 3] [--database-url URL]

Where a request's one statement spends its CPU (issue 16: the team and the empty device list
each send one statement, and cost ~0.5 ms more than a route that sends none). Each row runs
``--n`` times after 300 warm-up runs, ``--rounds`` times, alternated; process CPU per run
(all threads: aiosqlite's included). On SQLite (the default, a file in a temporary
directory, corral's engine and pragmas):

* ``driver job``: aiosqlite alone, the statement and its rows in one job on the driver's
  thread (what corral's adapter, ``corral.db.sqlite_driver``, sends per statement);
* ``sync core``: SQLAlchemy's synchronous engine on plain sqlite3 (check out a connection,
  execute, fetch, return it): SQLAlchemy's own work without the async layer or a thread;
* ``async core``: corral's ``AsyncEngine`` (``async with engine.connect()``, execute);
* ``async session``: corral's session as a route's (``sessionmaker()``, ``execute``,
  ``close``);
* ``async session, one greenlet``: the same two calls inside one ``greenlet_spawn`` (the
  greenlet hand-offs' share);
* ``async session, LeanRead``: the session's connection, the statement sent on it by
  ``corral.db.lean.LeanRead`` (compiled once), ``close``.

On PostgreSQL (``--database-url postgresql+asyncpg://...``) the ``driver job`` row is
asyncpg's ``fetch`` on one connection and there is no ``sync core`` row (no synchronous
driver is installed). CPU is the figure to compare; the layers' differences are what a
change to one of them could save.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import _server  # noqa: F401  (this checkout's code first)
import aiosqlite
import asyncpg
from sqlalchemy import create_engine, literal_column, select, text
from sqlalchemy.pool import QueuePool
from sqlalchemy.util.concurrency import greenlet_spawn

from corral.db.engine import make_engine, make_sessionmaker
from corral.db.lean import LeanRead

Run = Callable[[], Awaitable[None]]


async def measure(rows: list[tuple[str, Run]], n: int, rounds: int) -> None:
    for _, run in rows:
        for _ in range(300):
            await run()
    spent: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(rounds):
        for name, run in rows:
            t = time.process_time()
            for _ in range(n):
                await run()
            spent[name].append((time.process_time() - t) / n * 1000)
    print(f"{'layer':34s} {'CPU ms per statement (each round)':>40s}")
    for name, values in spent.items():
        print(f"{name:34s} {'  '.join(f'{v:.3f}' for v in values):>40s}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--database-url")
    args = ap.parse_args()
    stmt = text("SELECT 1")
    rows: list[tuple[str, Run]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layers.db"
        url = args.database_url or f"sqlite+aiosqlite:///{path}"
        engine = make_engine(url)
        sessionmaker = make_sessionmaker(engine)
        closers: list[Callable[[], Awaitable[None]]] = [engine.dispose]
        if url.startswith("sqlite"):
            sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").close()
            raw = await aiosqlite.connect(path)
            closers.append(raw.close)

            async def driver_job() -> None:
                await raw.execute_fetchall("SELECT 1")

            sync_engine = create_engine(f"sqlite:///{path}", poolclass=QueuePool)

            async def sync_core() -> None:
                with sync_engine.connect() as conn:
                    conn.execute(stmt).all()

            rows += [("driver job (aiosqlite)", driver_job), ("sync core (sqlite3)", sync_core)]
        else:
            dsn = url.replace("postgresql+asyncpg", "postgresql", 1)
            pg = await asyncpg.connect(dsn)
            closers.append(pg.close)

            async def asyncpg_fetch() -> None:
                await pg.fetch("SELECT 1")

            rows.append(("driver job (asyncpg fetch)", asyncpg_fetch))

        async def async_core() -> None:
            async with engine.connect() as conn:
                (await conn.execute(stmt)).all()

        async def async_session() -> None:
            db = sessionmaker()
            (await db.execute(stmt)).all()
            await db.close()

        async def one_greenlet() -> None:
            db = sessionmaker()

            def work() -> None:
                db.sync_session.execute(stmt).all()
                db.sync_session.close()

            await greenlet_spawn(work)

        lean = LeanRead(select(literal_column("1")))

        async def lean_read() -> None:
            db = sessionmaker()
            await lean.rows(db)
            await db.close()

        rows += [("async core", async_core), ("async session", async_session),
                 ("async session, one greenlet", one_greenlet),
                 ("async session, LeanRead", lean_read)]
        try:
            print(f"{url.split(':', 1)[0]}, --n {args.n}, Python {sys.version.split()[0]}")
            await measure(rows, args.n, args.rounds)
        finally:
            for close in reversed(closers):
                await close()


if __name__ == "__main__":
    asyncio.run(main())
