"""Leases: singleton work (metering fold, billing tick, retention, outbox, the node reaper)
runs on one node of the cluster at a time, and moves to another when that node dies.

A lease is a row of ``leases`` (name, holder, expires_at) taken or renewed with one
``INSERT ... ON CONFLICT DO UPDATE ... WHERE holder = me OR expires_at < now()`` in the
database's own time (no clock of any node decides). The holder renews every third of the
TTL; it believes it holds the lease only until ``TTL - margin`` after the renewal *started*
(its monotonic clock), which is before the row expires, so two nodes never both believe they
hold it while the database and the nodes' clock rates agree. The work itself is written to
stay correct if a stalled holder overlaps its successor anyway (row locks, insert-once
rows, ``SKIP LOCKED``): the lease makes it run once, not the only line of defence.

In the single-node mode (``local=True``) every lease is held and the database is never
asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import case, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.cluster.models import Lease

log = logging.getLogger("corral.cluster")

MARGIN_S = 1.0  # a holder stops believing it holds a lease this long before the row expires


def db_now(db: AsyncSession) -> Any:
    """The database's current time as an SQL expression (PostgreSQL), or this node's wall
    clock as a value (SQLite: one node, one clock)."""
    if db.get_bind().dialect.name == "postgresql":
        from sqlalchemy import func

        return func.now()
    return dt.datetime.now(dt.UTC)


class Leases:
    """The leases this node wants, kept renewed by one loop."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession] | None, holder: str,
                 ttl_s: float, *, local: bool = False) -> None:
        if not local and sessionmaker is None:
            raise ValueError("leases need a database unless local")
        self.sessionmaker = sessionmaker
        self.holder = holder
        self.ttl_s = ttl_s
        self.local = local
        self._wanted: set[str] = set()
        self._until: dict[str, float] = {}  # name -> monotonic time we stop believing we hold it
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()  # set whenever a lease is gained or lost

    def want(self, name: str) -> None:
        """Compete for ``name`` (from the next renewal round on)."""
        self._wanted.add(name)

    def held(self, name: str) -> bool:
        """Whether this node holds ``name`` now."""
        if self.local:
            return True
        until = self._until.get(name)
        return until is not None and time.monotonic() < until

    async def acquire(self, name: str) -> bool:
        """Take or renew ``name``; whether this node holds it afterwards."""
        if self.local:
            return True
        assert self.sessionmaker is not None
        started = time.monotonic()
        async with self.sessionmaker() as db:
            now = db_now(db)
            expires = now + dt.timedelta(seconds=self.ttl_s)
            insert: Any = postgresql.insert if db.get_bind().dialect.name == "postgresql" \
                else sqlite.insert
            ins = insert(Lease).values(name=name, holder=self.holder, acquired_at=now,
                                       expires_at=expires)
            stmt = ins.on_conflict_do_update(
                index_elements=["name"],
                set_={"holder": ins.excluded.holder, "expires_at": ins.excluded.expires_at,
                      "acquired_at": case((Lease.holder == ins.excluded.holder,
                                           Lease.acquired_at), else_=ins.excluded.acquired_at)},
                where=or_(Lease.holder == self.holder, Lease.expires_at < now),
            ).returning(Lease.holder)
            got = (await db.execute(stmt)).scalar_one_or_none()
            await db.commit()
        was = self.held(name)
        if got == self.holder:
            self._until[name] = started + self.ttl_s - MARGIN_S
        else:
            self._until.pop(name, None)
        now_held = self.held(name)
        if now_held != was:
            log.info("lease %s %s by node %s", name, "taken" if now_held else "lost",
                     self.holder)
            self.changed.set()
        return now_held

    async def renew_all(self) -> None:
        for name in sorted(self._wanted):
            try:
                await self.acquire(name)
            except Exception:
                log.exception("lease %s: renewal failed", name)

    async def _run(self) -> None:
        while True:
            await self.renew_all()
            await asyncio.sleep(self.ttl_s / 3)

    def start(self) -> None:
        if not self.local and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="leases")

    async def stop(self) -> None:
        """Stop renewing and hand every held lease back (the next holder need not wait out
        the TTL)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        held = [n for n in self._until if self.held(n)]
        self._until.clear()
        if self.local or not held or self.sessionmaker is None:
            return
        try:
            async with self.sessionmaker() as db:
                await db.execute(update(Lease).where(Lease.name.in_(held),
                                                     Lease.holder == self.holder)
                                 .values(expires_at=db_now(db)))
                await db.commit()
        except Exception:
            log.warning("leases %s not handed back; they expire in %ss", held, self.ttl_s)


async def singleton(leases: Leases, name: str, work: Callable[[], Awaitable[Any]], *,
                    every_s: float, wake: asyncio.Event | None = None) -> None:
    """Run ``work`` every ``every_s`` seconds (or when ``wake`` is set) while this node holds
    the lease ``name``; the loop for a background task. ``work``'s failures are logged."""
    leases.want(name)
    if not leases.local:
        try:
            await leases.acquire(name)  # the renewal loop keeps it from now on
        except Exception:
            log.exception("lease %s: first attempt failed", name)
    while True:
        if leases.held(name):
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("singleton %s failed", name)
            delay = every_s
        else:  # not ours (yet): check again after the next renewal round
            delay = min(every_s, leases.ttl_s / 3) if not leases.local else every_s
        if wake is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()
            wake.clear()


__all__ = ["Leases", "db_now", "singleton"]
