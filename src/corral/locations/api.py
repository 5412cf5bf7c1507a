"""/v1 location routes (Particle's "query location" shapes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from corral.db.session import TransactionRoute
from corral.devices.access import is_device_id
from corral.devices.models import Device
from corral.kit.body import query
from corral.kit.errors import BadRequest, NotFound
from corral.kit.responses import answers
from corral.locations import service
from corral.locations.schemas import LocationsAnswer, LocationsQuery, TrackAnswer, TrackQuery
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["locations"], route_class=TransactionRoute)


def _window(q: TrackQuery) -> Any:
    try:
        return service.parse_date_range(q.date_range)
    except ValueError as exc:
        raise BadRequest(f"date_range: {exc}", code="invalid_date_range") from None


@router.get("/v1/products/{product}/locations", summary="Each device's last stored location",
            responses=answers(LocationsAnswer))
async def list_locations(
    pc: ProductCtx = Depends(ProductGuard("locations:get")),
    q: LocationsQuery = query(LocationsQuery),
) -> dict[str, Any]:
    """Newest point per device (`page`, `per_page` up to 100, `device_id`, `date_range`=
    `<ISO start>,<ISO end>`). Points come from `loc` events when the product's
    `settings.location.opt_in` is on."""
    page, per_page = q.page, q.per_page
    rows, total = await service.latest_per_device(
        pc.db, pc.product.id, page=page, per_page=per_page, device_id=q.device_id,
        window=_window(q))
    return {"locations": [service.point_json(p, d) for p, d in rows],
            "meta": {"page": page, "per_page": per_page,
                     "total_pages": max(1, -(-total // per_page)), "total": total}}


@router.get("/v1/products/{product}/locations/{device_id}", summary="A device's location track",
            responses=answers(TrackAnswer))
async def device_locations(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("locations:get")),
    q: TrackQuery = query(TrackQuery),
) -> dict[str, Any]:
    """The device's points in time order as a GeoJSON LineString (`date_range` optional;
    at most 10,000 points)."""
    if not is_device_id(device_id):
        raise NotFound("Device not found")
    window = _window(q)
    device = await pc.db.get(Device, device_id.lower())
    points = await service.history(pc.db, pc.product.id, device_id, window)
    if not points and (device is None or device.product_id != pc.product.id):
        raise NotFound("Device not found")
    return {"location": service.track_json(device_id, points, device), "meta": {}}
