"""/v1 usage, plans, usage notifications and SIM activation routes.

Usage and notifications are billing information: only an organization's Administrators and
Owners see them (``orgs.billing:get``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select, update

from corral.auth.deps import AuthCtx
from corral.db.session import TransactionRoute
from corral.kit import clock
from corral.kit.body import body, query, uploaded_file
from corral.kit.errors import NotFound
from corral.kit.ids import path_id
from corral.kit.responses import answers, ok, paging
from corral.metering import alerts, plans, reports, sims, usage
from corral.metering.models import Notification
from corral.metering.schemas import (
    FleetDataUsage,
    NotificationAnswer,
    NotificationsAnswer,
    NotificationsQuery,
    PlansAnswer,
    SimAction,
    SimAnswer,
    SimDataUsage,
    SimImport,
    SimImportAnswer,
    SimsAnswer,
    SimsQuery,
    UpdatedAnswer,
    UsageAnswer,
    UsageExport,
    UsageQuery,
    UsageRowsAnswer,
)
from corral.orgs.access import OrgCtx, OrgGuard
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["usage"], route_class=TransactionRoute)
CSV_ANSWERS: dict[int | str, dict[str, Any]] = {200: {
    "model": UsageRowsAnswer, "description": "The rows (`format=csv`: as CSV)",
    "content": {"text/csv": {"schema": {"type": "string"}}}}}


@router.get("/v1/plans", summary="List the plans", responses=answers(PlansAnswer))
async def list_plans(ctx: AuthCtx) -> dict[str, Any]:
    """The plans and their terms (allowances, blocks, pooling period)."""
    return ok(plans=[plans.plan_json(p) for p in await plans.list_plans(ctx.db)])


def _runtime_pause(oc: OrgCtx) -> str | None:
    return reports.pause_reason(oc.ctx.runtime, oc.org.id)


@router.get("/v1/orgs/{org}/usage", summary="An organization's usage against its plan",
            responses=answers(UsageAnswer))
async def org_usage(oc: OrgCtx = Depends(OrgGuard("orgs.billing:get")),
                    q: UsageQuery = query(UsageQuery)) -> dict[str, Any]:
    """Usage in `period` (YYYY-MM, default this month): totals, allowances, per product."""
    month = usage.parse_period(q.period, clock.now().date())
    return ok(**await reports.org_usage(oc.db, oc.org, month, _runtime_pause(oc)))


@router.get("/v1/orgs/{org}/usage/devices", summary="Usage per device (JSON or CSV)",
            responses=CSV_ANSWERS)
async def org_usage_devices(oc: OrgCtx = Depends(OrgGuard("orgs.billing:get")),
                            q: UsageExport = query(UsageExport)) -> Any:
    """Each device's usage in `period` (YYYY-MM), billable devices included even without
    usage; `format=csv` downloads it; `product` (id or slug) narrows it to one product."""
    fmt = q.format
    month = usage.parse_period(q.period, clock.now().date())
    rows = await reports.device_rows(oc.db, oc.org, month, q.product)
    if fmt == "csv":
        return reports.csv_download(rows, reports.DEVICE_COLUMNS,
                                    reports.filename(oc.org, month, "devices"))
    return ok(period=month.strftime("%Y-%m"), devices=rows)


@router.get("/v1/orgs/{org}/usage/products", summary="Usage per product (JSON or CSV)",
            responses=CSV_ANSWERS)
async def org_usage_products(oc: OrgCtx = Depends(OrgGuard("orgs.billing:get")),
                             q: UsageExport = query(UsageExport)) -> Any:
    """Each product's usage and billable devices in `period` (YYYY-MM); `format=csv`."""
    fmt = q.format
    month = usage.parse_period(q.period, clock.now().date())
    rows = await reports.product_rows(oc.db, oc.org, month)
    if fmt == "csv":
        return reports.csv_download(rows, reports.PRODUCT_COLUMNS,
                                    reports.filename(oc.org, month, "products"))
    return ok(period=month.strftime("%Y-%m"), products=rows)


# --- notifications --------------------------------------------------------------------------

@router.get("/v1/orgs/{org}/notifications", summary="Usage notifications",
            responses=answers(NotificationsAnswer))
async def list_notifications(oc: OrgCtx = Depends(OrgGuard("orgs.billing:get")),
                             q: NotificationsQuery = query(NotificationsQuery)
                             ) -> dict[str, Any]:
    """The organization's notifications, newest first (`unread=true`: only unread ones)."""
    sel = select(Notification).where(Notification.org_id == oc.org.id)
    if q.unread:
        sel = sel.where(Notification.read_at.is_(None))
    rows = (await oc.db.execute(sel.order_by(Notification.id.desc()).limit(200))).scalars()
    return ok(notifications=[alerts.notification_json(n) for n in rows])


