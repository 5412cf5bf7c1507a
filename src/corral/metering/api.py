"""/v1 usage, plans, usage notifications and SIM activation routes.

Usage and notifications are billing information: only an organization's Administrators and
Owners see them (``orgs.billing:get``).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import and_, select, update

from corral.auth.deps import AuthCtx
from corral.devices.models import Device
from corral.kit import clock
from corral.kit.body import as_bool, read_body
from corral.kit.errors import BadRequest, NotFound
from corral.kit.responses import ok
from corral.metering import alerts, plans, sims, usage
from corral.metering.models import Notification
from corral.metering.plans import EffectivePlan, add_months
from corral.orgs.access import OrgCtx, OrgGuard
from corral.products.access import ProductCtx, ProductGuard
from corral.products.models import Product

router = APIRouter(tags=["usage"])

DEVICE_COLUMNS = ("device_id", "product_id", "billable", "data_operations",
                  "data_operations_kb", "events_published", "events_delivered",
                  "function_calls", "variable_reads", "location_points", "events_discarded",
                  "payload_bytes", "cellular_bytes")
PRODUCT_COLUMNS = ("product_id", "product_slug", "product_name", "billable_devices",
                   "data_operations", "data_operations_kb", "events_published",
                   "events_delivered", "function_calls", "variable_reads", "location_points",
                   "events_discarded", "payload_bytes", "cellular_bytes")


def _month_bounds(month: dt.date) -> tuple[dt.date, dt.date]:
    return month, add_months(month, 1)


def _pct(used: float, allowance: float | None) -> float | None:
    if not allowance:
        return None
    return round(100.0 * used / allowance, 2)


def _format(request: Request) -> str:
    fmt = request.query_params.get("format", "json").lower()
    if fmt not in ("json", "csv"):
        raise BadRequest("format must be json or csv", code="invalid_format")
    return fmt


def _cell(value: Any) -> Any:
    """A CSV cell; text that a spreadsheet would run as a formula is quoted with ``'``."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...], filename: str) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


async def _products(oc: OrgCtx) -> dict[int, Product]:
    rows = (await oc.db.execute(select(Product).where(Product.org_id == oc.org.id))).scalars()
    return {p.id: p for p in rows}


def _runtime_pause(oc: OrgCtx) -> str | None:
    gate = getattr(oc.ctx.runtime, "gate", None)
    return gate.paused(oc.org.id) if gate is not None else None


@router.get("/v1/plans", summary="List the plans")
async def list_plans(ctx: AuthCtx) -> dict[str, Any]:
    """The plans and their terms (allowances, blocks, pooling period)."""
    return ok(plans=[plans.plan_json(p) for p in await plans.list_plans(ctx.db)])


@router.get("/v1/orgs/{org}/usage", summary="An organization's usage against its plan")
async def org_usage(request: Request,
                    oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))) -> dict[str, Any]:
    """Usage in `period` (YYYY-MM, default this month): totals, allowances, per product."""
    db = oc.db
    month = usage.parse_period(request.query_params.get("period"), clock.now().date())
    scope = await usage.scope_of(db, oc.org)
    plan = await plans.effective_plan(db, oc.org.id)
    start, end = _month_bounds(month)
    month_totals = await usage.totals(db, scope, start, end)
    pool_start, pool_end = plan.period_bounds(month)
    pool = (month_totals if plan.period == "month"
            else await usage.totals(db, scope, pool_start, min(pool_end, end)))
    billable = await usage.billable_by_product(db, scope, month)
    per_product = await usage.by_product(db, scope, start, end)
    products = await _products(oc)
    ops = usage.metric_ops(pool, plan)
    devices = sum(billable.values())
    product_rows = []
    for pid, p in sorted(products.items()):
        t = per_product.get(pid, usage.empty_totals())
        product_rows.append({"id": pid, "slug": p.slug, "name": p.name,
                             "billable_devices": billable.get(pid, 0), **t,
                             "cellular_mb": usage.cellular_mb(t["cellular_bytes"])})
    body: dict[str, Any] = {
        "org": {"id": oc.org.id, "slug": oc.org.slug, "name": oc.org.name},
        "period": {"month": month.strftime("%Y-%m"), "start": start.isoformat(),
                   "end": end.isoformat(), "pooling": plan.period,
                   "pool_start": pool_start.isoformat(), "pool_end": pool_end.isoformat()},
        "plan": plans.effective_json(plan),
        "usage": {**month_totals, "billable_devices": devices,
                  "cellular_mb": usage.cellular_mb(month_totals["cellular_bytes"])},
        "pool_usage": {"data_operations": ops, "cellular_bytes": pool["cellular_bytes"],
                       "cellular_mb": usage.cellular_mb(pool["cellular_bytes"])},
        "allowance": _allowance(plan),
        "percent": {"data_operations": _pct(ops, plan.max_data_ops),
                    "cellular_data": _pct(pool["cellular_bytes"], plan.max_cellular_bytes),
                    "devices": _pct(devices, plan.max_devices)},
        "products": product_rows,
    }
    if scope.personal_user_id is not None:
        own = per_product.get(None, usage.empty_totals())
        body["own_devices"] = {"billable_devices": billable.get(None, 0), **own}
    reason = _runtime_pause(oc)
    body["paused"] = reason is not None
    body["pause_reason"] = reason
    return ok(**body)


