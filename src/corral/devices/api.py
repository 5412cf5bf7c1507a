"""/v1 device routes: product inventory and import, device groups, a user's own devices."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from corral.auth.deps import AuthCtx
from corral.devices import groups as group_rules
from corral.devices import service  # also registers the product-delete check
from corral.devices.access import DeviceCtx, DeviceGuard, product_device
from corral.devices.importer import import_devices, read_import_request
from corral.kit.body import as_bool, read_body
from corral.kit.responses import ok
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["devices"])


# --- product devices -------------------------------------------------------------------------

@router.post("/v1/products/{product}/devices", summary="Import devices into a product")
async def import_product_devices(
    request: Request, pc: ProductCtx = Depends(ProductGuard("devices:import")),
) -> dict[str, Any]:
    """Import (or approve) device IDs: `id`, a list `ids`, or a multipart `file` (.txt, one ID per line)."""
    ctx = pc.ctx
    wanted = await read_import_request(request, ctx.settings)
    result = await import_devices(pc.db, actor=ctx.me, ip=ctx.ip, product=pc.product,
                                  request=wanted)
    return result.json()


@router.get("/v1/products/{product}/devices", summary="List a product's devices")
async def list_product_devices(
    request: Request, pc: ProductCtx = Depends(ProductGuard("devices:list")),
) -> dict[str, Any]:
    """Paged (`page`, `per_page`/`perPage`), filtered and sorted (`sortAttr`, `sortDir`) device list."""
    q = service.parse_device_query(request.query_params)
    return (await service.list_product_devices(pc.db, pc.product, q)).json()


@router.put("/v1/products/{product}/devices", summary="Change many product devices at once")
async def batch_update_product_devices(
    request: Request, pc: ProductCtx = Depends(ProductGuard("devices:update")),
) -> dict[str, Any]:
    """`{"action":"groups","devices":[ids],"metadata":{"add":[...],"remove":[...]}}`."""
    await service.batch_update(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                               body=await read_body(request))
    return ok()


@router.get("/v1/products/{product}/devices/{device_id}", summary="Get a product device")
async def get_product_device(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices:get")),
) -> dict[str, Any]:
    """A device of the product, with its groups."""
    return await service.device_view(pc.db, await product_device(pc, device_id))


@router.put("/v1/products/{product}/devices/{device_id}", summary="Update a product device")
async def update_product_device(
    device_id: str, request: Request, pc: ProductCtx = Depends(ProductGuard("devices:update")),
) -> dict[str, Any]:
    """Change `name`, `notes`, `development`, `groups`, `firmware_updates_forced`, lock firmware (`desired_firmware_version`, `null` unlocks; `flash` updates now), or approve (`quarantined: false`)."""
    device = await product_device(pc, device_id)
    return await service.update_device(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, device=device,
                                       body=await read_body(request), product=pc.product,
                                       role=pc.role, product_route=True)


@router.delete("/v1/products/{product}/devices/{device_id}", status_code=204,
               summary="Remove or deny a product device")
async def remove_product_device(
    device_id: str, request: Request, pc: ProductCtx = Depends(ProductGuard("devices:remove")),
) -> Response:
    """Remove the device from the product, or with `deny=true` deny it (it is then refused)."""
    device = await product_device(pc, device_id)
    body = await read_body(request)
    deny = as_bool(body.get("deny", request.query_params.get("deny")), field="deny")
    await service.remove_product_device(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip,
                                        product=pc.product, device=device, deny=deny)
    return Response(status_code=204)


# --- device groups ---------------------------------------------------------------------------

@router.get("/v1/products/{product}/groups", summary="List device groups")
async def list_groups(
    request: Request, pc: ProductCtx = Depends(ProductGuard("groups:list")),
) -> dict[str, Any]:
    """The product's device groups (`name` filters by partial name)."""
    rows = await group_rules.list_groups(pc.db, pc.product, request.query_params.get("name"))
    return {"groups": [group_rules.group_json(g, n) for g, n in rows]}


@router.post("/v1/products/{product}/groups", status_code=201, summary="Create a device group")
async def create_group(
    request: Request, pc: ProductCtx = Depends(ProductGuard("groups:create")),
) -> dict[str, Any]:
    """Create a group: `name` (lowercase letters, digits, `-`, `_`), `color` (`#rrggbb`), `description`."""
    g = await group_rules.create_group(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                       body=await read_body(request))
    return {"group": group_rules.group_json(g, 0)}


@router.get("/v1/products/{product}/groups/{name}", summary="Get a device group")
async def get_group(
    name: str, pc: ProductCtx = Depends(ProductGuard("groups:get")),
) -> dict[str, Any]:
    """One group with its device count."""
    g, n = await group_rules.group_with_count(pc.db, pc.product, name)
    return {"group": group_rules.group_json(g, n)}


@router.put("/v1/products/{product}/groups/{name}", summary="Update a device group")
async def update_group(
    name: str, request: Request, pc: ProductCtx = Depends(ProductGuard("groups:update")),
) -> dict[str, Any]:
    """Rename, recolor or describe a group (at least one of `name`, `color`, `description`)."""
    g, n = await group_rules.update_group(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip,
                                          product=pc.product, name=name,
                                          body=await read_body(request))
    return {"group": group_rules.group_json(g, n)}


@router.delete("/v1/products/{product}/groups/{name}", status_code=204,
               summary="Delete a device group")
async def delete_group(
    name: str, pc: ProductCtx = Depends(ProductGuard("groups:remove")),
) -> Response:
    """Delete the group; its devices leave it."""
    await group_rules.delete_group(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                   name=name)
    return Response(status_code=204)


# --- a user's own devices ----------------------------------------------------------------------

@router.get("/v1/devices", summary="List my devices")
async def list_my_devices(ctx: AuthCtx) -> list[dict[str, Any]]:
    """The caller's own devices (a customer: the devices claimed to them), last handshake first."""
    return await service.my_devices(ctx.db, ctx.me)


@router.get("/v1/devices/{device_id}", summary="Get a device")
async def get_device(dc: DeviceCtx = Depends(DeviceGuard("devices:get"))) -> dict[str, Any]:
    """A device by ID or by the name of one of the caller's devices."""
    return await service.device_view(dc.db, dc.device)


@router.put("/v1/devices/{device_id}", summary="Rename a device or change its notes")
async def update_device(
    request: Request, dc: DeviceCtx = Depends(DeviceGuard("devices:update")),
) -> dict[str, Any]:
    """Change `name` (unique among the owner's devices), `notes` or `firmware_updates_forced`."""
    return await service.update_device(dc.db, actor=dc.ctx.me, ip=dc.ctx.ip, device=dc.device,
                                       body=await read_body(request), product=dc.product,
                                       role=dc.role)
