"""SIM activation state: Particle's ``PUT /v1/sims/:iccid`` actions, stored as intervals.

A SIM is the ICCID of a device (``devices.iccid``). ``deactivate`` opens an interval in
``sim_deactivations``; ``reactivate`` (or ``activate``) closes it. Billing reads the
intervals: a device whose SIM was deactivated for an entire month is not billable that
month (:func:`corral.metering.usage.billable_condition`).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.devices.models import Device
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, NotFound
from corral.metering.models import SimDeactivation
from corral.metering.usage import sim_deactivated

ICCID_RE = re.compile(r"^[0-9]{18,22}[Ff]?$")
ACTIONS = ("activate", "deactivate", "reactivate")


def parse_iccid(value: str) -> str:
    iccid = value.strip().upper()
    if not ICCID_RE.match(iccid):
        raise BadRequest("An ICCID is 18 to 22 digits", code="invalid_iccid")
    return iccid


async def sim_device(db: AsyncSession, iccid: str, scope: ColumnElement[bool]) -> Device:
    """The device in ``scope`` whose SIM is ``iccid``, or 404."""
    device = (await db.execute(select(Device).where(Device.iccid == iccid, scope)
                               .order_by(Device.id).limit(1))).scalar_one_or_none()
    if device is None:
        raise NotFound("SIM not found", code="not_found")
    return device


async def sim_json(db: AsyncSession, iccid: str, device: Device) -> dict[str, Any]:
    off = await sim_deactivated(db, iccid)
    return {"_id": iccid, "iccid": iccid,
            "status": "inactive_user_deactivated" if off else "active",
            "last_device_id": device.id, "last_device_name": device.name,
            "deactivated_at": clock.iso(off.deactivated_at) if off else None}


async def apply_action(db: AsyncSession, iccid: str, device: Device, action: Any
                       ) -> dict[str, Any]:
    """Run ``action`` on the SIM (no commit); its state afterwards."""
    if action not in ACTIONS:
        raise BadRequest("action must be one of activate, deactivate, reactivate",
                         code="invalid_action")
    off = await sim_deactivated(db, iccid)
    now = clock.now()
    if action == "deactivate":
        if off is not None:
            raise Conflict("The SIM is already deactivated", code="sim_deactivated")
        db.add(SimDeactivation(iccid=iccid, deactivated_at=now))
    else:
        if off is None:
            raise Conflict("The SIM is already active", code="sim_active")
        off.reactivated_at = now
    await db.flush()
    return await sim_json(db, iccid, device)


__all__ = ["apply_action", "parse_iccid", "sim_device", "sim_json"]
