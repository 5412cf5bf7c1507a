"""/v1 diagnostics (device vitals) routes, in Particle's shapes, for a device and for a
product's device. Reading vitals or asking for fresh ones is never a data operation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from corral.auth.deps import Ctx
from corral.db.session import TransactionRoute
from corral.devices.access import DeviceCtx, DeviceGuard, product_device
from corral.devices.models import Device
from corral.fleet import vitals
from corral.fleet.schemas import (
    DiagnosticsHistory,
    DiagnosticsMetadata,
    DiagnosticsRange,
    DiagnosticsSummary,
    DiagnosticsSummaryQuery,
    LastDiagnostics,
)
from corral.kit.body import query
from corral.kit.errors import BadRequest, NotFound
from corral.kit.responses import OkAnswer, answers
from corral.products.access import ProductCtx, ProductGuard
from corral.sessions import contract

router = APIRouter(tags=["diagnostics"], route_class=TransactionRoute)

HISTORY = answers(DiagnosticsHistory)
HISTORY[200]["content"] = {"text/csv": {"schema": {"type": "string"}}}  # Accept: text/csv

GET = "devices.diagnostics:get"
UPDATE = "devices.diagnostics:update"


class BadDates(BadRequest):
    """Particle's diagnostics date error: ``{"error": "bad_request", "description": ...}``
    (corral's ``ok`` and ``error_description`` besides)."""

    def body(self) -> dict[str, Any]:
        return {**super().body(), "description": self.description}


def _range(q: DiagnosticsRange) -> Any:
    try:
        return vitals.parse_range(q.start_date, q.end_date)
    except ValueError:
        raise BadDates(vitals.DATE_ERROR, code="bad_request") from None


async def ask(ctx: Ctx, device: Device) -> None:
    """Ask a connected device for fresh vitals (404 ``device_offline`` otherwise); they
    arrive as its ``spark/device/diagnostics/update`` event (also the console's button)."""
    if not device.online:
        raise NotFound("Device is not connected", code="device_offline")
    await ctx.runtime.bus.publish(contract.control_subject(device.id), {"op": "diagnostics"})


async def _ask(ctx: Ctx, device: Device) -> JSONResponse:
    await ask(ctx, device)
    return JSONResponse({"ok": True}, status_code=202)


async def _last(ctx: Ctx, device: Device) -> dict[str, Any]:
    row = await vitals.last(ctx.db, device.id)
    if row is None:
        raise NotFound("No diagnostics have been received from this device",
                       code="not_found")
    return {"diagnostics": vitals.as_json(row)}


async def _history(ctx: Ctx, device: Device, request: Request, q: DiagnosticsRange
                   ) -> Response:
    start, end = _range(q)
    rows = await vitals.history(ctx.db, device.id, start, end)
    if "text/csv" in request.headers.get("accept", ""):
        return Response(vitals.as_csv(rows), media_type="text/csv")
    return JSONResponse({"diagnostics": [vitals.as_json(r) for r in rows]})


async def _summary(ctx: Ctx, device: Device, q: DiagnosticsSummaryQuery) -> dict[str, Any]:
    start, end = _range(q)
    limit = q.limit or vitals.SUMMARY_LIMIT
    rows = await vitals.history(ctx.db, device.id, start, end)
    return vitals.summary(device.id, rows, start, end, limit)


# --- a device (owner, or a member of its product) -------------------------------------------

@router.post("/v1/diagnostics/{device_id}/update", status_code=202,
             summary="Ask a device for fresh vitals",
             responses=answers(OkAnswer, status=202))
async def refresh(dc: DeviceCtx = Depends(DeviceGuard(UPDATE))) -> JSONResponse:
    """The device is asked to send its vitals now (202); they arrive as the event
    `spark/device/diagnostics/update`. 404 when the device is not connected."""
    return await _ask(dc.ctx, dc.device)


@router.get("/v1/diagnostics/{device_id}/last", summary="A device's last vitals",
            responses=answers(LastDiagnostics))
async def last(dc: DeviceCtx = Depends(DeviceGuard(GET))) -> dict[str, Any]:
    """`{"diagnostics": {"updated_at", "deviceID", "payload"}}`."""
    return await _last(dc.ctx, dc.device)


@router.get("/v1/diagnostics/{device_id}/metadata", summary="What each vital means",
            responses=answers(DiagnosticsMetadata))
async def metadata(dc: DeviceCtx = Depends(DeviceGuard(GET))) -> dict[str, Any]:
    """`{"diagnostics_metadata": {path: {title, type, units, ranges, values, messages,
    priority, describes}}}`."""
    return {"diagnostics_metadata": vitals.metadata()}


@router.get("/v1/diagnostics/{device_id}/summary", summary="A device's vitals, bucketed",
            responses=answers(DiagnosticsSummary))
async def summary(dc: DeviceCtx = Depends(DeviceGuard(GET)),
                  q: DiagnosticsSummaryQuery = query(DiagnosticsSummaryQuery)) -> dict[str, Any]:
    """`start_date`, `end_date` (ISO 8601, at most 30 days), `limit` buckets (30)."""
    return await _summary(dc.ctx, dc.device, q)


@router.get("/v1/diagnostics/{device_id}", summary="A device's vitals history",
            responses=HISTORY)
async def history(request: Request, dc: DeviceCtx = Depends(DeviceGuard(GET)),
                  q: DiagnosticsRange = query(DiagnosticsRange)) -> Response:
    """`start_date`, `end_date` (ISO 8601, at most 30 days; default the last 30 days);
    `Accept: text/csv` answers CSV."""
    return await _history(dc.ctx, dc.device, request, q)


# --- a product's device ---------------------------------------------------------------------

@router.post("/v1/products/{product}/diagnostics/{device_id}/update", status_code=202,
             summary="Ask a product device for fresh vitals",
             responses=answers(OkAnswer, status=202))
async def product_refresh(device_id: str,
                          pc: ProductCtx = Depends(ProductGuard(UPDATE))) -> JSONResponse:
    """As `POST /v1/diagnostics/:id/update`, for a device of the product."""
    return await _ask(pc.ctx, await product_device(pc, device_id))


@router.get("/v1/products/{product}/diagnostics/{device_id}/last",
            summary="A product device's last vitals",
            responses=answers(LastDiagnostics))
async def product_last(device_id: str,
                       pc: ProductCtx = Depends(ProductGuard(GET))) -> dict[str, Any]:
    """As `GET /v1/diagnostics/:id/last`."""
    return await _last(pc.ctx, await product_device(pc, device_id))


@router.get("/v1/products/{product}/diagnostics/{device_id}/metadata",
            summary="What each vital means (product)",
            responses=answers(DiagnosticsMetadata))
async def product_metadata(device_id: str,
                           pc: ProductCtx = Depends(ProductGuard(GET))) -> dict[str, Any]:
    """As `GET /v1/diagnostics/:id/metadata`."""
    await product_device(pc, device_id)
    return {"diagnostics_metadata": vitals.metadata()}


@router.get("/v1/products/{product}/diagnostics/{device_id}/summary",
            summary="A product device's vitals, bucketed",
            responses=answers(DiagnosticsSummary))
async def product_summary(device_id: str, pc: ProductCtx = Depends(ProductGuard(GET)),
                          q: DiagnosticsSummaryQuery = query(DiagnosticsSummaryQuery)
                          ) -> dict[str, Any]:
    """As `GET /v1/diagnostics/:id/summary`."""
    return await _summary(pc.ctx, await product_device(pc, device_id), q)


@router.get("/v1/products/{product}/diagnostics/{device_id}",
            summary="A product device's vitals history",
            responses=HISTORY)
async def product_history(device_id: str, request: Request,
                          pc: ProductCtx = Depends(ProductGuard(GET)),
                          q: DiagnosticsRange = query(DiagnosticsRange)) -> Response:
    """As `GET /v1/diagnostics/:id`."""
    return await _history(pc.ctx, await product_device(pc, device_id), request, q)
