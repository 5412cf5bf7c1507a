"""The device page's vitals panel: the last report (signal, memory, round trip, uptime,
battery, power source, disconnects) with its time, and the history over a chosen range,
bucketed as ``GET /v1/diagnostics/:id/summary`` buckets it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from corral.fleet import report, vitals
from corral.kit import clock

RANGES = {"day": dt.timedelta(days=1), "week": dt.timedelta(days=7),
          "month": dt.timedelta(days=30)}
BUCKETS = 24
MAX_REPORTS = 20_000  # read for a summary (a device reports at most every 10 s on average)

# (label, dotted path, how to show it)
LAST: list[tuple[str, str, str]] = [
    ("Signal strength", "device.network.signal.strength", "percent"),
    ("Signal (RSSI)", "device.network.signal.rssi", "dbm"),
    ("Radio", "device.network.signal.at", "text"),
    ("Round trip", "device.cloud.coap.round_trip", "ms"),
    ("Memory used", "device.system.memory.used", "bytes"),
    ("Memory total", "device.system.memory.total", "bytes"),
    ("Uptime", "device.system.uptime", "duration"),
    ("Battery", "device.power.battery.charge", "percent"),
    ("Battery state", "device.power.battery.state", "text"),
    ("Power source", "device.power.source", "text"),
    ("Cloud disconnects", "device.cloud.connection.disconnects", "count"),
    ("Cloud disconnects", "device.cloud.disconnects", "count"),
    ("Network disconnects", "device.network.connection.disconnects", "count"),
    ("CoAP retransmits", "device.cloud.coap.retransmit", "count"),
]


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86_400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {s} s"


def show(value: Any, how: str) -> str:
    """One vital as the page shows it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if how == "percent":
        return f"{value:g} %"
    if how == "dbm":
        return f"{value:g} dBm"
    if how == "ms":
        return f"{value:g} ms"
    if how == "bytes":
        return f"{int(value):,} bytes"
    if how == "duration":
        return _duration(value)
    return f"{value:g}"


def last_items(payload: dict[str, Any]) -> list[dict[str, str]]:
    """The vitals of one report that it has, labelled (the first path of a label wins)."""
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for label, path, how in LAST:
        value = report.pick(payload, path)
        if value is None or isinstance(value, dict | list) or label in seen:
            continue
        seen.add(label)
        out.append({"label": label, "value": show(value, how), "path": path})
    return out


async def panel(db: AsyncSession, device_id: str, chosen: str | None) -> dict[str, Any]:
    """What the vitals panel shows for ``chosen`` (day, week, month; default day)."""
    key = chosen if chosen in RANGES else "day"
    newest = await vitals.last(db, device_id)
    end = clock.now()
    start = end - RANGES[key]
    rows = await vitals.history(db, device_id, start, end, limit=MAX_REPORTS)
    summary = vitals.summary(device_id, rows, start, end, BUCKETS)
    return {
        "range": key, "ranges": list(RANGES), "reports": len(rows),
        "last": None if newest is None else {
            "at": clock.aware(newest.at), "iso": clock.iso(clock.aware(newest.at)),
            "items": last_items(newest.payload)},
        "samples": [_row(x) for x in reversed(summary["samples"])],  # newest first
    }


COLUMNS = (("signal", "percent"), ("rssi", "dbm"), ("round_trip", "ms"),
           ("memory_used", "bytes"), ("battery_charge", "percent"))


def _row(sample: dict[str, Any]) -> dict[str, Any]:
    """A summary bucket as the table shows it ("—" for a vital no report had)."""
    return {"time": sample["time"], "count": sample["count"],
            **{k: show(sample[k], how) if k in sample else "—" for k, how in COLUMNS}}