def _allowance(plan: EffectivePlan) -> dict[str, Any]:
    return {"data_operations": plan.max_data_ops, "cellular_mb": plan.max_cellular_mb,
            "devices": plan.max_devices, "storage_mb": plan.max_storage_mb}


@router.get("/v1/orgs/{org}/usage/devices", summary="Usage per device (JSON or CSV)")
async def org_usage_devices(request: Request,
                            oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))) -> Any:
    """Each device's usage in `period` (YYYY-MM), billable devices included even without
    usage; `format=csv` downloads it; `product` (id or slug) narrows it to one product."""
    db = oc.db
    fmt = _format(request)
    month = usage.parse_period(request.query_params.get("period"), clock.now().date())
    scope = await usage.scope_of(db, oc.org)
    start, end = _month_bounds(month)
    product_id: int | None = None
    key = request.query_params.get("product")
    if key:
        products = await _products(oc)
        match = [p for p in products.values() if str(p.id) == key or p.slug == key.lower()]
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
    if fmt == "csv":
        return _csv(rows, DEVICE_COLUMNS,
                    f"usage-{oc.org.slug}-{month.strftime('%Y-%m')}-devices.csv")
    return ok(period=month.strftime("%Y-%m"), devices=rows)


@router.get("/v1/orgs/{org}/usage/products", summary="Usage per product (JSON or CSV)")
async def org_usage_products(request: Request,
                             oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))) -> Any:
    """Each product's usage and billable devices in `period` (YYYY-MM); `format=csv`."""
    db = oc.db
    fmt = _format(request)
    month = usage.parse_period(request.query_params.get("period"), clock.now().date())
    scope = await usage.scope_of(db, oc.org)
    start, end = _month_bounds(month)
    per_product = await usage.by_product(db, scope, start, end)
    billable = await usage.billable_by_product(db, scope, month)
    rows = []
    for pid, p in sorted((await _products(oc)).items()):
        rows.append({"product_id": pid, "product_slug": p.slug, "product_name": p.name,
                     "billable_devices": billable.get(pid, 0),
                     **per_product.get(pid, usage.empty_totals())})
    if fmt == "csv":
        return _csv(rows, PRODUCT_COLUMNS,
                    f"usage-{oc.org.slug}-{month.strftime('%Y-%m')}-products.csv")
    return ok(period=month.strftime("%Y-%m"), products=rows)


# --- notifications --------------------------------------------------------------------------

