"""Vitals rollups: the fleet's vitals aggregates (median and worst signal, round trip and
memory used) over every stored report, not a sample.

Written where vitals reports are stored (:func:`corral.fleet.vitals.store`, in the same
transaction, for the reports actually inserted, so each report is counted once), per
product (segment ``""``) and per segment the device is in (``g:<group id>``,
``os:<Device OS version>``, as the other segment rollups), per hour and per UTC day, per
firmware version (the publishing session's; 0 when not known) and again under
``ALL_VERSIONS`` (what a request without ``product_fw`` reads). Each vital's values go to a
fixed histogram: per bin, how many values and the lowest and highest of them. A request
reads the hourly rows for a range of up to two days and the daily rows beyond (bench B16:
a 30-day request at 100,000 devices reading per-firmware hourly rows read 4.9 million of
them, 6.7 s of CPU; there are no per-minute vitals rollups, where a report made ~3 rows).

* **worst** (lowest ``rssi``, highest ``round_trip`` and ``memory_used``) is exact: the
  lowest/highest value of the bins;
* **median** is answered from the bins: the bin holding the middle value (for an even
  count, the two middle values, averaged) stands for the midpoint of its lowest and highest
  value. Resolution: ``rssi`` bins are 1 dBm wide, so the median is within 0.5 dBm (exact
  for the whole-dBm values devices report); ``round_trip`` and ``memory_used`` bins are 2 %
  wide (of the value + 1), so the median is within 1 % of (the value + 1).

Non-finite values (JSON's ``NaN``/``Infinity``) are not counted. ``reports`` counts every
report (bin 0), with or without these vitals.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from corral.fleet.models import ALL_VERSIONS, FleetVitalsDay, FleetVitalsHour
from corral.fleet.report import number
from corral.fleet.rollups import day_of, hour_of, lookup_segments

VITAL_PATHS = {"rssi": "device.network.signal.rssi",
               "round_trip": "device.cloud.coap.round_trip",
               "memory_used": "device.system.memory.used"}
REPORTS = "reports"  # the pseudo-vital counting every report
WHOLE = ""  # the segment of the whole product
RATIO_LOG = math.log(1.02)  # round_trip and memory_used: bins 2 % wide
BIN_LIMIT = 1_000_000  # bins beyond are clamped (absurd values; worst stays exact)
HOURLY_UP_TO = dt.timedelta(days=2)  # longer ranges read the daily rows
Bins = dict[tuple[int, str, str, dt.datetime, int, int], list[float]]  # -> [n, low, high]


def bin_of(vital: str, value: float) -> int:
    """The histogram bin of ``value`` (finite) for ``vital``."""
    if vital == "rssi":
        b = math.floor(value)
    else:
        b = math.floor(math.log1p(max(value, 0.0)) / RATIO_LOG)
    return max(-BIN_LIMIT, min(BIN_LIMIT, b))


def values_of(payload: dict[str, Any]) -> list[tuple[str, float]]:
    """The report's finite vitals, by name."""
    out = []
    for vital, path in VITAL_PATHS.items():
        v = number(payload, path)
        if v is not None and math.isfinite(v):
            out.append((vital, v))
    return out


def _add(bins: Bins, key: tuple[int, str, str, dt.datetime, int, int], v: float) -> None:
    row = bins.get(key)
    if row is None:
        bins[key] = [1, v, v]
    else:
        row[0] += 1
        row[1] = min(row[1], v)
        row[2] = max(row[2], v)