@router.put("/v1/orgs/{org}/notifications/{notification_id}", summary="Mark a notification read",
            responses=answers(NotificationAnswer))
async def read_notification(notification_id: str,
                            oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))
                            ) -> dict[str, Any]:
    """Mark the notification read (idempotent)."""
    if (nid := path_id(notification_id)) is None:
        raise NotFound("Notification not found")
    n = (await oc.db.execute(select(Notification).where(
        Notification.id == nid, Notification.org_id == oc.org.id))
    ).scalar_one_or_none()
    if n is None:
        raise NotFound("Notification not found")
    if n.read_at is None:
        n.read_at = clock.now()
        await oc.db.flush()
    return ok(notification=alerts.notification_json(n))


@router.post("/v1/orgs/{org}/notifications/read", summary="Mark all notifications read",
             responses=answers(UpdatedAnswer))
async def read_all_notifications(oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))
                                 ) -> dict[str, Any]:
    """Mark every unread notification of the organization read."""
    result = await oc.db.execute(update(Notification).where(
        Notification.org_id == oc.org.id, Notification.read_at.is_(None))
        .values(read_at=clock.now()).execution_options(synchronize_session=False))
    return ok(updated=int(result.rowcount))  # type: ignore[attr-defined]


# --- SIMs -----------------------------------------------------------------------------------
# a product's SIMs: the product's team (reading), Developers and up (import, actions,
# release); /v1/sims: the caller's own SIMs (of devices in no product)

def _sims_answer(rows: list[dict[str, Any]], total: int, q: SimsQuery) -> dict[str, Any]:
    return ok(sims=rows, meta=paging(q.page, q.per_page, total))


@router.get("/v1/products/{product}/sims", summary="List a product's SIMs",
            responses=answers(SimsAnswer))
async def product_sims(pc: ProductCtx = Depends(ProductGuard("devices:list")),
                       q: SimsQuery = query(SimsQuery)) -> dict[str, Any]:
    """The product's SIM cards in ICCID order (`page`, `per_page` up to 100); `iccid` (a
    prefix), `deviceId` and `deviceName` (the device that last reported it) narrow it."""
    rows, total = await sims.listing(pc.db, sims.product_scope(pc.product.id), page=q.page,
                                     per_page=q.per_page, iccid=q.iccid,
                                     device_id=q.device_id, device_name=q.device_name)
    return _sims_answer(rows, total, q)


@router.post("/v1/products/{product}/sims", summary="Import SIMs into a product",
             responses=answers(SimImportAnswer, 413))
async def import_product_sims(request: Request,
                              pc: ProductCtx = Depends(ProductGuard("sims:update")),
                              req: SimImport = body(SimImport, files=True)) -> dict[str, Any]:
    """`sims`: ICCIDs (a list or a comma-separated string), or a multipart `file` with one
    ICCID per line (at most 1,000). Answers which were `imported`, which the product
    already had (`existing`), which another product or account holds (`taken`) and which
    are not ICCIDs (`invalid`). Imported SIMs are active."""
    upload = await uploaded_file(request, req.file, request.app.state.settings.max_import_bytes)
    result = await sims.import_sims(pc.db, pc.product.id, sims.read_entries(req.sims, upload))
    return ok(**result)


@router.get("/v1/products/{product}/sims/data_usage", summary="A product's cellular data",
            responses=answers(FleetDataUsage))
async def product_sims_data_usage(pc: ProductCtx = Depends(ProductGuard("usage:get"))
                                  ) -> dict[str, Any]:
    """Cellular data of the product's SIMs this month, per day (MB, 1 MB = 1,000,000
    bytes), and how many of its SIMs are active."""
    return await sims.fleet_data_usage(pc.db, pc.product.id)


@router.get("/v1/products/{product}/sims/{iccid}", summary="Get a product SIM",
            responses=answers(SimAnswer))
async def product_sim(iccid: str,
                      pc: ProductCtx = Depends(ProductGuard("devices:get"))) -> dict[str, Any]:
    """The SIM's activation state and the device that last reported it."""
    sim = await sims.find(pc.db, iccid, sims.product_scope(pc.product.id))
    return ok(sim=await sims.one_json(pc.db, sim))


@router.put("/v1/products/{product}/sims/{iccid}", summary="Deactivate or reactivate a SIM",
            responses=answers(SimAnswer, 409))
