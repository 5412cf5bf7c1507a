"""Reading usage: totals per organization, product, device and period; billable devices;
SIM deactivation intervals; cellular data.

Counters are per device per UTC month (:mod:`corral.metering.ledger`), plus the usage the
metering tick has not folded into them yet (the view ``usage_pending``); an allowance
period is one month or, pooled annually (Enterprise), twelve. An organization's usage is
every counter row tagged with it; a personal organization also owns its user's own devices
(rows with no organization and that ``owner_user_id``).

Billable devices in a month (the seed's rules): every device of every product of the
organization (and, for a personal organization, the user's own devices) that first came
online before the month ended, including ones offline since, except a device whose SIM was
deactivated for the entire month. No proration.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.base import ReadOnlyColumnCollection
from sqlalchemy.sql.elements import KeyedColumnElement

from corral.devices.models import Device
from corral.kit.errors import BadRequest
from corral.metering.models import PENDING, SimDeactivation, UsageCounter
from corral.metering.plans import MB, EffectivePlan, add_months, month_start
from corral.orgs.models import Organization
from corral.products.models import Product

SUMMED = ("data_operations", "data_operations_kb", "events_published", "events_delivered",
          "function_calls", "variable_reads", "location_points", "events_discarded",
          "payload_bytes", "cellular_bytes")


def _usage() -> ReadOnlyColumnCollection[str, KeyedColumnElement[Any]]:
    """What readers sum: the counter rows plus the usage not folded into them yet, the view
    ``usage_pending`` (one statement, so one snapshot: a fold committing meanwhile is seen
    entirely or not at all). An unfolded increment carries the tenancy its device had when
    it was written."""
    keys = ("device_id", "period", "product_id", "org_id", "owner_user_id", *SUMMED)
    counters, pending = UsageCounter.__table__.c, PENDING.c
    return union_all(select(*[counters[k] for k in keys]),
                     select(*[pending[k] for k in keys])).subquery("usage").c


U = _usage()


@dataclasses.dataclass(frozen=True, slots=True)
class Scope:
    """Whose usage: an organization, plus its owner's own devices when it is personal."""

    org_id: int
    personal_user_id: int | None = None

    def counters(self) -> ColumnElement[bool]:
        cond = U.org_id == self.org_id
        if self.personal_user_id is not None:
            cond = or_(cond, and_(U.org_id.is_(None), U.owner_user_id == self.personal_user_id))
        return cond

    def devices(self) -> ColumnElement[bool]:
        in_org = Device.product_id.in_(select(Product.id).where(Product.org_id == self.org_id))
        if self.personal_user_id is None:
            return in_org
        return or_(in_org, and_(Device.product_id.is_(None),
                                Device.owner_user_id == self.personal_user_id))


async def scope_of(db: AsyncSession, org: Organization) -> Scope:
    return Scope(org.id, org.owner_user_id if org.personal else None)


def parse_period(value: str | None, today: dt.date) -> dt.date:
    """``YYYY-MM`` (default: this month) as the month's first day; 400 otherwise."""
    if value is None or value == "":
        return month_start(today)
    try:
        year, month = value.split("-")
        if len(year) != 4 or len(month) != 2 or not 1970 <= int(year) <= 9998:
            raise ValueError(value)
        return dt.date(int(year), int(month), 1)
    except ValueError:
        raise BadRequest("period must be a month as YYYY-MM", code="invalid_period") from None


def _sums() -> list[Any]:
    return [func.coalesce(func.sum(U[c]), 0).label(c) for c in SUMMED]


def _row_dict(row: Any) -> dict[str, int]:
    return {c: int(getattr(row, c) or 0) for c in SUMMED}


def metric_ops(row: dict[str, int], plan: EffectivePlan) -> int:
    """The data operations ``row`` counts under ``plan`` (per operation, or per KiB)."""
    return row["data_operations_kb"] if plan.per_kb else row["data_operations"]


async def totals(db: AsyncSession, scope: Scope, start: dt.date, end: dt.date
                 ) -> dict[str, int]:
    """Summed counters of the scope over the months in ``[start, end)``."""
    row = (await db.execute(select(*_sums()).where(
        scope.counters(), U.period >= start, U.period < end))).one()
    return _row_dict(row)


async def by_product(db: AsyncSession, scope: Scope, start: dt.date, end: dt.date
                     ) -> dict[int | None, dict[str, int]]:
    """Summed counters per product (``None``: the owner's own devices)."""
    rows = (await db.execute(select(U.product_id, *_sums()).where(
        scope.counters(), U.period >= start, U.period < end).group_by(U.product_id))).all()
    return {r.product_id: _row_dict(r) for r in rows}


async def by_device(db: AsyncSession, scope: Scope, start: dt.date, end: dt.date, *,
                    product_id: int | None = None) -> list[dict[str, Any]]:
    """One entry per device with usage in ``[start, end)`` (summed over its months)."""
    q = select(U.device_id, func.max(U.product_id).label("product_id"), *_sums()).where(
        scope.counters(), U.period >= start, U.period < end)
    if product_id is not None:
        q = q.where(U.product_id == product_id)
    rows = (await db.execute(q.group_by(U.device_id).order_by(U.device_id))).all()
    return [{"device_id": r.device_id, "product_id": r.product_id, **_row_dict(r)}
            for r in rows]


def _sim_off_whole(start: dt.date, end: dt.date) -> ColumnElement[bool]:
    """The device's SIM was deactivated for all of ``[start, end)``."""
    s = dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC)
    e = dt.datetime(end.year, end.month, end.day, tzinfo=dt.UTC)
    return exists(select(SimDeactivation.id).where(
        SimDeactivation.iccid == Device.iccid, SimDeactivation.deactivated_at <= s,
        or_(SimDeactivation.reactivated_at.is_(None), SimDeactivation.reactivated_at >= e)))


