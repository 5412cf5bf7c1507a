"""Usage per day: the metering tick records each organization's month-to-date totals once
a tick (one row per organization and day, the day's latest reading, :class:`UsageDay`);
a day's usage is its reading minus the previous recorded day's of the same month.

Counters themselves stay per device per month (:mod:`corral.metering.ledger`); this is a
small per-organization series for charts, not a billing record. A day on which no tick ran
has no row, and its usage shows on the next recorded day."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from corral.metering.models import UsageDay
from corral.metering.plans import EffectivePlan, add_months, month_start

FIELDS = ("data_operations", "data_operations_kb", "cellular_bytes")


def reading(row: Mapping[str, int]) -> tuple[int, int, int]:
    """The recorded part of a month's summed counters."""
    return (int(row.get("data_operations", 0)), int(row.get("data_operations_kb", 0)),
            int(row.get("cellular_bytes", 0)))


async def record(db: AsyncSession, day: dt.date, readings: Mapping[int, tuple[int, int, int]]
                 ) -> None:
    """Store ``org id -> month-to-date reading`` as ``day``'s (replacing an earlier reading
    of the same day). No commit."""
    if not readings:
        return
    ins: Any = postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    rows = [{"org_id": org, "day": day, **dict(zip(FIELDS, values, strict=True))}
            for org, values in sorted(readings.items())]
    for i in range(0, len(rows), 500):
        stmt = ins(UsageDay).values(rows[i:i + 500])
        await db.execute(stmt.on_conflict_do_update(
            index_elements=["org_id", "day"],
            set_={f: getattr(stmt.excluded, f) for f in FIELDS}))


@dataclasses.dataclass(frozen=True, slots=True)
class Day:
    day: dt.date
    data_operations: int  # under the plan's metric (per operation or per started KiB)
    cellular_bytes: int
    recorded: bool  # False: no reading that day (nothing used, or no tick ran)


async def per_day(db: AsyncSession, org_id: int, month: dt.date, plan: EffectivePlan,
                  *, until: dt.date | None = None) -> list[Day]:
    """Each day of ``month`` (up to ``until``, inclusive) with the usage recorded on it."""
    start = month_start(month)
    end = add_months(start, 1)
    last = min(end - dt.timedelta(days=1), until) if until else end - dt.timedelta(days=1)
    rows = (await db.execute(select(UsageDay).where(
        UsageDay.org_id == org_id, UsageDay.day >= start, UsageDay.day < end)
        .order_by(UsageDay.day))).scalars().all()
    by_day = {r.day: r for r in rows}
    out: list[Day] = []
    prev_ops = prev_cell = 0
    day = start
    while day <= last:
        r = by_day.get(day)
        if r is None:
            out.append(Day(day, 0, 0, False))
        else:
            ops = r.data_operations_kb if plan.per_kb else r.data_operations
            # a device moved to another organization takes its month with it: never below 0
            out.append(Day(day, max(0, ops - prev_ops), max(0, r.cellular_bytes - prev_cell),
                           True))
            prev_ops, prev_cell = ops, r.cellular_bytes
        day += dt.timedelta(days=1)
    return out


__all__ = ["Day", "per_day", "reading", "record"]
