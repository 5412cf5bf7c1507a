"""Location points from ``loc`` events, and the queries behind the location routes.

A device of a product whose ``location.opt_in`` setting is on publishes ``loc`` (the Tracker
format ``{"cmd":"loc","time":T,"loc":{"lat":..,"lon":..,"alt":..,"h_acc":..,"hd":..,
"spd":..,"lck":1,"time":T}}``, or just ``{"lat":..,"lon":..}``). Once the event is committed,
its point is stored and counted: one data operation per point saved (the seed's "stored
data" rule), on top of the publish itself, in the same transaction as the point. A point
whose event is already stored is not stored or counted again (``event_id`` is unique).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.devices.models import Device
from corral.events.recorder import EventRecorder
from corral.events.writer import StoredEvent
from corral.kit import clock
from corral.locations.models import LocationPoint
from corral.metering import ledger
from corral.products.models import Product

log = logging.getLogger("corral.locations")

LOC_EVENT = "loc"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def parse_point(data: str | None, published_at: dt.datetime) -> dict[str, Any] | None:
    """The point in a ``loc`` event's data, or ``None`` when it holds no valid position."""
    if not data:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    loc = doc.get("loc", doc)
    if not isinstance(loc, dict):
        return None
    lat, lon = _number(loc.get("lat")), _number(loc.get("lon"))
    if lat is None or lon is None or not -90 <= lat <= 90 or not -180 <= lon <= 180:
        return None
    at = published_at
    fix = _number(loc.get("time", doc.get("time")))
    if fix is not None and 946_684_800 <= fix <= published_at.timestamp() + 86_400:
        at = dt.datetime.fromtimestamp(fix, dt.UTC)  # the fix's own time, when plausible
    lock = loc.get("lck")
    return {"lat": lat, "lon": lon, "alt": _number(loc.get("alt")),
            "accuracy_m": _number(loc.get("h_acc")), "heading": _number(loc.get("hd")),
            "speed": _number(loc.get("spd")), "gps_lock": lock is None or bool(lock), "at": at}


async def store(db: AsyncSession, events: Sequence[StoredEvent]) -> int:
    """Store and count the points of committed ``loc`` events (in the caller's transaction).
    Returns the number of points stored."""
    candidates = [(e, p) for e in events
                  if e.name == LOC_EVENT and e.product_id is not None and e.device_id
                  and (p := parse_point(e.data, e.published_at)) is not None]
    if not candidates:
        return 0
    product_ids = {e.product_id for e, _ in candidates}
    settings = dict((await db.execute(select(Product.id, Product.settings)
                                       .where(Product.id.in_(product_ids)))).all())
    now = clock.now()
    rows = [{"device_id": e.device_id, "product_id": e.product_id, "org_id": e.org_id,
             "event_id": e.id, "stored_at": now, **p}
            for e, p in candidates if _opted_in(settings.get(e.product_id))]
    if not rows:
        return 0
    dialect = (await db.connection()).dialect.name  # corral runs on SQLite or PostgreSQL
    ins: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    new = set((await db.execute(ins(LocationPoint).on_conflict_do_nothing(
        index_elements=[LocationPoint.event_id]).returning(LocationPoint.event_id), rows)
    ).scalars().all())
    by_event = {e.id: e for e, _ in candidates}
    await ledger.apply(db, [
        ledger.Usage(device_id=by_event[i].device_id or "", kind="location",
                     product_id=by_event[i].product_id, org_id=by_event[i].org_id,
                     owner_user_id=by_event[i].owner_user_id, at=by_event[i].published_at)
        for i in sorted(new)])
    return len(new)


def _opted_in(product_settings: dict[str, Any] | None) -> bool:
    loc = (product_settings or {}).get("location") or {}
    return isinstance(loc, dict) and bool(loc.get("opt_in"))


