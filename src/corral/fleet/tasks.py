"""Fleet housekeeping: retention of vitals and rollups (run by the hourly retention
singleton, so once across a cluster)."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.fleet import vitals
from corral.fleet.models import (
    HOUR_TABLES,
    MINUTE_TABLES,
    FleetDayTop,
    FleetDeviceDay,
    FleetDisconnect,
    FleetSegmentDisconnect,
    FleetTroubledDay,
)
from corral.kit import clock
from corral.settings import Settings

log = logging.getLogger("corral.fleet")


async def fleet_retention(sessionmaker: async_sessionmaker[AsyncSession],
                          settings: Settings) -> dict[str, int]:
    """Delete vitals older than ``vitals_retention_days``, per-minute rollups (of products
    and of segments) older than ``fleet_minute_retention_days`` and hourly ones (and
    per-device days) older than ``fleet_hour_retention_days``. Returns what was deleted,
    by table (the per-device days' lists and their days with them)."""
    now = clock.now()
    days = dt.timedelta(days=1)
    out: dict[str, int] = {}
    async with sessionmaker() as db:
        out["device_vitals"] = await vitals.delete_older_than(
            db, now - settings.vitals_retention_days * days)
        kept = [(t, settings.fleet_minute_retention_days) for t in MINUTE_TABLES] \
            + [(t, settings.fleet_hour_retention_days) for t in HOUR_TABLES]
        for table, keep in kept:
            result = await db.execute(delete(table).where(table.bucket < now - keep * days))
            out[table.__tablename__] = int(getattr(result, "rowcount", 0) or 0)
        for days_table in (FleetDeviceDay, FleetTroubledDay, FleetDayTop):
            result = await db.execute(delete(days_table).where(
                days_table.day < now - settings.fleet_hour_retention_days * days))
            out[days_table.__tablename__] = int(getattr(result, "rowcount", 0) or 0)
        for table in (FleetDisconnect, FleetSegmentDisconnect):
            result = await db.execute(delete(table).where(
                table.bucket < now - settings.fleet_hour_retention_days * days))
            out[table.__tablename__] = int(getattr(result, "rowcount", 0) or 0)
        await db.commit()
    if any(out.values()):
        log.info("fleet retention: deleted %s", out)
    return out
