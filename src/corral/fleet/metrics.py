"""Fleet metrics read from the rollups (never from events): Particle's
``/v1/products/:product/metrics/*`` series and corral's fleet-health summary."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import statistics
from typing import Any

from sqlalchemy import Select, case, desc, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from corral.devices.models import Device, DeviceGroupMember
from corral.fleet import tops, vitals_rollups
from corral.fleet.models import (
    DeviceVitals,
    FleetDeviceCount,
    FleetDisconnect,
    FleetMinute,
    FleetSegmentDeviceCount,
    FleetSegmentDisconnect,
    rollup_table,
)
from corral.fleet.report import number
from corral.fleet.rollups import COUNTERS, group_segment, os_segment
from corral.kit import clock

DEFAULT_BUCKET_S = 900
MIN_BUCKET_S = 60  # the finest rollup is per minute
MAX_BUCKETS = 5000
DEFAULT_RANGE = dt.timedelta(days=1)

OUTCOMES = ("success", "failure", "timeout", "offline")  # a call's outcomes in the rollups

SERIES: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    # metric -> (answer key, {answer field: the rollup counters it sums})
    "online": ("online", {"count": ("online",)}),
    "events": ("events", {"received": ("events",)}),
    # Particle's shape: a timeout is a failure there (corral's fleet health separates them)
    "functions": ("functions", {"success": ("fn_success",),
                                "failure": ("fn_failure", "fn_timeout"),
                                "offline": ("fn_offline",)}),
    "variables": ("variables", {"success": ("var_success",),
                                "failure": ("var_failure", "var_timeout"),
                                "offline": ("var_offline",)}),
    "data_operations": ("data_operations", {"count": ("data_ops",)}),
}


@dataclasses.dataclass(frozen=True)
class Window:
    """A range and bucket size, and the filters: one product firmware version, and one
    device group (``group_id``) or one Device OS version (``os_version``), not both."""

    start: dt.datetime
    end: dt.datetime
    bucket_s: int
    firmware: int | None = None
    group_id: int | None = None
    os_version: str | None = None
    # a dynamic group (``group_id``): the condition on Device its devices meet now. It has
    # no segment rollups (membership is not recorded over time): only what is counted from
    # the devices now is filtered
    members: Any = None

    @property
    def segment(self) -> str | None:
        """The segment rollups' key of the group or Device OS filter (None: neither, or a
        dynamic group)."""
        if self.members is not None:
            return None
        if self.group_id is not None:
            return group_segment(self.group_id)
        return None if self.os_version is None else os_segment(self.os_version)

    @property
    def filtered(self) -> bool:
        return self.firmware is not None or self.segment is not None \
            or self.members is not None


def _filters(table: Any, product_id: int, w: Window) -> list[Any]:
    where = [table.product_id == product_id]
    if w.segment is not None:
        where.append(table.segment == w.segment)
    if w.firmware is not None:
        where.append(table.firmware_version == w.firmware)
    return where


def devices_of(product_id: int, w: Window) -> Select[Any] | None:
    """The IDs of the product's devices the window's filters select, as a subquery (None:
    no filter). A group reads its members (indexed by group); a Device OS version
    ix_devices_product_os; a firmware version ix_devices_product_fw; a dynamic group its
    condition."""
    if w.members is not None:
        q = select(Device.id).where(Device.product_id == product_id, w.members)
        if w.firmware is not None:
            q = q.where(Device.firmware_version == w.firmware)
        return q
    if w.group_id is not None:
        q = select(DeviceGroupMember.device_id).where(DeviceGroupMember.group_id == w.group_id)
        if w.firmware is not None:
            q = q.join(Device, Device.id == DeviceGroupMember.device_id).where(
                Device.firmware_version == w.firmware)
        return q
    if w.os_version is None and w.firmware is None:
        return None
    q = select(Device.id).where(Device.product_id == product_id)
    if w.os_version is not None:
        q = q.where(Device.system_firmware_version == w.os_version)
    if w.firmware is not None:
        q = q.where(Device.firmware_version == w.firmware)
    return q


def parse_window(qp: Any, *, minute_days: int) -> Window:
    """``start_date``, ``end_date`` (ISO 8601; default the day up to the end of this
    minute), ``bucket_size`` (seconds, default 900, at least 60), ``product_fw``. Raises ValueError with the reason.
    Past the per-minute retention only hourly buckets exist: ``bucket_size`` is then
    rounded up to whole hours."""
    def when(text: str) -> dt.datetime:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)

    try:
        # by default through the end of the current minute: a bucket that starts exactly
        # now (a sample taken at hh:mm:00) is in the window, as "now" is
        end = when(qp["end_date"]) if qp.get("end_date") else \
            clock.now().replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        start = when(qp["start_date"]) if qp.get("start_date") else end - DEFAULT_RANGE
    except ValueError:
        raise ValueError("start_date and end_date must be ISO8601 formatted") from None
    if end <= start:
        raise ValueError("end_date must be after start_date")
    raw = qp.get("bucket_size")
    try:
        bucket = int(raw) if raw not in (None, "") else DEFAULT_BUCKET_S
    except ValueError:
        raise ValueError("bucket_size must be a whole number of seconds") from None
    if bucket < MIN_BUCKET_S:
        raise ValueError(f"bucket_size must be at least {MIN_BUCKET_S} seconds")
    bucket -= bucket % 60
    if start < clock.now() - dt.timedelta(days=minute_days):
        bucket = max(3600, -(-bucket // 3600) * 3600)
    if (end - start).total_seconds() / bucket > MAX_BUCKETS:
        raise ValueError(f"at most {MAX_BUCKETS} buckets: widen bucket_size")
    fw_raw = qp.get("product_fw")
    firmware = None
    if fw_raw not in (None, ""):
        try:
            firmware = int(fw_raw)
        except ValueError:
            raise ValueError("product_fw must be a firmware version number") from None
    return Window(start, end, bucket, firmware)


def _floor(at: dt.datetime, seconds: int) -> dt.datetime:
    epoch = int(at.timestamp())
    return dt.datetime.fromtimestamp(epoch - epoch % seconds, dt.UTC)


async def _rows(db: AsyncSession, product_id: int, w: Window, columns: list[str]
                ) -> list[Any]:
    """Per rollup bucket: the sums over firmware versions (or the one asked for)."""
    minute = bool(w.bucket_s % 3600 or w.bucket_s < 3600)
    if w.bucket_s % 3600 == 0 and w.start >= clock.now() - dt.timedelta(days=1):
        minute = True  # recent and whole hours: the minutes are finer and complete
    table = rollup_table(minute=minute, segment=w.segment is not None)
    q = select(table.bucket, *[func.sum(getattr(table, c)).label(c) for c in columns]).where(
        *_filters(table, product_id, w), table.bucket >= _floor(w.start, 60),
        table.bucket < w.end)
    return list((await db.execute(q.group_by(table.bucket))).all())


async def series(db: AsyncSession, product_id: int, metric: str, w: Window
                 ) -> dict[str, Any]:
    """Particle's ``{"<metric>": [{"time", ...}]}``: one entry per bucket from ``start`` to
    ``end``. Counters are summed over the bucket; ``online`` is the most seen at once."""
    key, fields = SERIES[metric]
    columns = sorted({c for cols in fields.values() for c in cols})
    first = _floor(w.start, w.bucket_s)
    n = int(-(-(w.end - first).total_seconds() // w.bucket_s))
    buckets = [[0] * len(columns) for _ in range(n)]
    for row in await _rows(db, product_id, w, columns):
        at = clock.aware(row[0])
        assert at is not None
        i = int((at - first).total_seconds() // w.bucket_s)
        if not 0 <= i < n:
            continue
        for j, c in enumerate(columns):
            v = int(getattr(row, c) or 0)
            buckets[i][j] = max(buckets[i][j], v) if c == "online" else buckets[i][j] + v
    out = []
    for i, values in enumerate(buckets):
        entry: dict[str, Any] = {"time": clock.iso(first + dt.timedelta(seconds=i * w.bucket_s))}
        by_col = dict(zip(columns, values, strict=True))
        for name, cols in fields.items():
            n = sum(by_col[c] for c in cols)
            if metric in ("functions", "variables") and not n:
                continue  # Particle leaves zero counts out of these
            entry[name] = n
        out.append(entry)
    return {key: out}


async def totals(db: AsyncSession, product_id: int, w: Window) -> dict[str, int]:
    """Every counter summed over the window, and ``online_max`` (the most devices online
    at once). Past a day, whole hours are read (from the hourly rollups: the edges count
    their whole hour), so a month is ~720 rows per firmware version, not ~43,000."""
    hourly = w.end - w.start > dt.timedelta(days=1)
    table = rollup_table(minute=not hourly, segment=w.segment is not None)
    start = _floor(w.start, 3600 if hourly else 60)
    where = [*_filters(table, product_id, w), table.bucket >= start, table.bucket < w.end]
    row = (await db.execute(select(*[func.coalesce(func.sum(getattr(table, c)), 0)
                                     for c in COUNTERS]).where(*where))).one()
    out = {c: int(v) for c, v in zip(COUNTERS, row, strict=True)}
    per_bucket = select(func.sum(table.online).label("n")).where(*where) \
        .group_by(table.bucket).subquery()
    out["online_max"] = int((await db.execute(
        select(func.coalesce(func.max(per_bucket.c.n), 0)))).scalar_one())
    return out


ONLINE = text("devices.online")  # as ix_devices_product_online's predicate (a partial index)


async def online_now(db: AsyncSession, product_id: int) -> tuple[int, int]:
    """(online, total) devices of the product now (index-only counts of the devices
    table: ix_devices_product_online, ix_devices_product_id_id)."""
    total = (await db.execute(select(func.count()).select_from(Device).where(
        Device.product_id == product_id))).scalar_one()
    online = (await db.execute(select(func.count()).select_from(Device).where(
        Device.product_id == product_id, ONLINE))).scalar_one()
    return int(online), int(total)


async def filtered_devices(db: AsyncSession, product_id: int, w: Window
                           ) -> tuple[int, int, list[dict[str, Any]]]:
    """(online, total, devices and online per firmware version) of the devices the window's
    filters select, counted now: one grouped pass over those devices (a group's members,
    or an index range of the product's devices)."""
    ids = devices_of(product_id, w)
    assert ids is not None
    rows = (await db.execute(
        select(Device.firmware_version, func.count(),
               func.coalesce(func.sum(case((Device.online, 1), else_=0)), 0))
        .where(Device.product_id == product_id, Device.id.in_(ids))
        .group_by(Device.firmware_version))).all()
    out = sorted(({"version": v, "devices": int(n), "online": int(o)} for v, n, o in rows),
                 key=lambda x: (-x["devices"], x["version"] or 0))
    return sum(x["online"] for x in out), sum(x["devices"] for x in out), out


# a product with at least this many devices at the last sample has its devices read from
# the sample (at most a minute old); smaller ones are counted at each request (exact)
EXACT_BELOW = 20_000


async def device_counts(db: AsyncSession, product_id: int, w: Window
                        ) -> tuple[int, int, list[dict[str, Any]], dt.datetime | None]:
    """(online, total, devices and online per firmware version, as of when) of the product's
    devices the window's filters select. A product of ``EXACT_BELOW`` devices or more (at the
    last sample) is read from the once-a-minute sample ("as of" its time): unfiltered or by
    firmware version from :class:`FleetDeviceCount`, by static group or Device OS version
    (and firmware version) from :class:`FleetSegmentDeviceCount`. Otherwise, or with a
    dynamic group, the devices are counted now ("as of" None)."""
    if w.members is None and w.firmware != 0:
        c = FleetDeviceCount
        sizes = (await db.execute(select(c.firmware_version, c.devices, c.online, c.sampled_at)
                                  .where(c.product_id == product_id))).all()
        if sizes and sum(r[1] for r in sizes) >= EXACT_BELOW:
            rows = sizes
            if w.segment is not None:
                s = FleetSegmentDeviceCount
                rows = (await db.execute(
                    select(s.firmware_version, s.devices, s.online, s.sampled_at)
                    .where(s.product_id == product_id, s.segment == w.segment))).all()
            out = sorted(({"version": fw or None, "devices": int(n), "online": int(o)}
                          for fw, n, o, _at in rows if w.firmware in (None, fw)),
                         key=lambda x: (-x["devices"], x["version"] or 0))
            return (sum(x["online"] for x in out), sum(x["devices"] for x in out), out,
                    clock.aware(max(r[3] for r in sizes)))
    if w.filtered:
        online, total, firmware = await filtered_devices(db, product_id, w)
    else:
        online, total = await online_now(db, product_id)
        firmware = await firmware_distribution(db, product_id)
    return online, total, firmware, None


async def firmware_distribution(db: AsyncSession, product_id: int) -> list[dict[str, Any]]:
    """Devices per firmware version (``null``: never reported), most first: an index-only
    count (ix_devices_product_fw). ``online`` per version is the latest per-minute sample of
    the rollups (at most a minute old; a version never reported is sampled as 0)."""
    rows = (await db.execute(
        select(Device.firmware_version, func.count())
        .where(Device.product_id == product_id).group_by(Device.firmware_version))).all()
    latest = select(func.max(FleetMinute.bucket)).where(
        FleetMinute.product_id == product_id).scalar_subquery()
    online = dict((await db.execute(
        select(FleetMinute.firmware_version, FleetMinute.online).where(
            FleetMinute.product_id == product_id, FleetMinute.bucket == latest))).all())
    out = [{"version": v, "devices": int(n), "online": int(online.get(v or 0, 0))}
           for v, n in rows]
    return sorted(out, key=lambda x: (-x["devices"], x["version"] or 0))


async def troubled_devices(db: AsyncSession, product_id: int, w: Window, *,
                           limit: int = 10) -> dict[str, Any]:
    """The devices with the most disconnects, and with the most failed calls, in the
    window's days, and whether the lists are ``approximate``: from the days' lists
    (:mod:`corral.fleet.tops`), of the devices the window's filters select."""
    return await tops.troubled(db, product_id, w.start, w.end, limit=limit,
                               devices=devices_of(product_id, w))


VITALS_SAMPLE = 1000  # a dynamic group's reports read (it has no vitals rollups)


async def vitals_aggregates(db: AsyncSession, product_id: int, w: Window) -> dict[str, Any]:
    """Median and worst of signal, round trip and memory over the window's reports
    (``worst``: lowest signal, highest others): from the vitals rollups, every report of
    the window's hours (days past two days; the first counted whole), the median within
    the bins' resolution (:mod:`corral.fleet.vitals_rollups`). A dynamic group has no
    rollups: the newest ``VITALS_SAMPLE`` reports of its devices now."""
    if w.members is None:
        return await vitals_rollups.aggregates(db, product_id, w.start, w.end,
                                               segment=w.segment, firmware=w.firmware)
    q = select(DeviceVitals.payload).where(DeviceVitals.product_id == product_id,
                                           DeviceVitals.at >= w.start, DeviceVitals.at < w.end)
    if (ids := devices_of(product_id, w)) is not None:
        q = q.where(DeviceVitals.device_id.in_(ids))
    rows = (await db.execute(q.order_by(DeviceVitals.at.desc()).limit(VITALS_SAMPLE))
            ).scalars().all()
    out: dict[str, Any] = {"reports": len(rows), "sampled": True}
    for key, path in vitals_rollups.VITAL_PATHS.items():
        values = [v for p in rows if (v := number(p, path)) is not None and math.isfinite(v)]
        out[key] = None if not values else {
            "median": statistics.median(values),
            "worst": min(values) if key == "rssi" else max(values), "count": len(values)}
    return out


async def disconnect_reasons(db: AsyncSession, product_id: int, w: Window, *,
                             limit: int = 10) -> list[dict[str, Any]]:
    """The most frequent disconnect reasons in the window's hours, of the window's group or
    Device OS version if it has one (reasons are not counted per firmware version)."""
    t: Any = FleetDisconnect if w.segment is None else FleetSegmentDisconnect
    where = [t.product_id == product_id, t.bucket >= _floor(w.start, 3600), t.bucket < w.end]
    if w.segment is not None:
        where.append(t.segment == w.segment)
    n = func.sum(t.count).label("n")
    rows = (await db.execute(
        select(t.reason, n).where(*where).group_by(t.reason).order_by(desc("n"), t.reason)
        .limit(limit))).all()
    return [{"reason": r, "count": int(c)} for r, c in rows]
