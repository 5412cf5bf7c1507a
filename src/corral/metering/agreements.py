"""Particle's billing surface answered from corral's plans and usage: service agreements,
asynchronous usage reports and service-agreement notifications (reference §1.15).

* A **service agreement** is an organization's plan: one per organization, its id the
  organization's id. A user's (``/v1/user/service_agreements``) is the one of the user's
  personal organization (their own devices and personal products). ``agreement_type`` is
  ``enterprise`` on the Enterprise plan, else ``developer``; the billing period is the
  plan's pooling period (a calendar month, or a contract year).
* A **usage report** (``devices`` or ``products``, over a date range) is requested, built by
  the background worker (:class:`UsageReportWorker`, a cluster singleton, a few reports per
  pass) and, once ``available``, downloaded as CSV until it expires. Usage is counted per
  device and calendar month, so a report has one row per device (or product) and month the
  range touches.
* **Notifications** are the organization's usage notifications (70/90/100 % of the data
  operations or cellular data, the automatic pause at the limit and the unpause), in
  Particle's JSON:API shape.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import logging
import re
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.devices.models import Device
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, NotFound
from corral.metering import plans, reports, usage
from corral.metering.models import Notification, OrgPlan, UsageReport
from corral.metering.plans import EffectivePlan, add_months, month_start, months_between
from corral.orgs.models import Organization
from corral.products.models import Product

log = logging.getLogger("corral.metering")

TRACKER_PLATFORMS = frozenset({26, 28})  # Tracker One/SoM, Tracker M: "asset_tracker"
CLASSES = ("wifi", "cellular", "asset_tracker")
REPORT_TYPES = ("devices", "products")
REPORT_KEEP = dt.timedelta(days=7)  # a report can be downloaded this long
MAX_REPORT_DAYS = 366
MAX_REPORT_ITEMS = 1000  # devices or products named in one report
REPORTS_PER_PASS = 5
DEVICE_ID_RE = re.compile(r"^[0-9a-fA-F]{24}$")
NOTIFIED_KINDS = ("usage.threshold", "usage.resumed")


# --- service agreements ---------------------------------------------------------------------

async def personal_org(db: AsyncSession, user_id: int) -> Organization:
    org = (await db.execute(select(Organization).where(
        Organization.personal.is_(True), Organization.owner_user_id == user_id)
        .order_by(Organization.id).limit(1))).scalar_one_or_none()
    if org is None:
        raise NotFound("Service agreement not found")
    return org


def agreement_type(plan: EffectivePlan) -> str:
    return "enterprise" if plan.plan_code == "enterprise" else "developer"


def _class_of() -> Any:
    return case((Device.platform_id.in_(sorted(TRACKER_PLATFORMS)), "asset_tracker"),
                (Device.cellular.is_(True), "cellular"), else_="wifi")


async def usage_summary(db: AsyncSession, org: Organization, plan: EffectivePlan,
                        now: dt.datetime) -> dict[str, Any]:
    """``current_usage_summary``: devices owned, billable this month, data operations and
    cellular bytes in the current billing period, in all and per connectivity class."""
    scope = await usage.scope_of(db, org)
    start, end = plan.period_bounds(now)
    month = month_start(now.date())
    cls = _class_of()
    owned = {r[0]: int(r[1]) for r in (await db.execute(
        select(cls, func.count()).where(scope.devices()).group_by(cls))).all()}
    billable = {r[0]: int(r[1]) for r in (await db.execute(
        select(cls, func.count()).where(scope.devices(), usage.billable_condition(month))
        .group_by(cls))).all()}
    u = usage.U  # the counters and the usage not folded yet
    ops_col = u.data_operations_kb if plan.per_kb else u.data_operations
    used = {r[0]: (int(r[1] or 0), int(r[2] or 0)) for r in (await db.execute(
        select(cls, func.sum(ops_col), func.sum(u.cellular_bytes))
        .select_from(u.device_id.table).join(Device, Device.id == u.device_id)
        .where(scope.counters(), u.period >= start, u.period < end)
        .group_by(cls))).all()}
    total = await usage.totals(db, scope, start, end)
    connectivity: dict[str, Any] = {"all": {
        "owned_devices": sum(owned.values()), "billable_devices": sum(billable.values()),
        "device_data": total["cellular_bytes"],
        "device_messages": usage.metric_ops(total, plan)}}
    for c in CLASSES:
        connectivity[c] = {"owned_devices": owned.get(c, 0),
                           "billable_devices": billable.get(c, 0),
                           "device_data": used.get(c, (0, 0))[1],
                           "device_messages": used.get(c, (0, 0))[0]}
    return {"device_limit_reached": bool(plan.max_devices)
            and sum(billable.values()) >= plan.max_devices,
            "connectivity": connectivity}


async def agreement_json(db: AsyncSession, org: Organization, *, paused: bool = False
                         ) -> dict[str, Any]:
    """The organization's service agreement (JSON:API resource object)."""
    now = clock.now()
    plan = await plans.effective_plan(db, org.id)
    row = await db.get(OrgPlan, org.id)
    start, end = plan.period_bounds(now)
    since = (row.created_at if row is not None else org.created_at).date()
    contract_end = None
    if plan.period == "year":
        contract_end = (end - dt.timedelta(days=1)).isoformat()
    return {"id": org.id, "type": "service_agreement", "attributes": {
        "owner_id": org.owner_user_id if org.personal else org.id,
        "owner_type": "user" if org.personal else "organization",
        "name": f"{org.name} ({plan.plan_code.capitalize()} plan)",
        "agreement_type": agreement_type(plan),
        "plan": plan.plan_code,
        "duration": "annual" if plan.period == "year" else "monthly",
        "state": "active", "usage_paused": paused,
        "starts_on": since.isoformat(), "ends_on": contract_end,
        "current_billing_period_start": start.isoformat(),
        "current_billing_period_end": (end - dt.timedelta(days=1)).isoformat(),
        "next_billing_period_start": end.isoformat(),
        "current_usage_summary": await usage_summary(db, org, plan, now),
        "pricing_terms": {
            "device": {"max_devices": plan.max_devices},
            "messaging": {"max_messages": plan.max_data_ops, "per_kb": plan.per_kb},
            "device_data": {"max_data": plan.max_cellular_bytes,
                            "max_data_mb": plan.max_cellular_mb},
            "rates": {"blocks": plan.blocks, "block_price_cents": plan.block_price_cents},
        }}}