async def product_sim_action(iccid: str,
                             pc: ProductCtx = Depends(ProductGuard("sims:update")),
                             req: SimAction = body(SimAction)) -> dict[str, Any]:
    """`action`: `deactivate`, `reactivate` or `activate` one of the product's SIMs. A
    deactivated SIM's device is disconnected and refused until the SIM is reactivated; a
    device whose SIM is deactivated for a whole month is not billed for it."""
    sim = await sims.find(pc.db, iccid, sims.product_scope(pc.product.id))
    return ok(sim=await sims.apply_action(pc.db, sim, req.action))


@router.delete("/v1/products/{product}/sims/{iccid}", summary="Release a product SIM",
               status_code=204, responses=answers(None, 404))
async def release_product_sim(iccid: str,
                              pc: ProductCtx = Depends(ProductGuard("sims:update"))
                              ) -> Response:
    """Release the SIM from the product (another product or account may then import it)."""
    await sims.release(pc.db, await sims.find(pc.db, iccid, sims.product_scope(pc.product.id)))
    return Response(status_code=204)


@router.get("/v1/products/{product}/sims/{iccid}/data_usage",
            summary="A product SIM's cellular data", responses=answers(SimDataUsage))
async def product_sim_data_usage(iccid: str,
                                 pc: ProductCtx = Depends(ProductGuard("usage:get"))
                                 ) -> dict[str, Any]:
    """The SIM's cellular data this month, per day (MB)."""
    sim = await sims.find(pc.db, iccid, sims.product_scope(pc.product.id))
    return await sims.sim_data_usage(pc.db, sim)


def _mine(ctx: AuthCtx) -> Any:
    me = ctx.me
    if me.kind != "user" or me.user_id is None:
        raise NotFound("SIM not found")
    return sims.user_scope(me.user_id)


@router.get("/v1/sims", summary="List my SIMs", responses=answers(SimsAnswer))
async def user_sims(ctx: AuthCtx, q: SimsQuery = query(SimsQuery)) -> dict[str, Any]:
    """The SIM cards of the caller's own devices (in no product), in ICCID order."""
    me = ctx.me
    if me.kind != "user" or me.user_id is None:
        return _sims_answer([], 0, q)
    rows, total = await sims.listing(ctx.db, sims.user_scope(me.user_id), page=q.page,
                                     per_page=q.per_page, iccid=q.iccid,
                                     device_id=q.device_id, device_name=q.device_name)
    return _sims_answer(rows, total, q)


@router.get("/v1/sims/{iccid}", summary="Get my SIM", responses=answers(SimAnswer))
async def user_sim(iccid: str, ctx: AuthCtx) -> dict[str, Any]:
    """The SIM's activation state and the device that last reported it."""
    sim = await sims.find(ctx.db, iccid, _mine(ctx))
    return ok(sim=await sims.one_json(ctx.db, sim))


@router.head("/v1/sims/{iccid}", summary="Check my SIM", status_code=200,
             responses=answers(None, 404))
async def check_user_sim(iccid: str, ctx: AuthCtx) -> Response:
    """200 when the SIM is one of the caller's (particle-api-js `checkSIM`), else 404."""
    await sims.find(ctx.db, iccid, _mine(ctx))
    return Response(status_code=200)


@router.put("/v1/sims/{iccid}", summary="Deactivate or reactivate my SIM",
            responses=answers(SimAnswer, 409))
async def user_sim_action(iccid: str, ctx: AuthCtx,
                          req: SimAction = body(SimAction)) -> dict[str, Any]:
    """`action` on one of the caller's own SIMs."""
    sim = await sims.find(ctx.db, iccid, _mine(ctx))
    return ok(sim=await sims.apply_action(ctx.db, sim, req.action))


@router.delete("/v1/sims/{iccid}", summary="Release my SIM", status_code=204,
               responses=answers(None, 404))
async def release_user_sim(iccid: str, ctx: AuthCtx) -> Response:
    """Release the SIM from the caller's account (particle-api-js `removeSIM`)."""
    await sims.release(ctx.db, await sims.find(ctx.db, iccid, _mine(ctx)))
    return Response(status_code=204)


@router.get("/v1/sims/{iccid}/data_usage", summary="My SIM's cellular data",
            responses=answers(SimDataUsage))
async def user_sim_data_usage(iccid: str, ctx: AuthCtx) -> dict[str, Any]:
    """The SIM's cellular data this month, per day (MB; particle-api-js `getSIMDataUsage`)."""
    return await sims.sim_data_usage(ctx.db, await sims.find(ctx.db, iccid, _mine(ctx)))
