"""Device vitals (Particle's "diagnostics"): stored from ``spark/device/diagnostics/update``
events, and the queries behind ``/v1/diagnostics``.

A device's vitals arrive as the system event ``spark/device/diagnostics/update`` whose data
is a JSON object (``{"device": {"network": ..., "cloud": ..., "power": ..., "system": ...},
"service": {...}}``): a Particle device publishes it (or answers a metrics describe with it),
an MQTT device sends it on ``devices/{id}/diagnostics`` (docs/mqtt.md). The event is stored
like any event (never a data operation: its name starts with ``spark``); once it is
committed, :class:`VitalsRecorder` (an after-commit hook of the event writer) keeps its
payload in ``device_vitals`` for ``CORRAL_VITALS_RETENTION_DAYS`` and adds it to the fleet's
vitals rollups (:mod:`corral.fleet.vitals_rollups`) in the same transaction.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import statistics
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.events.recorder import EventRecorder
from corral.events.writer import StoredEvent
from corral.fleet import vitals_rollups
from corral.fleet.models import DeviceVitals
from corral.fleet.report import number
from corral.kit import clock
from corral.kit.text import strict_loads

log = logging.getLogger("corral.fleet")

EVENT = "spark/device/diagnostics/update"
MAX_BYTES = 4096  # a vitals payload (Particle's is well under 1 KB)
MAX_RANGE = dt.timedelta(days=30)  # Particle: a history request spans at most 30 days
DATE_ERROR = "start_date and end_date must be ISO8601 formatted"
SUMMARY_LIMIT = 30

# the diagnostics Particle reports, with what the metadata route says about each
# (path, title, type, units, describes)
CATALOGUE: list[tuple[str, str, str, str | None, str]] = [
    ("device.network.signal.rssi", "Signal strength (RSSI)", "number", "dBm", "network"),
    ("device.network.signal.strength", "Signal strength", "number", "%", "network"),
    ("device.network.signal.quality", "Signal quality", "number", "%", "network"),
    ("device.network.signal.at", "Radio access technology", "string", None, "network"),
    ("device.network.connection.status", "Network status", "string", None, "network"),
    ("device.network.connection.attempts", "Network connection attempts", "number", None,
     "network"),
    ("device.network.connection.disconnects", "Network disconnects", "number", None, "network"),
    ("device.cloud.connection.status", "Cloud status", "string", None, "cloud"),
    ("device.cloud.connection.attempts", "Cloud connection attempts", "number", None, "cloud"),
    ("device.cloud.connection.disconnects", "Cloud disconnects", "number", None, "cloud"),
    ("device.cloud.disconnects", "Cloud disconnects", "number", None, "cloud"),
    ("device.cloud.coap.transmit", "CoAP messages sent", "number", None, "cloud"),
    ("device.cloud.coap.retransmit", "CoAP retransmits", "number", None, "cloud"),
    ("device.cloud.coap.unack", "CoAP unacknowledged messages", "number", None, "cloud"),
    ("device.cloud.coap.round_trip", "Round trip time", "number", "ms", "cloud"),
    ("device.cloud.publish.rate_limited", "Rate-limited publishes", "number", None, "cloud"),
    ("device.power.battery.charge", "Battery charge", "number", "%", "power"),
    ("device.power.battery.state", "Battery state", "string", None, "power"),
    ("device.power.source", "Power source", "string", None, "power"),
    ("device.system.uptime", "Uptime", "number", "s", "system"),
    ("device.system.memory.used", "Memory used", "number", "bytes", "system"),
    ("device.system.memory.total", "Memory total", "number", "bytes", "system"),
    ("service.device.status", "Device status (cloud's view)", "string", None, "service"),
    ("service.cloud.uptime", "Cloud session uptime", "number", "s", "service"),
    ("service.cloud.publish.sent", "Events received by the cloud", "number", None, "service"),
    ("service.coap.round_trip", "Round trip time (cloud's view)", "number", "ms", "service"),
]
PRIORITY = {"network": 1, "cloud": 2, "power": 3, "system": 4, "service": 5}
RANGES = {"device.network.signal.rssi": [-120, 0], "device.network.signal.strength": [0, 100],
          "device.network.signal.quality": [0, 100], "device.power.battery.charge": [0, 100]}


class BadVitals(ValueError):
    """A vitals payload that is not a JSON object of at most :data:`MAX_BYTES`."""


def parse(data: str | bytes | None) -> dict[str, Any]:
    """The vitals object in ``data``; raises :class:`BadVitals`."""
    if data is None:
        raise BadVitals("vitals must be a JSON object")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_BYTES:
        raise BadVitals(f"vitals are at most {MAX_BYTES} bytes")
    try:
        doc = strict_loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadVitals("vitals must be a JSON object") from None
    if not isinstance(doc, dict):
        raise BadVitals("vitals must be a JSON object")
    return doc


# --- storing ------------------------------------------------------------------------------

async def store(db: AsyncSession, events: Sequence[StoredEvent]) -> int:
    """Store the vitals of committed diagnostics events (in the caller's transaction);
    an event already stored is skipped. Returns the number stored."""
    rows: list[dict[str, Any]] = []
    firmware: dict[int, int | None] = {}  # event id -> the publishing session's version
    for e in events:
        if e.name != EVENT or not e.device_id:
            continue
        try:
            payload = parse(e.data)
        except BadVitals:
            continue
        rows.append({"device_id": e.device_id, "product_id": e.product_id, "org_id": e.org_id,
                     "event_id": e.id, "at": e.published_at, "payload": payload})
        firmware[e.id] = e.firmware_version
    if not rows:
        return 0
    dialect = (await db.connection()).dialect.name
    ins: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    result = await db.execute(ins(DeviceVitals).on_conflict_do_nothing(
        index_elements=[DeviceVitals.event_id]).returning(DeviceVitals.event_id), rows)
    inserted = set(result.scalars().all())
    # the fleet's vitals rollups: the reports inserted now (a replayed event is not counted
    # twice), in this transaction
    await vitals_rollups.add_reports(db, [
        (r["device_id"], r["product_id"], r["at"], firmware[r["event_id"]], r["payload"])
        for r in rows if r["event_id"] in inserted and r["product_id"] is not None])
    return len(inserted)


class VitalsRecorder(EventRecorder):
    """The event writer's after-commit hook that stores the vitals of diagnostics events."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        super().__init__(sessionmaker, EVENT, store, "vitals")


async def delete_older_than(db: AsyncSession, cutoff: dt.datetime) -> int:
    """Retention: drop vitals older than ``cutoff`` (the caller commits)."""
    result = await db.execute(delete(DeviceVitals).where(DeviceVitals.at < cutoff))
    return int(getattr(result, "rowcount", 0) or 0)


# --- reading ------------------------------------------------------------------------------

def parse_range(start: str | None, end: str | None, *, default: dt.timedelta = MAX_RANGE
                ) -> tuple[dt.datetime, dt.datetime]:
    """``start_date``/``end_date`` (ISO 8601; default: the last ``default`` up to now).
    Raises ValueError (the caller answers Particle's bad_request)."""
    def one(text: str) -> dt.datetime:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)

    now = clock.now()
    end_at = one(end) if end else now
    start_at = one(start) if start else end_at - default
    if end_at < start_at:
        raise ValueError("end_date is before start_date")
    if end_at - start_at > MAX_RANGE:
        raise ValueError("the range is longer than 30 days")
    return start_at, end_at