def check_agreement(org: Organization, said: int | None) -> None:
    """404 unless ``said`` is the organization's service agreement."""
    if said is None or said != org.id:
        raise NotFound("Service agreement not found")


# --- usage reports --------------------------------------------------------------------------

def _date(value: Any, field: str) -> dt.date:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10]) if value else _missing(field)
    except ValueError:
        raise BadRequest(f"{field} must be an ISO 8601 date (YYYY-MM-DD)",
                         code="invalid_date") from None


def _missing(field: str) -> dt.date:
    raise BadRequest(f"{field} is required", code="invalid_date")


async def create_report(db: AsyncSession, org: Organization, *, requested_by: int | None,
                        report_type: str, start: Any, end: Any, devices: list[str] | None,
                        products: list[str] | None) -> UsageReport:
    """A pending report (no commit); 400 on a bad range or a device/product not the
    organization's."""
    if report_type not in REPORT_TYPES:
        raise BadRequest("report_type must be devices or products", code="invalid_report_type")
    first, last = _date(start, "date_period_start"), _date(end, "date_period_end")
    if last < first:
        raise BadRequest("date_period_end is before date_period_start", code="invalid_date")
    if (last - first).days >= MAX_REPORT_DAYS:
        raise BadRequest(f"A report covers at most {MAX_REPORT_DAYS} days", code="invalid_date")
    if first.year < 2000 or last > clock.now().date() + dt.timedelta(days=MAX_REPORT_DAYS):
        raise BadRequest("The date range is out of bounds", code="invalid_date")
    devices = [d.strip().lower() for d in devices or [] if d.strip()]
    products = [str(p).strip() for p in products or [] if str(p).strip()]
    if len(devices) > MAX_REPORT_ITEMS or len(products) > MAX_REPORT_ITEMS:
        raise BadRequest(f"At most {MAX_REPORT_ITEMS} devices or products",
                         code="invalid_request")
    bad = [d for d in devices if not DEVICE_ID_RE.match(d)]
    if bad:
        raise BadRequest(f"Not device IDs: {', '.join(b[:40] for b in bad[:5])}",
                         code="invalid_device_id")
    product_ids = await _product_ids(db, org, products)
    if devices:
        scope = await usage.scope_of(db, org)
        known = set((await db.execute(select(Device.id).where(
            Device.id.in_(devices), scope.devices()))).scalars())
        # a device that moved away keeps its earlier usage in the organization's counters
        known |= set((await db.execute(select(usage.U.device_id).where(
            usage.U.device_id.in_(devices), scope.counters()).distinct())).scalars())
        unknown = [d for d in devices if d not in known]
        if unknown:
            raise BadRequest(f"Devices not in this service agreement: "
                             f"{', '.join(unknown[:5])}", code="invalid_device_id")
    now = clock.now()
    report = UsageReport(org_id=org.id, requested_by=requested_by, report_type=report_type,
                         date_period_start=first, date_period_end=last,
                         params={"devices": list(dict.fromkeys(devices)),
                                 "products": product_ids, "recipient_list": []},
                         state="pending", created_at=now, expires_at=now + REPORT_KEEP)
    db.add(report)
    await db.flush()
    return report