async def add_reports(db: AsyncSession, reports: Sequence[tuple[str, int, dt.datetime,
                                                                int | None,
                                                                dict[str, Any]]]) -> None:
    """Add ``reports`` (device, product, time, firmware version, payload; stored in the
    caller's transaction) to the vitals rollups."""
    if not reports:
        return
    segments = await lookup_segments(db, {d for d, *_rest in reports})
    hours: Bins = {}
    for device, product, at, fw, payload in reports:
        hour = hour_of(at)
        values = values_of(payload)
        for seg in (WHOLE, *segments.get(device, ())):
            for version in (fw or 0, ALL_VERSIONS):
                _add(hours, (product, seg, REPORTS, hour, version, 0), 0.0)
                for vital, v in values:
                    _add(hours, (product, seg, vital, hour, version, bin_of(vital, v)), v)
    days: Bins = {}
    for (product, seg, vital, hour, fw, b), (n, low, high) in hours.items():
        key = (product, seg, vital, day_of(hour), fw, b)
        row = days.get(key)
        if row is None:
            days[key] = [n, low, high]
        else:
            row[0] += n
            row[1] = min(row[1], low)
            row[2] = max(row[2], high)
    dialect = (await db.connection()).dialect.name
    ins: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    least = func.least if dialect == "postgresql" else func.min
    greatest = func.greatest if dialect == "postgresql" else func.max
    for table, rows in ((FleetVitalsHour, hours), (FleetVitalsDay, days)):
        stmt = ins(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=["product_id", "segment", "firmware_version", "vital", "bucket",
                            "bin"],
            set_={"count": table.count + stmt.excluded.count,
                  "low": least(table.low, stmt.excluded.low),
                  "high": greatest(table.high, stmt.excluded.high)})
        await db.execute(stmt, [
            {"product_id": p, "segment": sg, "vital": v, "bucket": bk, "firmware_version": fw,
             "bin": b, "count": int(n), "low": low, "high": high}
            for (p, sg, v, bk, fw, b), (n, low, high) in sorted(rows.items())])


def median_of(bins: Iterable[tuple[int, int, float, float]]) -> float | None:
    """The median from histogram bins (bin, count, lowest, highest), within the bins'
    resolution (see the module doc)."""
    ordered = sorted(bins)
    total = sum(n for _b, n, _lo, _hi in ordered)
    if not total:
        return None
    ranks = (total // 2,) if total % 2 else (total // 2 - 1, total // 2)
    found: list[float] = []
    seen = 0
    for _b, n, low, high in ordered:
        while len(found) < len(ranks) and ranks[len(found)] < seen + n:
            found.append((low + high) / 2)
        seen += n
    return sum(found) / len(found)


async def aggregates(db: AsyncSession, product_id: int, start: dt.datetime,
                     end: dt.datetime, *, segment: str | None, firmware: int | None
                     ) -> dict[str, Any]:
    """``{"reports": n, "sampled": False, "<vital>": {"median", "worst", "count"} | None}``
    of the reports in the hours from ``start`` (floored to its hour) to ``end``, or for a
    range longer than ``HOURLY_UP_TO`` the UTC days (from ``start``'s day): one grouped
    range read of the rollups."""
    daily = end - start > HOURLY_UP_TO
    t: Any = FleetVitalsDay if daily else FleetVitalsHour
    first = day_of(start) if daily else hour_of(start)
    where = [t.product_id == product_id, t.segment == (segment or WHOLE),
             t.firmware_version == (ALL_VERSIONS if firmware is None else firmware),
             t.vital.in_([REPORTS, *VITAL_PATHS]), t.bucket >= first, t.bucket < end]
    rows = (await db.execute(
        select(t.vital, t.bin, func.sum(t.count), func.min(t.low), func.max(t.high))
        .where(*where).group_by(t.vital, t.bin))).all()
    by_vital: dict[str, list[tuple[int, int, float, float]]] = {}
    for vital, b, n, low, high in rows:
        by_vital.setdefault(vital, []).append((int(b), int(n), float(low), float(high)))
    # every report of the range ("sampled": a dynamic group's newest reports, metrics.py)
    out: dict[str, Any] = {"reports": sum(n for _b, n, _lo, _hi in by_vital.get(REPORTS, [])),
                           "sampled": False}
    for vital in VITAL_PATHS:
        bins = by_vital.get(vital)
        if not bins:
            out[vital] = None
            continue
        worst = min(lo for _b, _n, lo, _hi in bins) if vital == "rssi" \
            else max(hi for _b, _n, _lo, hi in bins)
        out[vital] = {"median": median_of(bins), "worst": worst,
                      "count": sum(n for _b, n, _lo, _hi in bins)}
    return out
