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


def _send(bus: Any, device_id: str, body: dict[str, Any]) -> None:
    async def go() -> None:
        try:
            await bus.publish(control_subject(device_id), body)
        except Exception:
            log.warning("could not notify the session of device %s", device_id)

    task = asyncio.get_running_loop().create_task(go())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def _queue(db: AsyncSession, device_id: str, body: dict[str, Any]) -> None:
    bus = db.info.get("bus")
    if bus is not None:
        after_commit(db, lambda: _send(bus, device_id, body))


def tenancy_changed(db: AsyncSession, device_id: str) -> None:
    """Owner, customer or product changed: the session reloads its scope."""
    _queue(db, device_id, {"op": "refresh"})


def disconnect(db: AsyncSession, device_id: str, reason: str) -> None:
    """Credentials changed or the device was denied or removed: close its session."""
    _queue(db, device_id, {"op": "disconnect", "reason": reason})
