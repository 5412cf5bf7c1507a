"""An organization's usage as the API and the console show it: the usage report against
the plan, usage per device and per product, and their CSV downloads. ``/v1/orgs/{org}/usage``
and the console's Billing & usage page both read these."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.devices.models import Device
from corral.kit.errors import BadRequest, NotFound
from corral.metering import plans, usage
from corral.metering.plans import EffectivePlan, add_months
from corral.orgs.models import Organization
from corral.products.models import Product

DEVICE_COLUMNS = ("device_id", "product_id", "billable", "data_operations",
                  "data_operations_kb", "events_published", "events_delivered",
                  "function_calls", "variable_reads", "location_points", "events_discarded",
                  "payload_bytes", "cellular_bytes")
PRODUCT_COLUMNS = ("product_id", "product_slug", "product_name", "billable_devices",
                   "data_operations", "data_operations_kb", "events_published",
                   "events_delivered", "function_calls", "variable_reads", "location_points",
                   "events_discarded", "payload_bytes", "cellular_bytes")
KINDS = {"devices": DEVICE_COLUMNS, "products": PRODUCT_COLUMNS}


def month_bounds(month: dt.date) -> tuple[dt.date, dt.date]:
    return month, add_months(month, 1)


def percent(used: float, allowance: float | None) -> float | None:
    if not allowance:
        return None
    return round(100.0 * used / allowance, 2)


def parse_format(value: str | None) -> str:
    fmt = (value or "json").lower()
    if fmt not in ("json", "csv"):
        raise BadRequest("format must be json or csv", code="invalid_format")
    return fmt


def csv_cell(value: Any) -> Any:
    """A CSV cell; text that a spreadsheet would run as a formula is quoted with ``'``."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def filename(org: Organization, month: dt.date, kind: str) -> str:
    return f"usage-{org.slug}-{month.strftime('%Y-%m')}-{kind}.csv"


def csv_download(rows: list[dict[str, Any]], columns: tuple[str, ...], name: str) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in columns])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


async def _products(db: AsyncSession, org: Organization) -> dict[int, Product]:
    rows = (await db.execute(select(Product).where(Product.org_id == org.id))).scalars()
    return {p.id: p for p in rows}


def pause_reason(runtime: Any, org_id: int) -> str | None:
    """Why the usage gate pauses the organization's devices now (None: it does not)."""
    gate = getattr(runtime, "gate", None)
    return gate.paused(org_id) if gate is not None else None


def allowance(plan: EffectivePlan) -> dict[str, Any]:
    return {"data_operations": plan.max_data_ops, "cellular_mb": plan.max_cellular_mb,
            "devices": plan.max_devices, "storage_mb": plan.max_storage_mb}


async def org_usage(db: AsyncSession, org: Organization, month: dt.date,
                    paused: str | None) -> dict[str, Any]:
    """Usage in ``month``: totals, the allowance period's usage against the plan, percentages,
    billable devices and each product's share (``GET /v1/orgs/{org}/usage``)."""
    scope = await usage.scope_of(db, org)
    plan = await plans.effective_plan(db, org.id)
    start, end = month_bounds(month)
    month_totals = await usage.totals(db, scope, start, end)
    pool_start, pool_end = plan.period_bounds(month)
    pool = (month_totals if plan.period == "month"
            else await usage.totals(db, scope, pool_start, min(pool_end, end)))
    billable = await usage.billable_by_product(db, scope, month)
    per_product = await usage.by_product(db, scope, start, end)
    products = await _products(db, org)
    ops = usage.metric_ops(pool, plan)
    devices = sum(billable.values())
    product_rows = []
    for pid, p in sorted(products.items()):
        t = per_product.get(pid, usage.empty_totals())
        product_rows.append({"id": pid, "slug": p.slug, "name": p.name,
                             "billable_devices": billable.get(pid, 0), **t,
                             "cellular_mb": usage.cellular_mb(t["cellular_bytes"])})
    body: dict[str, Any] = {
        "org": {"id": org.id, "slug": org.slug, "name": org.name},
        "period": {"month": month.strftime("%Y-%m"), "start": start.isoformat(),
                   "end": end.isoformat(), "pooling": plan.period,
                   "pool_start": pool_start.isoformat(), "pool_end": pool_end.isoformat()},
        "plan": plans.effective_json(plan),
        "usage": {**month_totals, "billable_devices": devices,
                  "cellular_mb": usage.cellular_mb(month_totals["cellular_bytes"])},
        "pool_usage": {"data_operations": ops, "cellular_bytes": pool["cellular_bytes"],
                       "cellular_mb": usage.cellular_mb(pool["cellular_bytes"])},
        "allowance": allowance(plan),
        "percent": {"data_operations": percent(ops, plan.max_data_ops),
                    "cellular_data": percent(pool["cellular_bytes"], plan.max_cellular_bytes),
                    "devices": percent(devices, plan.max_devices)},
        "products": product_rows,
    }
    if scope.personal_user_id is not None:
        own = per_product.get(None, usage.empty_totals())
        body["own_devices"] = {"billable_devices": billable.get(None, 0), **own}
    body["paused"] = paused is not None
    body["pause_reason"] = paused
    return body


async def device_rows(db: AsyncSession, org: Organization, month: dt.date,
                      product_key: str | None = None) -> list[dict[str, Any]]:
    """Each device's usage in ``month``, billable devices included even without usage;
    ``product_key`` (id or slug) narrows it to one product."""
    scope = await usage.scope_of(db, org)
    start, end = month_bounds(month)
    product_id: int | None = None
    if product_key:
        products = await _products(db, org)
        match = [p for p in products.values()
                 if str(p.id) == product_key or p.slug == product_key.lower()]
        if not match:
            raise NotFound("Product not found")
        product_id = match[0].id
    rows = await usage.by_device(db, scope, start, end, product_id=product_id)
    billable = await usage.billable_device_ids(db, scope, month)
    seen = {r["device_id"] for r in rows}
    missing = sorted(billable - seen)
    if missing:
        q = select(Device.id, Device.product_id).where(Device.id.in_(missing))
        if product_id is not None:
            q = q.where(Device.product_id == product_id)
        for did, pid in (await db.execute(q)).all():
            rows.append({"device_id": did, "product_id": pid, **usage.empty_totals()})
    for r in rows:
        r["billable"] = r["device_id"] in billable
    rows.sort(key=lambda r: r["device_id"])
    return rows


async def product_rows(db: AsyncSession, org: Organization, month: dt.date
                       ) -> list[dict[str, Any]]:
    """Each product's usage and billable devices in ``month``."""
    scope = await usage.scope_of(db, org)
    start, end = month_bounds(month)
    per_product = await usage.by_product(db, scope, start, end)
    billable = await usage.billable_by_product(db, scope, month)
    rows = []
    for pid, p in sorted((await _products(db, org)).items()):
        rows.append({"product_id": pid, "product_slug": p.slug, "product_name": p.name,
                     "billable_devices": billable.get(pid, 0),
                     **per_product.get(pid, usage.empty_totals())})
    return rows


__all__ = ["DEVICE_COLUMNS", "KINDS", "PRODUCT_COLUMNS", "csv_download", "device_rows",
           "filename", "org_usage", "parse_format", "pause_reason", "product_rows"]