async def _product_ids(db: AsyncSession, org: Organization, keys: list[str]) -> list[int]:
    if not keys:
        return []
    rows = (await db.execute(select(Product.id, Product.slug).where(
        Product.org_id == org.id))).all()
    by_key = {str(pid): pid for pid, _s in rows} | {slug: pid for pid, slug in rows}
    unknown = [k for k in keys if k.lower() not in by_key and k not in by_key]
    if unknown:
        raise BadRequest(f"Products not in this service agreement: "
                         f"{', '.join(u[:40] for u in unknown[:5])}", code="invalid_product")
    return list(dict.fromkeys(by_key.get(k, by_key.get(k.lower(), 0)) for k in keys))


def report_json(r: UsageReport, download_url: str | None) -> dict[str, Any]:
    return {"id": r.id, "type": "usage_report", "attributes": {
        "state": r.state, "service_agreement_id": r.org_id,
        "date_period_start": r.date_period_start.isoformat(),
        "date_period_end": r.date_period_end.isoformat(),
        "created_at": clock.iso(r.created_at), "expires_at": clock.iso(r.expires_at),
        "report_type": r.report_type,
        "report_params": {"devices": r.params.get("devices", []),
                          "products": r.params.get("products", []),
                          "recipient_list": r.params.get("recipient_list", [])},
        "download_url": download_url if r.state == "available" else None,
        "error": r.error}}


async def get_report(db: AsyncSession, org: Organization, report_id: int | None
                     ) -> UsageReport:
    r = None if report_id is None else (await db.execute(select(UsageReport).where(
        UsageReport.id == report_id, UsageReport.org_id == org.id))).scalar_one_or_none()
    if r is None or r.expires_at <= clock.now():
        raise NotFound("Usage report not found")
    return r


def report_csv(r: UsageReport) -> str:
    if r.state != "available" or r.csv is None:
        raise Conflict(f"The report is {r.state}; poll it until it is available",
                       code="report_not_ready")
    return r.csv


def report_filename(r: UsageReport) -> str:
    return (f"usage-report-{r.id}-{r.report_type}-{r.date_period_start.isoformat()}-"
            f"{r.date_period_end.isoformat()}.csv")