async def last(db: AsyncSession, device_id: str) -> DeviceVitals | None:
    return (await db.execute(select(DeviceVitals).where(DeviceVitals.device_id == device_id)
                             .order_by(DeviceVitals.at.desc(), DeviceVitals.id.desc())
                             .limit(1))).scalar_one_or_none()


async def history(db: AsyncSession, device_id: str, start: dt.datetime, end: dt.datetime,
                  *, limit: int = 50_000) -> list[DeviceVitals]:
    return list((await db.execute(
        select(DeviceVitals).where(DeviceVitals.device_id == device_id,
                                   DeviceVitals.at >= start, DeviceVitals.at <= end)
        .order_by(DeviceVitals.at, DeviceVitals.id).limit(limit))).scalars())


def as_json(v: DeviceVitals) -> dict[str, Any]:
    return {"updated_at": clock.iso(clock.aware(v.at)), "deviceID": v.device_id,
            "payload": v.payload}


def _flatten(prefix: str, node: Any, out: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(node, list):
        out[prefix] = json.dumps(node, separators=(",", ":"))
    else:
        out[prefix] = node


def as_csv(rows: Sequence[DeviceVitals]) -> str:
    """One line per report: ``updated_at``, ``deviceID``, then every diagnostic by its
    dotted path (the union over the reports, sorted)."""
    flat = []
    for v in rows:
        f: dict[str, Any] = {}
        _flatten("", v.payload, f)
        flat.append(f)
    columns = sorted({k for f in flat for k in f})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["updated_at", "deviceID", *columns])
    for v, f in zip(rows, flat, strict=True):
        w.writerow([clock.iso(clock.aware(v.at)), v.device_id,
                    *["" if f.get(c) is None else f[c] for c in columns]])
    return buf.getvalue()


