"""Tell the delivery side that a device should get firmware now ("flash now" intents).

Recorded inside the transaction, sent only after it commits (a rolled-back lock or release
never triggers an update). Two ways out, both optional:

* on the bus, the device's control subject (``device.<id>.control``) carries
  ``{"op": "firmware", "device_id", "version", "firmware_id", "update_id", "trigger"}``; the
  node holding the device's session picks it up (sessions ignore ops they do not know);
* every callable in :data:`UPDATE_HOOKS` is called with the same :class:`UpdateIntent`
  (the delivery engine registers one; a coroutine function is scheduled as a task).

An intelligent release also says so once on :data:`RELEASED` (``{"product_id",
"firmware_id"}``), after its commit: a device whose connection was not yet stored as online
when the release read who is online got no intent, and its connect check may have run before
the release was committed. Each node's delivery engine checks such devices again
(:meth:`~corral.firmware.delivery.FirmwareDelivery.released`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from corral.db.session import after_commit
from corral.devices.signals import control_subject

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateIntent:
    device_id: str
    version: int
    firmware_id: int
    update_id: int | None
    trigger: str  # flash | intelligent


RELEASED = "firmware.released"
UPDATE_HOOKS: list[Callable[[UpdateIntent], Any]] = []
_tasks: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def _deliver(bus: Any, intents: list[UpdateIntent]) -> None:
    for intent in intents:
        if bus is not None:
            async def publish(i: UpdateIntent = intent) -> None:
                try:
                    await bus.publish(control_subject(i.device_id), {"op": "firmware", **asdict(i)})
                except Exception:
                    log.warning("could not send the firmware intent for %s", i.device_id)

            _spawn(publish())
        for hook in list(UPDATE_HOOKS):
            try:
                result = hook(intent)
                if inspect.isawaitable(result):
                    _spawn(result)
            except Exception:
                log.exception("firmware update hook failed")


def request_updates(db: AsyncSession, intents: list[UpdateIntent]) -> None:
    """Queue ``intents`` for after the commit (nothing is sent on a rollback)."""
    if not intents:
        return
    bus = db.info.get("bus")
    queued = list(intents)
    after_commit(db, lambda: _deliver(bus, queued))


def announce_release(db: AsyncSession, product_id: int, firmware_id: int) -> None:
    """After the commit, tell every node that ``firmware_id`` was released intelligently."""
    bus = db.info.get("bus")
    if bus is None:
        return

    async def publish() -> None:
        try:
            await bus.publish(RELEASED, {"product_id": product_id, "firmware_id": firmware_id})
        except Exception:
            log.warning("could not announce the release of firmware %s", firmware_id)

    after_commit(db, lambda: _spawn(publish()))
