"""Small device lookups other domains need without the device service (no circle:
``firmware.releases`` uses these while ``devices.service`` uses the firmware lock)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.devices.models import Device

CHUNK = 5_000  # bound parameters per IN (...) list


async def device_names(db: AsyncSession, ids: Sequence[str]) -> dict[str, str]:
    """Device id -> name, for those of ``ids`` that have a name."""
    out: dict[str, str] = {}
    ids = list(ids)
    for i in range(0, len(ids), CHUNK):
        out.update({did: str(name) for did, name in (await db.execute(
            select(Device.id, Device.name).where(Device.id.in_(ids[i:i + CHUNK]),
                                                 Device.name.is_not(None)))).all()})
    return out