def metadata() -> dict[str, Any]:
    """What each diagnostic means (Particle's ``diagnostics_metadata``)."""
    out: dict[str, Any] = {}
    for path, title, kind, units, describes in CATALOGUE:
        entry: dict[str, Any] = {"title": title, "type": kind, "describes": describes,
                                 "priority": PRIORITY[describes]}
        if units:
            entry["units"] = units
        if path in RANGES:
            entry["ranges"] = {"min": RANGES[path][0], "max": RANGES[path][1]}
        if path.endswith("battery.state"):
            entry["values"] = ["unknown", "not_charging", "charging", "charged",
                               "discharging", "fault", "disconnected"]
        if path.endswith("power.source"):
            entry["values"] = ["unknown", "vin", "usb_host", "usb_adapter", "usb_otg",
                               "battery"]
        if path.endswith("connection.status"):
            entry["values"] = ["disconnected", "connecting", "connected", "disconnecting"]
        entry["messages"] = {}
        out[path] = entry
    return out


SUMMARY_FIELDS = {
    "signal": "device.network.signal.strength",
    "rssi": "device.network.signal.rssi",
    "round_trip": "device.cloud.coap.round_trip",
    "memory_used": "device.system.memory.used",
    "battery_charge": "device.power.battery.charge",
    "disconnects": "device.cloud.disconnects",
}


def summary(device_id: str, rows: Sequence[DeviceVitals], start: dt.datetime,
            end: dt.datetime, limit: int) -> dict[str, Any]:
    """``limit`` equal buckets over the range; per bucket the median of each vital."""
    span = max((end - start).total_seconds(), 1.0)
    size = max(1, int(-(-span // limit)))
    buckets: dict[int, list[DeviceVitals]] = {}
    for v in rows:
        at = clock.aware(v.at)
        assert at is not None
        buckets.setdefault(int((at - start).total_seconds() // size), []).append(v)
    samples = []
    for i in sorted(buckets):
        group = buckets[i]
        sample: dict[str, Any] = {
            "time": clock.iso(start + dt.timedelta(seconds=i * size)), "count": len(group)}
        for key, path in SUMMARY_FIELDS.items():
            values = [x for v in group if (x := number(v.payload, path)) is not None]
            if values:
                sample[key] = statistics.median(values)
        samples.append(sample)
    newest = rows[-1].payload if rows else {}
    total = number(newest, "device.system.memory.total")
    used = number(newest, "device.system.memory.used")
    return {
        "deviceID": device_id,
        "memoryAvailable": None if total is None or used is None else total - used,
        "bucketSize": size, "startDate": clock.iso(start), "endDate": clock.iso(end),
        "hasBattery": any(number(v.payload, "device.power.battery.charge") is not None
                          for v in rows),
        "samples": samples,
    }
