"""Storing what committed events carry (location points, vitals) off the writer's loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.events.writer import StoredEvent

log = logging.getLogger("corral.events")

Store = Callable[[AsyncSession, Sequence[StoredEvent]], Awaitable[int]]


class EventRecorder:
    """An after-commit hook of the event writer: the committed events named ``name`` go to
    ``store`` (in a transaction of their own, in a task, so the writer never waits; a batch
    without such an event costs one scan of names). ``stored`` counts what ``store``
    reported."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], name: str,
                 store: Store, what: str) -> None:
        self.sessionmaker = sessionmaker
        self.name = name
        self.store = store
        self.what = what
        self.stored = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, events: Sequence[StoredEvent]) -> None:
        found = [e for e in events if e.name == self.name]
        if found:
            task = asyncio.get_running_loop().create_task(self._store(found))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _store(self, events: list[StoredEvent]) -> None:
        try:
            async with self.sessionmaker() as db:
                n = await self.store(db, events)
                await db.commit()
            self.stored += n
        except Exception:
            log.exception("%s of %d %s events not stored", self.what, len(events), self.name)

    async def drain(self) -> None:
        """Wait for what is being stored (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