@router.get("/v1/orgs/{org}/notifications", summary="Usage notifications")
async def list_notifications(request: Request,
                             oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))
                             ) -> dict[str, Any]:
    """The organization's notifications, newest first (`unread=true`: only unread ones)."""
    unread = request.query_params.get("unread")
    q = select(Notification).where(Notification.org_id == oc.org.id)
    if unread is not None and as_bool(unread, field="unread"):
        q = q.where(Notification.read_at.is_(None))
    rows = (await oc.db.execute(q.order_by(Notification.id.desc()).limit(200))).scalars()
    return ok(notifications=[alerts.notification_json(n) for n in rows])


@router.put("/v1/orgs/{org}/notifications/{notification_id}", summary="Mark a notification read")
async def read_notification(notification_id: str,
                            oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))
                            ) -> dict[str, Any]:
    """Mark the notification read (idempotent)."""
    if not notification_id.isdigit() or int(notification_id) > 2**31 - 1:
        raise NotFound("Notification not found")
    n = (await oc.db.execute(select(Notification).where(
        Notification.id == int(notification_id), Notification.org_id == oc.org.id))
    ).scalar_one_or_none()
    if n is None:
        raise NotFound("Notification not found")
    if n.read_at is None:
        n.read_at = clock.now()
        await oc.db.flush()
    return ok(notification=alerts.notification_json(n))


@router.post("/v1/orgs/{org}/notifications/read", summary="Mark all notifications read")
async def read_all_notifications(oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))
                                 ) -> dict[str, Any]:
    """Mark every unread notification of the organization read."""
    result = await oc.db.execute(update(Notification).where(
        Notification.org_id == oc.org.id, Notification.read_at.is_(None))
        .values(read_at=clock.now()).execution_options(synchronize_session=False))
    return ok(updated=int(result.rowcount))  # type: ignore[attr-defined]


# --- SIMs -----------------------------------------------------------------------------------

async def _sim_action(request: Request, db: Any, iccid: str, device: Device) -> dict[str, Any]:
    body = await read_body(request)
    sim = await sims.apply_action(db, iccid, device, body.get("action"))
    return ok(sim=sim)


@router.put("/v1/products/{product}/sims/{iccid}", summary="Deactivate or reactivate a SIM")
async def product_sim_action(iccid: str, request: Request,
                             pc: ProductCtx = Depends(ProductGuard("sims:update"))
                             ) -> dict[str, Any]:
    """`action`: `deactivate`, `reactivate` or `activate` the SIM of one of the product's
    devices. A device whose SIM is deactivated for a whole month is not billed for it."""
    code = sims.parse_iccid(iccid)
    device = await sims.sim_device(pc.db, code, Device.product_id == pc.product.id)
    return await _sim_action(request, pc.db, code, device)


@router.get("/v1/products/{product}/sims/{iccid}", summary="Get a product SIM")
async def product_sim(iccid: str,
                      pc: ProductCtx = Depends(ProductGuard("devices:get"))) -> dict[str, Any]:
    """The SIM's activation state and its device."""
    code = sims.parse_iccid(iccid)
    device = await sims.sim_device(pc.db, code, Device.product_id == pc.product.id)
    return ok(sim=await sims.sim_json(pc.db, code, device))


def _own(ctx: AuthCtx) -> Any:
    me = ctx.me
    if me.kind != "user" or me.user_id is None:
        raise NotFound("SIM not found")
    return and_(Device.owner_user_id == me.user_id, Device.product_id.is_(None))


@router.put("/v1/sims/{iccid}", summary="Deactivate or reactivate my SIM")
async def user_sim_action(iccid: str, request: Request, ctx: AuthCtx) -> dict[str, Any]:
    """`action` on the SIM of one of the caller's own devices (not in a product)."""
    code = sims.parse_iccid(iccid)
    device = await sims.sim_device(ctx.db, code, _own(ctx))
    return await _sim_action(request, ctx.db, code, device)


@router.get("/v1/sims/{iccid}", summary="Get my SIM")
async def user_sim(iccid: str, ctx: AuthCtx) -> dict[str, Any]:
    """The SIM's activation state and its device."""
    code = sims.parse_iccid(iccid)
    device = await sims.sim_device(ctx.db, code, _own(ctx))
    return ok(sim=await sims.sim_json(ctx.db, code, device))
