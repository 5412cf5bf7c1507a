"""Coalesced device reads for the connection path.

Every connection reads its device twice (the key check in the handshake, the admission and
facts on the Hello). One query per read costs a pooled connection, a hop to the driver's
thread and back, and an event-loop turn for each; in a reconnect storm those round trips,
not the queries, are what the handshakes wait for. :class:`DeviceRows` answers all reads
that arrive while one query is in flight with one ``WHERE id IN (...)`` query.

Nothing is cached: each answer comes from a query that started after the read was asked
for, so a read never sees a row older than a one-at-a-time read could have.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.devices.models import Device

log = logging.getLogger("corral.sessions")


class DeviceRows:
    """``await rows.get(device_id)``: the row of ``query`` (which selects ``Device.id``)
    for that device, or ``None``; concurrent gets share one query of up to ``max_batch``
    ids."""

    def __init__(self, engine: AsyncEngine, query: Any, *, max_batch: int = 500) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.engine = engine
        self.query = query  # a Select of Device columns, Device.id among them
        self.max_batch = max_batch
        self.queries = 0  # how many queries answered how many gets (tests, metrics)
        self.gets = 0
        self._waiting: dict[str, list[asyncio.Future[Row[Any] | None]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def get(self, device_id: str) -> Row[Any] | None:
        did = device_id.lower()
        fut: asyncio.Future[Row[Any] | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(did, []).append(fut)
        self.gets += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(),
                                                                name="device-rows")
        return await fut

    async def _drain(self) -> None:
        while self._waiting:
            ids = list(self._waiting)[: self.max_batch]
            waiters = {did: self._waiting.pop(did) for did in ids}
            try:
                async with self.engine.connect() as conn:
                    result = await conn.execute(self.query.where(Device.id.in_(ids)))
                    found = {row.id: row for row in result}
            except BaseException as exc:  # the waiters get the error; the drain goes on
                for futs in waiters.values():
                    for f in futs:
                        if not f.done():
                            f.set_exception(exc if isinstance(exc, Exception)
                                            else RuntimeError("device read cancelled"))
                if not isinstance(exc, Exception):
                    raise
                log.warning("device read of %d ids failed: %s", len(ids), exc)
                continue
            self.queries += 1
            for did, futs in waiters.items():
                for f in futs:
                    if not f.done():  # a waiter may have been cancelled (its timeout)
                        f.set_result(found.get(did))
