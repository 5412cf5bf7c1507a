"""Tell a device's live session (on whichever node holds it) that the device changed.

Services call these inside their transaction; the message goes out on the bus only after
the transaction commits (:func:`corral.db.session.after_commit`), so a rolled-back change
never disturbs a session. The bus comes from the session factory's ``info["bus"]`` (set by
the server runtime); without one (CLI admin commands) nothing is sent and the session picks
the change up on its next connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from corral.db.session import after_commit

log = logging.getLogger(__name__)

CONTROL = "device.{}.control"
_tasks: set[asyncio.Task[None]] = set()


def control_subject(device_id: str) -> str:
    """The bus subject a device's session listens on for control messages."""
    return CONTROL.format(device_id.lower())


def _send(bus: Any, device_ids: list[str], body: dict[str, Any]) -> None:
    """One task that sends ``body`` to each device's control subject in turn."""
    async def go() -> None:
        failed: list[str] = []
        for device_id in device_ids:
            try:
                await bus.publish(control_subject(device_id), body)
            except Exception:
                failed.append(device_id)
        if failed:
            log.warning("could not notify the session of %d device(s), e.g. %s",
                        len(failed), failed[0])

    task = asyncio.get_running_loop().create_task(go())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def _queue(db: AsyncSession, device_id: str, body: dict[str, Any]) -> None:
    bus = db.info.get("bus")
    if bus is not None:
        after_commit(db, lambda: _send(bus, [device_id], body))


def tenancy_changed(db: AsyncSession, device_id: str) -> None:
    """Owner, customer or product changed: the session reloads its scope."""
    _queue(db, device_id, {"op": "refresh"})


def disconnect(db: AsyncSession, device_id: str, reason: str) -> None:
    """Credentials changed or the device was denied or removed: close its session."""
    _queue(db, device_id, {"op": "disconnect", "reason": reason})


def disconnect_many(db: AsyncSession, device_ids: list[str], reason: str) -> None:
    """:func:`disconnect` for many devices (a bulk change): one after-commit hook and one
    task sending each device's control message in turn, not one of each per device."""
    bus = db.info.get("bus")
    if bus is not None and device_ids:
        ids = list(device_ids)
        after_commit(db, lambda: _send(bus, ids, {"op": "disconnect", "reason": reason}))