async def build(db: AsyncSession, r: UsageReport) -> str:
    """The report's CSV: one row per device (or product) and month of the range."""
    org = await db.get(Organization, r.org_id)
    if org is None:
        raise NotFound("The organization is gone")
    months = months_between(r.date_period_start,
                            add_months(month_start(r.date_period_end), 1))
    devices = set(r.params.get("devices") or [])
    products = set(r.params.get("products") or [])
    columns = ("month", *reports.KINDS[r.report_type])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for month in months:
        if r.report_type == "devices":
            rows = await reports.device_rows(db, org, month)
            rows = [x for x in rows if (not devices or x["device_id"] in devices)
                    and (not products or x["product_id"] in products)]
        else:
            rows = await reports.product_rows(db, org, month)
            rows = [x for x in rows if not products or x["product_id"] in products]
        for x in rows:
            writer.writerow([month.strftime("%Y-%m"),
                             *(reports.csv_cell(x.get(c)) for c in columns[1:])])
    return out.getvalue()


class UsageReportWorker:
    """Builds pending usage reports (a few per pass, oldest first) and deletes expired
    ones; one node at a time (the ``usage-reports`` lease). ``woken`` is set when a report
    is requested, so it is built at once rather than on the next pass."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker
        self.woken = asyncio.Event()
        self.built = 0

    def wake(self) -> None:
        self.woken.set()

    async def run_due(self, limit: int = REPORTS_PER_PASS) -> int:
        """Build up to ``limit`` pending reports; returns how many were finished."""
        self.woken.clear()
        now = clock.now()
        async with self.sessionmaker() as db:
            await db.execute(delete(UsageReport).where(UsageReport.expires_at <= now))
            ids = list((await db.execute(select(UsageReport.id).where(
                UsageReport.state == "pending").order_by(UsageReport.id).limit(limit)))
                .scalars())
            await db.commit()
        done = 0
        for rid in ids:
            async with self.sessionmaker() as db:
                # claim it: another node that got here first leaves it alone
                claimed = await db.execute(update(UsageReport).where(
                    UsageReport.id == rid, UsageReport.state == "pending")
                    .values(state="processing").execution_options(synchronize_session=False))
                await db.commit()
                if not claimed.rowcount:  # type: ignore[attr-defined]
                    continue
            async with self.sessionmaker() as db:
                r = await db.get(UsageReport, rid)
                if r is None:
                    continue
                try:
                    r.csv, r.state = await build(db, r), "available"
                except Exception as exc:
                    log.exception("usage report %s failed", rid)
                    await db.rollback()
                    r = await db.get(UsageReport, rid)
                    if r is None:
                        continue
                    r.state, r.error = "failed", str(exc)[:200] or "The report failed"
                await db.commit()
                done += 1
        self.built += done
        return done


# --- notifications --------------------------------------------------------------------------

def event_name(n: Notification, kind: str) -> str:
    """Particle's ``event_name``: ``<agreement type>:usage_activity:<what>``, where what is
    ``<threshold>_percent`` (``data_operations`` or ``cellular_data``: ``details.metric``),
    ``automatic_pause`` (100 % on a plan that pauses) or ``automatic_unpause``."""
    details = n.details or {}
    if n.kind == "usage.resumed":
        what = "automatic_unpause"
    elif details.get("paused"):
        what = "automatic_pause"
    else:
        what = f"{int(details.get('threshold', 0))}_percent"
    return f"{kind}:usage_activity:{what}"


def notification_json(n: Notification, kind: str) -> dict[str, Any]:
    details = dict(n.details or {})
    period = details.get("period")
    return {"id": n.id, "type": "notification", "attributes": {
        "state": "read" if n.read_at else "unread",
        "event_name": event_name(n, kind),
        "time_period": period,
        "created_at": clock.iso(n.created_at),
        "resource_id": n.org_id, "resource_type": "ServiceAgreement",
        "title": n.title, "body": n.body, "details": details}}


async def notifications(db: AsyncSession, org: Organization, limit: int = 200
                        ) -> list[dict[str, Any]]:
    plan = await plans.effective_plan(db, org.id)
    rows = (await db.execute(select(Notification).where(
        Notification.org_id == org.id, Notification.kind.in_(NOTIFIED_KINDS))
        .order_by(Notification.id.desc()).limit(limit))).scalars()
    return [notification_json(n, agreement_type(plan)) for n in rows]


__all__ = ["UsageReportWorker", "agreement_json", "build", "check_agreement", "create_report",
           "get_report", "notifications", "personal_org", "report_csv", "report_json"]
