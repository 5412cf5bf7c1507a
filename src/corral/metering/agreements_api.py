"""Particle's billing routes: service agreements, usage reports, notifications (§1.15).

The organization routes are billing information (``orgs.billing:get``: Administrators and
Owners); the ``/v1/user`` routes answer for the caller's personal organization (their own
devices and personal products). See :mod:`corral.metering.agreements`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from corral.auth.deps import AuthCtx
from corral.db.session import TransactionRoute, after_commit
from corral.kit.body import body
from corral.kit.errors import NotFound
from corral.kit.ids import path_id
from corral.kit.responses import answers
from corral.metering import agreements, reports
from corral.metering.schemas import (
    ResourceAnswer,
    ResourcesAnswer,
    UsageReportCreate,
)
from corral.orgs.access import OrgCtx, OrgGuard
from corral.orgs.models import Organization

router = APIRouter(tags=["usage"], route_class=TransactionRoute)
CSV: dict[int | str, dict[str, Any]] = {200: {
    "description": "The report as CSV", "content": {"text/csv": {"schema": {"type": "string"}}}},
    404: {"description": "Not found"}, 409: {"description": "The report is not available yet"}}


async def _mine(ctx: AuthCtx) -> Organization:
    me = ctx.me
    if me.kind != "user" or me.user_id is None:
        raise NotFound("Service agreement not found")
    return await agreements.personal_org(ctx.db, me.user_id)


def _paused(request: Request, org: Organization) -> bool:
    return reports.pause_reason(request.app.state.runtime, org.id) is not None


async def _agreements(request: Request, db: Any, org: Organization) -> dict[str, Any]:
    return {"data": [await agreements.agreement_json(db, org,
                                                     paused=_paused(request, org))]}


@router.get("/v1/user/service_agreements", summary="My service agreements",
            responses=answers(ResourcesAnswer, 404))
async def user_agreements(request: Request, ctx: AuthCtx) -> dict[str, Any]:
    """The caller's own service agreement: the plan of their personal organization, its
    billing period, usage summary and pricing terms."""
    return await _agreements(request, ctx.db, await _mine(ctx))


@router.get("/v1/orgs/{org}/service_agreements", summary="An organization's service agreements",
            responses=answers(ResourcesAnswer))
async def org_agreements(request: Request, oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))
                         ) -> dict[str, Any]:
    """The organization's service agreement (its plan), with the current billing period's
    usage summary (`connectivity`: all, wifi, cellular, asset_tracker) and pricing terms."""
    return await _agreements(request, oc.db, oc.org)


def _download_url(request: Request, org: Organization, report_id: int, user: bool) -> str:
    base = request.app.state.settings.resolved_public_url()
    if user:
        return f"{base}/v1/user/usage_reports/{report_id}/download"
    return f"{base}/v1/orgs/{org.id}/usage_reports/{report_id}/download"


async def _create(request: Request, ctx: Any, org: Organization, said: str,
                  req: UsageReportCreate) -> dict[str, Any]:
    agreements.check_agreement(org, path_id(said))
    me = ctx.me
    r = await agreements.create_report(
        ctx.db, org, requested_by=me.user_id if me.kind == "user" else None,
        report_type=req.report_type, start=req.date_period_start, end=req.date_period_end,
        devices=req.devices, products=req.products)
    worker = getattr(request.app.state.runtime, "usage_reports", None)
    if worker is not None:
        after_commit(ctx.db, worker.wake)
    return {"data": agreements.report_json(r, None)}


@router.post("/v1/user/service_agreements/{said}/usage_reports",
             summary="Request a usage report", status_code=202,
             responses=answers(ResourceAnswer, 404, status=202))
async def user_create_report(said: str, request: Request, ctx: AuthCtx,
                             req: UsageReportCreate = body(UsageReportCreate)) -> dict[str, Any]:
    """`report_type` `devices` or `products`, `date_period_start`/`date_period_end`
    (YYYY-MM-DD, at most 366 days), optionally `devices` or `products` to narrow it.
    Answers 202 with the pending report; poll `GET /v1/user/usage_reports/:id` until its
    `state` is `available`, then fetch its `download_url`."""
    return await _create(request, ctx, await _mine(ctx), said, req)


@router.post("/v1/orgs/{org}/service_agreements/{said}/usage_reports",
             summary="Request an organization usage report", status_code=202,
             responses=answers(ResourceAnswer, 404, status=202))
async def org_create_report(said: str, request: Request,
                            oc: OrgCtx = Depends(OrgGuard("orgs.billing:get")),
                            req: UsageReportCreate = body(UsageReportCreate)) -> dict[str, Any]:
    """As `POST /v1/user/service_agreements/:id/usage_reports`, for the organization's."""
    return await _create(request, oc.ctx, oc.org, said, req)


