"""Firmware delivery routes: the short-lived download an MQTT device fetches its update from
(authenticated by the link's token, not a user: see :mod:`corral.firmware.links`), and the
per-device update states."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from sqlalchemy.ext.asyncio import AsyncSession

from corral.db.session import TransactionRoute, get_db
from corral.devices.models import Device
from corral.firmware import links, updates
from corral.firmware.models import OPEN_STATES, DeviceBinary, DeviceUpdate, ProductFirmware
from corral.firmware.schemas import DeviceUpdatesAnswer
from corral.firmware.storage import blob_path
from corral.kit.errors import NotFound, Unauthorized
from corral.kit.responses import answers
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["firmware"], route_class=TransactionRoute)


@router.get("/v1/firmware/downloads/{token}", response_class=FileResponse,
            summary="Download a firmware update (device link)", responses={
                200: {"description": "The binary", "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                206: {"description": "A range of the binary", "content": {
                    "application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}}},
                **answers(None, 401, 416)})
async def download_update(token: str, request: Request,
                          db: AsyncSession = Depends(get_db)) -> FileResponse:
    """The binary of an update offered on ``devices/{id}/ota/offer``; the token in the path
    is the credential (it names one device and one update, and expires): no user, no
    tenant. HTTP Range is honoured, so an interrupted download resumes."""
    settings = request.app.state.settings
    grant = links.check_token(settings, token)
    if grant is None:
        raise Unauthorized("The download link is invalid or has expired", code="invalid_token")
    u = await db.get(DeviceUpdate, grant.update_id)
    # a binary flashed to the device is named by firmware id 0 in the link
    if u is None or u.device_id != grant.device_id or u.state not in OPEN_STATES \
            or (u.firmware_id or 0) != grant.firmware_id:
        raise NotFound("This update is no longer offered", code="update_not_found")
    blob: ProductFirmware | DeviceBinary | None = (
        await db.get(ProductFirmware, u.firmware_id) if u.firmware_id is not None
        else await db.get(DeviceBinary, u.binary_id) if u.binary_id is not None else None)
    path = blob_path(settings, blob.sha256) if blob is not None else None
    if blob is None or path is None or not path.is_file():
        raise NotFound("The firmware binary is missing", code="binary_missing")
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"firmware-{u.target_version}.bin",
                        headers={"X-Firmware-SHA256": blob.sha256, "Cache-Control": "no-store"})


@router.get("/v1/products/{product}/devices/{device_id}/updates",
            summary="A device's firmware updates", responses=answers(DeviceUpdatesAnswer))
async def device_updates(device_id: str, pc: ProductCtx = Depends(ProductGuard("firmware:get"))
                         ) -> dict[str, Any]:
    """Newest first: state (pending, sending, deferred, applied, failed, cancelled), reason,
    attempts, bytes sent, timestamps."""
    device = await pc.db.get(Device, device_id.lower())
    if device is None or device.product_id != pc.product.id:
        raise NotFound("Device not found", code="not_found")
    rows = await updates.device_updates(pc.db, device.id, limit=50)
    return {"ok": True, "device_id": device.id, "firmware_version": device.firmware_version,
            "firmware_updates_enabled": device.firmware_updates_enabled,
            "updates": [updates.update_json(u) for u in rows]}
