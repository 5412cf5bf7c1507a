"""The "most troubled devices" of fleet health (most disconnects, most failed calls) over a
range of days, without grouping every per-device day of the range per request.

The per-device days (:class:`FleetDeviceDay`) stay the stored facts. Per product and
closed UTC day, the once-a-minute singleton keeps the day's ``TOPS_PER_DAY`` devices with
the most of each kind (:class:`FleetDayTop`) and the most any device left out has
(``rest_*`` of :class:`FleetTroubledDay`). A flush that adds to a day's rows raises the
day's ``version``, so its lists are made again (a late flush of a closed day included);
lists are read only while they are of the day's current version.

A request reads the lists of the range's days that have current ones, and ranks the
per-device days of the others (today, and days whose lists are not made yet; consecutive
ones together) in the database as their lists would be: it fetches at most ``days x
(TOPS_PER_DAY + 1) x 2`` rows, none per device of the fleet. A device's sum is then at
least what the lists show, and at most that plus the ``rest`` of every list it is not in. The answer is exact (``approximate`` false)
when those bounds prove it: every device shown has its exact sum and no device left out
can reach the last one shown; otherwise it says ``approximate`` true (the counts shown
are lower bounds and a device may be missing). A filtered request reads the same rows of
the selected devices only (each probed against the filter by key). Small fleets (no day with more than
``TOPS_PER_DAY`` devices with a count) are always exact.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    Select,
    case,
    delete,
    desc,
    exists,
    func,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from corral.fleet.models import FleetDayTop, FleetDeviceDay, FleetTroubledDay

TOPS_PER_DAY = 100  # per product, day and kind (ten times the summary's list)
KINDS = ("disconnects", "errors")
SETTLE = dt.timedelta(minutes=10)  # a day is closed this long after it ends (late flushes)
DAYS_PER_PASS = 100  # (product, day) lists made per singleton pass at most
_DAY = dt.timedelta(days=1)


def _day(at: dt.datetime) -> dt.datetime:
    at = at.astimezone(dt.UTC) if at.tzinfo else at.replace(tzinfo=dt.UTC)
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


async def make_lists(db: AsyncSession, *, now: dt.datetime,
                     limit: int = DAYS_PER_PASS) -> int:
    """Make the lists of up to ``limit`` closed (product, day) pairs whose lists are out of
    date, newest days first; each pair in its own transaction (commits). Returns how many
    were made."""
    closed = _day(now - SETTLE)
    t = FleetTroubledDay
    due = (await db.execute(
        select(t.product_id, t.day, t.version)
        .where(t.day < closed, t.computed_version != t.version)
        .order_by(t.day.desc(), t.product_id).limit(limit))).all()
    made = 0
    for product_id, day, version in due:
        rest: dict[str, int] = {}
        await db.execute(delete(FleetDayTop).where(FleetDayTop.product_id == product_id,
                                                   FleetDayTop.day == day))
        for kind in KINDS:
            col = getattr(FleetDeviceDay, kind)
            rows = (await db.execute(
                select(FleetDeviceDay.device_id, col)
                .where(FleetDeviceDay.product_id == product_id, FleetDeviceDay.day == day,
                       col > 0)
                .order_by(desc(col), FleetDeviceDay.device_id)
                .limit(TOPS_PER_DAY + 1))).all()
            rest[kind] = int(rows[TOPS_PER_DAY][1]) if len(rows) > TOPS_PER_DAY else 0
            if rows[:TOPS_PER_DAY]:
                await db.execute(FleetDayTop.__table__.insert(), [
                    {"product_id": product_id, "day": day, "kind": kind, "device_id": d,
                     "n": int(n)} for d, n in rows[:TOPS_PER_DAY]])
        # a flush that added to the day meanwhile raised its version: this stays out of date
        done = await db.execute(
            update(t).where(t.product_id == product_id, t.day == day, t.version == version)
            .values(computed_version=version, rest_disconnects=rest["disconnects"],
                    rest_errors=rest["errors"]))
        await db.commit()
        made += int(getattr(done, "rowcount", 0) or 0)
    return made


async def ranked_sums(db: AsyncSession, where: list[Any], limit: int
                      ) -> dict[str, list[tuple[str, int]]]:
    """Per kind, the ``limit`` devices with the highest sums (more than 0) of the
    per-device days matching ``where``, highest first (ties by device ID): one pass over
    the covering index ix_fleet_device_days_product_day, the sums a CTE both lists read
    (both databases materialize a CTE read twice)."""
    d = FleetDeviceDay
    sums = (select(d.device_id, func.sum(d.disconnects).label("disconnects"),
                   func.sum(d.errors).label("errors"))
            .where(*where).group_by(d.device_id).cte("sums"))
    parts = []
    for kind in KINDS:
        col = sums.c[kind]
        parts.append(select(literal(kind).label("kind"), sums.c.device_id, col.label("n"))
                     .where(col > 0).order_by(desc(col), sums.c.device_id).limit(limit)
                     .subquery().select())
    out: dict[str, list[tuple[str, int]]] = {k: [] for k in KINDS}
    for kind, device_id, n in (await db.execute(union_all(*parts))).all():
        out[kind].append((device_id, int(n)))
    for rows in out.values():
        rows.sort(key=lambda x: (-x[1], x[0]))
    return out


def _runs(days: list[dt.datetime]) -> list[tuple[dt.datetime, dt.datetime]]:
    """Sorted days as [start, end) ranges of consecutive days."""
    out: list[tuple[dt.datetime, dt.datetime]] = []
    for d in days:
        if out and out[-1][1] == d:
            out[-1] = (out[-1][0], d + _DAY)
        else:
            out.append((d, d + _DAY))
    return out


def _among(devices: Select[Any] | None, column: Any) -> list[Any]:
    """The condition that ``column`` (a device ID) is one of ``devices`` (a select of device
    IDs: a filter's devices), probed per row (a correlated EXISTS: never the whole set
    read), or none."""
    if devices is None:
        return []
    return [exists(devices.where(devices.selected_columns[0] == column))]


async def troubled(db: AsyncSession, product_id: int, start: dt.datetime, end: dt.datetime,
                   *, limit: int = 10, devices: Select[Any] | None = None) -> dict[str, Any]:
    """The ``limit`` devices with the most disconnects and with the most failed calls in
    the days from ``start``'s to before ``end`` (see the module doc), and ``approximate``;
    only ``devices`` (a select of device IDs, a filter's) when given: the lists' rows and
    the days without lists are probed per row (the rest of a list bounds every device left
    out of it, selected or not)."""
    first = _day(start)
    days = []
    d = first
    while d < end:
        days.append(d)
        d += _DAY
    t = FleetTroubledDay
    rest: dict[dt.datetime, tuple[int, int]] = {}
    for day, r_disc, r_err in (await db.execute(
            select(t.day, t.rest_disconnects, t.rest_errors).where(
                t.product_id == product_id, t.day >= first, t.day < end,
                t.computed_version == t.version))).all():
        rest[_day(day)] = (int(r_disc), int(r_err))
    sums: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    # per device: the rest of the lists it is in (what its upper bound does not add)
    covered: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    if rest:  # the lists' rows summed per device in the database
        top = FleetDayTop
        listed_rest = case((top.kind == "disconnects", t.rest_disconnects),
                           else_=t.rest_errors)
        for kind, device, n, r in (await db.execute(
                select(top.kind, top.device_id, func.sum(top.n), func.sum(listed_rest))
                .join(t, (t.product_id == top.product_id) & (t.day == top.day))
                .where(top.product_id == product_id, top.day >= first, top.day < end,
                       t.computed_version == t.version, *_among(devices, top.device_id))
                .group_by(top.kind, top.device_id))).all():
            if kind in sums:
                sums[kind][device] = int(n)
                covered[kind][device] = int(r)
    d_ = FleetDeviceDay
    # the days without lists, consecutive ones together: ranked as their lists would be
    for lo, hi in _runs([x for x in days if x not in rest]):
        ranked_run = await ranked_sums(db, [d_.product_id == product_id, d_.day >= lo,
                                            d_.day < hi, *_among(devices, d_.device_id)],
                                       TOPS_PER_DAY + 1)
        run_rest = []
        for kind in KINDS:
            found = ranked_run[kind]
            cut = found[TOPS_PER_DAY][1] if len(found) > TOPS_PER_DAY else 0
            run_rest.append(cut)
            for device, n in found[:TOPS_PER_DAY]:
                sums[kind][device] = sums[kind].get(device, 0) + n
                covered[kind][device] = covered[kind].get(device, 0) + cut
        rest[lo] = (run_rest[0], run_rest[1])
    out: dict[str, Any] = {}
    approximate = False
    for i, kind in enumerate(KINDS):
        unseen = sum(r[i] for r in rest.values())  # the most a device in no list has

        def upper(device: str, *, _kind: str = kind, _unseen: int = unseen) -> int:
            """The most ``device`` can have: plus the rest of each cut list it is not in."""
            return sums[_kind][device] + _unseen - covered[_kind].get(device, 0)

        ranked = sorted(sums[kind].items(), key=lambda x: (-x[1], x[0]))
        shown = ranked[:limit]
        out[kind] = [{"device_id": device, kind: n} for device, n in shown]
        if not unseen:
            continue
        exact = all(upper(device) == n for device, n in shown)
        least = shown[-1][1] if len(shown) == limit else 0
        others = max((upper(device) for device, _n in ranked[limit:]), default=0)
        if not exact or max(others, unseen) >= max(least, 1):
            approximate = True
    out["approximate"] = approximate
    return out