async def _report(request: Request, db: Any, org: Organization, report_id: str,
                  user: bool) -> dict[str, Any]:
    r = await agreements.get_report(db, org, path_id(report_id))
    return {"data": agreements.report_json(r, _download_url(request, org, r.id, user))}


@router.get("/v1/user/usage_reports/{report_id}", summary="Poll a usage report",
            responses=answers(ResourceAnswer, 404))
async def user_report(report_id: str, request: Request, ctx: AuthCtx) -> dict[str, Any]:
    """The report's `state` (`pending`, `processing`, `available`, `failed`) and, once
    available, its `download_url`."""
    return await _report(request, ctx.db, await _mine(ctx), report_id, True)


@router.get("/v1/orgs/{org}/usage_reports/{report_id}", summary="Poll an organization usage report",
            responses=answers(ResourceAnswer))
async def org_report(report_id: str, request: Request,
                     oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))) -> dict[str, Any]:
    """As `GET /v1/user/usage_reports/:id`, for the organization's reports."""
    return await _report(request, oc.db, oc.org, report_id, False)


async def _download(db: Any, org: Organization, report_id: str) -> Response:
    r = await agreements.get_report(db, org, path_id(report_id))
    return Response(agreements.report_csv(r), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition":
                             f'attachment; filename="{agreements.report_filename(r)}"'})


@router.get("/v1/user/usage_reports/{report_id}/download", summary="Download a usage report",
            responses=CSV)
async def user_report_download(report_id: str, ctx: AuthCtx) -> Response:
    """The available report as CSV (409 while it is still being built)."""
    return await _download(ctx.db, await _mine(ctx), report_id)


@router.get("/v1/orgs/{org}/usage_reports/{report_id}/download",
            summary="Download an organization usage report", responses=CSV)
async def org_report_download(report_id: str,
                              oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))) -> Response:
    """The available report as CSV (409 while it is still being built)."""
    return await _download(oc.db, oc.org, report_id)


@router.get("/v1/user/service_agreements/{said}/notifications",
            summary="My service agreement's notifications",
            responses=answers(ResourcesAnswer, 404))
async def user_notifications(said: str, ctx: AuthCtx) -> dict[str, Any]:
    """Usage notifications, newest first: `event_name` is
    `<type>:usage_activity:<70|90|100>_percent`, `...:automatic_pause` or
    `...:automatic_unpause`; `details` says which allowance (`metric`) and how much."""
    org = await _mine(ctx)
    agreements.check_agreement(org, path_id(said))
    return {"data": await agreements.notifications(ctx.db, org)}


@router.get("/v1/orgs/{org}/service_agreements/{said}/notifications",
            summary="An organization service agreement's notifications",
            responses=answers(ResourcesAnswer))
async def org_notifications(said: str, oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))
                            ) -> dict[str, Any]:
    """As `GET /v1/user/service_agreements/:id/notifications`, for the organization's."""
    agreements.check_agreement(oc.org, path_id(said))
    return {"data": await agreements.notifications(oc.db, oc.org)}