class LocationRecorder(EventRecorder):
    """The event writer's after-commit hook that stores the points of ``loc`` events."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        super().__init__(sessionmaker, LOC_EVENT, store, "location points")


# --- queries (Particle's location API shapes: GeoJSON coordinates are [lon, lat, alt]) ----

def _coords(p: LocationPoint) -> list[float]:
    return [p.lon, p.lat] + ([p.alt] if p.alt is not None else [])


def parse_date_range(raw: str | None) -> tuple[dt.datetime, dt.datetime] | None:
    """``date_range=<ISO start>,<ISO end>``; ``None`` when absent. Raises ValueError."""
    if not raw:
        return None
    parts = raw.split(",")
    if len(parts) != 2:
        raise ValueError("date_range is <ISO 8601 start>,<ISO 8601 end>")
    start, end = (dt.datetime.fromisoformat(x.strip().replace("Z", "+00:00")) for x in parts)
    start, end = (t if t.tzinfo else t.replace(tzinfo=dt.UTC) for t in (start, end))
    if end < start:
        raise ValueError("date_range ends before it starts")
    return start, end


async def latest_per_device(db: AsyncSession, product_id: int, *, page: int, per_page: int,
                            device_id: str | None = None,
                            window: tuple[dt.datetime, dt.datetime] | None = None
                            ) -> tuple[list[tuple[LocationPoint, Device | None]], int]:
    """Each device's newest point (optionally only points inside ``window``), newest first."""
    q = select(LocationPoint.device_id, func.max(LocationPoint.id).label("last")).where(
        LocationPoint.product_id == product_id)
    if device_id:
        q = q.where(LocationPoint.device_id == device_id.lower())
    if window:
        q = q.where(LocationPoint.at >= window[0], LocationPoint.at <= window[1])
    newest = q.group_by(LocationPoint.device_id).subquery()
    total = (await db.execute(select(func.count()).select_from(newest))).scalar_one()
    rows = (await db.execute(
        select(LocationPoint, Device).join(newest, newest.c.last == LocationPoint.id)
        .outerjoin(Device, Device.id == LocationPoint.device_id)
        .order_by(LocationPoint.at.desc(), LocationPoint.id.desc())
        .offset((page - 1) * per_page).limit(per_page))).all()
    return [(p, d) for p, d in rows], int(total)


async def history(db: AsyncSession, product_id: int, device_id: str,
                  window: tuple[dt.datetime, dt.datetime] | None, *, limit: int = 10_000
                  ) -> list[LocationPoint]:
    q = select(LocationPoint).where(LocationPoint.product_id == product_id,
                                    LocationPoint.device_id == device_id.lower())
    if window:
        q = q.where(LocationPoint.at >= window[0], LocationPoint.at <= window[1])
    return list((await db.execute(q.order_by(LocationPoint.at, LocationPoint.id)
                                  .limit(limit))).scalars())


def point_json(p: LocationPoint, device: Device | None) -> dict[str, Any]:
    return {
        "device_id": p.device_id, "product_id": p.product_id,
        "device_name": device.name if device else None,
        "online": bool(device.online) if device else False,
        "last_heard": clock.iso(clock.aware(device.last_heard)) if device else None,
        "gps_lock": p.gps_lock, "horizontal_accuracy": p.accuracy_m,
        "heading": p.heading, "speed": p.speed,
        "timestamps": [clock.iso(clock.aware(p.at))],
        "geometry": {"type": "Point", "coordinates": _coords(p)},
    }


def track_json(device_id: str, points: list[LocationPoint], device: Device | None
               ) -> dict[str, Any]:
    return {
        "device_id": device_id.lower(),
        "device_name": device.name if device else None,
        "product_id": points[0].product_id if points else (device.product_id if device else None),
        "online": bool(device.online) if device else False,
        "last_heard": clock.iso(clock.aware(device.last_heard)) if device else None,
        "gps_lock": points[-1].gps_lock if points else None,
        "timestamps": [clock.iso(clock.aware(p.at)) for p in points],
        "geometry": {"type": "LineString", "coordinates": [_coords(p) for p in points]},
    }