def billable_condition(month: dt.date) -> ColumnElement[bool]:
    """A device (row of ``devices``) is billable in ``month``."""
    end = add_months(month, 1)
    e = dt.datetime(end.year, end.month, 1, tzinfo=dt.UTC)
    return and_(Device.first_online_at.isnot(None), Device.first_online_at < e,
                or_(Device.iccid.is_(None), ~_sim_off_whole(month, end)))


async def billable_devices(db: AsyncSession, scope: Scope, month: dt.date) -> int:
    return int((await db.execute(select(func.count()).select_from(Device).where(
        scope.devices(), billable_condition(month_start(month))))).scalar_one())


async def billable_by_product(db: AsyncSession, scope: Scope, month: dt.date
                              ) -> dict[int | None, int]:
    rows = (await db.execute(select(Device.product_id, func.count()).where(
        scope.devices(), billable_condition(month_start(month)))
        .group_by(Device.product_id))).all()
    return {r[0]: int(r[1]) for r in rows}


async def billable_device_ids(db: AsyncSession, scope: Scope, month: dt.date) -> set[str]:
    return set((await db.execute(select(Device.id).where(
        scope.devices(), billable_condition(month_start(month))))).scalars())


# --- every organization at once (the usage gate's refresh) ----------------------------------

async def personal_orgs(db: AsyncSession) -> dict[int, int]:
    """user id -> that user's personal organization id."""
    rows = (await db.execute(select(Organization.owner_user_id, Organization.id).where(
        Organization.personal.is_(True), Organization.owner_user_id.isnot(None)))).all()
    return {int(u or 0): int(o) for u, o in rows}


async def monthly_by_org(db: AsyncSession, since: dt.date, user_org: dict[int, int],
                         only: set[int] | None = None
                         ) -> dict[int, dict[dt.date, dict[str, int]]]:
    """org id -> month -> summed counters, for months from ``since`` (a user's own devices
    folded into their personal organization); ``only``: just these organizations."""
    out: dict[int, dict[dt.date, dict[str, int]]] = defaultdict(dict)
    if only is not None and not only:
        return out

    def add(org: int, period: dt.date, row: dict[str, int]) -> None:
        have = out[org].get(period)
        if have is None:
            out[org][period] = row
        else:
            for k, v in row.items():
                have[k] += v

    q = select(U.org_id, U.period, *_sums()).where(U.org_id.isnot(None), U.period >= since)
    if only is not None:
        q = q.where(U.org_id.in_(sorted(only)))
    for r in (await db.execute(q.group_by(U.org_id, U.period))).all():
        add(int(r.org_id), r.period, _row_dict(r))
    q = select(U.owner_user_id, U.period, *_sums()).where(
        U.org_id.is_(None), U.owner_user_id.isnot(None), U.period >= since)
    if only is not None:
        q = q.where(U.owner_user_id.in_(sorted(u for u, o in user_org.items() if o in only)))
    rows = (await db.execute(q.group_by(U.owner_user_id, U.period))).all()
    for r in rows:
        org = user_org.get(int(r.owner_user_id))
        if org is not None:
            add(org, r.period, _row_dict(r))
    return out


async def billable_by_org(db: AsyncSession, month: dt.date, user_org: dict[int, int]
                          ) -> dict[int, int]:
    """org id -> billable devices in ``month``."""
    cond = billable_condition(month_start(month))
    out: dict[int, int] = defaultdict(int)
    rows = (await db.execute(select(Product.org_id, func.count()).select_from(Device)
                             .join(Product, Product.id == Device.product_id)
                             .where(cond).group_by(Product.org_id))).all()
    for org, n in rows:
        out[int(org)] += int(n)
    own = (await db.execute(select(Device.owner_user_id, func.count()).where(
        Device.product_id.is_(None), Device.owner_user_id.isnot(None), cond)
        .group_by(Device.owner_user_id))).all()
    for user, n in own:
        personal = user_org.get(int(user or 0))
        if personal is not None:
            out[personal] += int(n)
    return dict(out)


async def committed_first_online(db: AsyncSession, device_ids: list[str]) -> set[str]:
    """Which of ``device_ids`` already have ``first_online_at`` stored."""
    found: set[str] = set()
    for i in range(0, len(device_ids), 500):
        chunk = device_ids[i:i + 500]
        found.update((await db.execute(select(Device.id).where(
            Device.id.in_(chunk), Device.first_online_at.isnot(None)))).scalars())
    return found


# --- SIMs -----------------------------------------------------------------------------------

async def sim_deactivated(db: AsyncSession, iccid: str) -> SimDeactivation | None:
    """The open deactivation interval of ``iccid``, if the SIM is deactivated now."""
    return (await db.execute(select(SimDeactivation).where(
        SimDeactivation.iccid == iccid, SimDeactivation.reactivated_at.is_(None))
        .order_by(SimDeactivation.deactivated_at.desc()).limit(1))).scalar_one_or_none()


def cellular_mb(cellular_bytes: int) -> float:
    return round(cellular_bytes / MB, 3)


def empty_totals() -> dict[str, int]:
    return dict.fromkeys(SUMMED, 0)


__all__ = ["SUMMED", "Scope", "billable_by_org", "billable_by_product", "billable_devices",
           "by_device", "by_product", "cellular_mb", "metric_ops", "monthly_by_org",
           "parse_period", "personal_orgs", "scope_of", "totals"]
