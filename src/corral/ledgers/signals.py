"""Tell the sync engines that a ledger instance changed, after the write commits.

A write (:func:`corral.ledgers.service._write`) calls :func:`changed` inside its
transaction; once it commits, ``{"ledger_id", "level", "key"}`` goes out on the bus subject
:data:`SUBJECT`, which every node's :class:`corral.ledgers.sync.LedgerSync` follows (the
node holding an affected device's session sends it the new document). A rolled-back write
sends nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from corral.db.session import after_commit

log = logging.getLogger(__name__)

SUBJECT = "ledgers.changed"
_tasks: set[asyncio.Task[Any]] = set()


def changed(db: AsyncSession, ledger_id: int, level: str, key: str) -> None:
    bus = db.info.get("bus")
    if bus is None:
        return
    body = {"ledger_id": ledger_id, "level": level, "key": key}

    async def publish() -> None:
        try:
            await bus.publish(SUBJECT, body)
        except Exception:
            log.warning("could not announce the change of ledger %s", ledger_id)

    def send() -> None:
        task = asyncio.get_running_loop().create_task(publish())
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    after_commit(db, send)
