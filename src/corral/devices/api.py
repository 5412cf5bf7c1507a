"""/v1 device routes: product inventory and import, device groups, a user's own devices."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from corral.auth.deps import AuthCtx
from corral.db.session import TransactionRoute
from corral.devices import groups as group_rules
from corral.devices import service  # also registers the product-delete check
from corral.devices.access import DeviceCtx, DeviceGuard, product_device
from corral.devices.importer import import_devices, read_import_request
from corral.devices.schemas import (
    BatchChange,
    DenyFlag,
    DeviceChange,
    DeviceChanged,
    DeviceImport,
    DeviceListQuery,
    DeviceObject,
    DevicePageAnswer,
    FlashStarted,
    GroupAnswer,
    GroupChange,
    GroupCreate,
    GroupPreview,
    GroupPreviewAnswer,
    GroupQuery,
    GroupsAnswer,
    ImportAnswer,
    ProductDeviceChange,
)
from corral.firmware import flash
from corral.kit.body import body, documented_body, query
from corral.kit.errors import BadRequest
from corral.kit.responses import OkAnswer, answers, ok
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["devices"], route_class=TransactionRoute)


# --- product devices -------------------------------------------------------------------------

@router.post("/v1/products/{product}/devices", summary="Import devices into a product",
             responses=answers(ImportAnswer),
             dependencies=[Depends(documented_body(DeviceImport))])
async def import_product_devices(
    request: Request, pc: ProductCtx = Depends(ProductGuard("devices:import")),
) -> dict[str, Any]:
    """Import (or approve) device IDs: `id`, a list `ids`, or a multipart `file` (.txt, one ID per line)."""
    ctx = pc.ctx
    wanted = await read_import_request(request, ctx.settings)
    result = await import_devices(pc.db, actor=ctx.me, ip=ctx.ip, product=pc.product,
                                  request=wanted)
    return result.json()


@router.get("/v1/products/{product}/devices", summary="List a product's devices",
            responses=answers(DevicePageAnswer))
async def list_product_devices(
    pc: ProductCtx = Depends(ProductGuard("devices:list")),
    req: DeviceListQuery = query(DeviceListQuery),
) -> dict[str, Any]:
    """Paged (`page`, `per_page`/`perPage`), filtered (`tags=a,b`: devices carrying all of them) and sorted (`sortAttr`, `sortDir`) device list."""
    q = service.parse_device_query(req)
    return (await service.list_product_devices(pc.db, pc.product, q)).json()


@router.put("/v1/products/{product}/devices", summary="Change many product devices at once",
            responses=answers(OkAnswer))
async def batch_update_product_devices(
    pc: ProductCtx = Depends(ProductGuard("devices:update")),
    req: BatchChange = body(BatchChange),
) -> dict[str, Any]:
    """`{"action":"groups"|"tags","devices":[ids],"metadata":{"add":[...],"remove":[...]}}`: every device in the product, else nothing changes."""
    await service.batch_update(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                               req=req)
    return ok()


@router.get("/v1/products/{product}/devices/{device_id}", summary="Get a product device",
            responses=answers(DeviceObject))
async def get_product_device(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices:get")),
) -> dict[str, Any]:
    """A device of the product, with its groups."""
    return await service.device_view(pc.db, await product_device(pc, device_id))


@router.put("/v1/products/{product}/devices/{device_id}", summary="Update or flash a product device",
            responses=answers(DeviceChanged | FlashStarted))
async def update_product_device(
    request: Request, device_id: str,
    pc: ProductCtx = Depends(ProductGuard("devices:update")),
    req: ProductDeviceChange = body(ProductDeviceChange, files=True),
) -> dict[str, Any]:
    """Change `name`, `notes`, `development`, `groups`, `tags`, `firmware_updates_forced`, lock firmware (`desired_firmware_version`, `null` unlocks; `flash` updates now), or approve (`quarantined: false`); or flash a binary (multipart `file`) to a development device (or with `firmware:release`)."""
    device = await product_device(pc, device_id)
    upload = await _flash_file(request, req)
    if upload is not None:
        return await flash.flash_binary(pc.db, settings=pc.ctx.settings, actor=pc.ctx.me,
                                        ip=pc.ctx.ip, device=device, product=pc.product,
                                        role=pc.role, via="product", upload=upload)
    return await service.update_device(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, device=device,
                                       req=req, product=pc.product, role=pc.role)


async def _flash_file(request: Request, req: DeviceChange) -> flash.FlashUpload | None:
    """The binary of a flash request, or None for a plain change; a flash request's
    fields without a file, or with other changes, are refused."""
    upload = await flash.read_flash_file(request, request.app.state.settings)
    if upload is None:
        if req.model_fields_set & DeviceChange.FLASH_FIELDS:
            raise BadRequest("To flash the device, send the binary as multipart/form-data "
                             "in the field file", code="invalid_request")
        return None
    if req.changes():
        raise BadRequest(f"Flash a binary alone; send {', '.join(sorted(req.changes()))} "
                         "in another request", code="invalid_request")
    return upload


@router.delete("/v1/products/{product}/devices/{device_id}", status_code=204,
               summary="Remove or deny a product device", responses=answers(None))
async def remove_product_device(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices:remove")),
    sent: DenyFlag = body(DenyFlag), asked: DenyFlag = query(DenyFlag),
) -> Response:
    """Remove the device from the product, or with `deny=true` (body or query) deny it (it is then refused)."""
    device = await product_device(pc, device_id)
    deny = bool(sent.deny if sent.sent("deny") else asked.deny)
    await service.remove_product_device(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip,
                                        product=pc.product, device=device, deny=deny)
    return Response(status_code=204)


# --- device groups ---------------------------------------------------------------------------

@router.get("/v1/products/{product}/groups", summary="List device groups",
            responses=answers(GroupsAnswer))
async def list_groups(
    pc: ProductCtx = Depends(ProductGuard("groups:list")),
    req: GroupQuery = query(GroupQuery),
) -> dict[str, Any]:
    """The product's device groups (`name` filters by partial name)."""
    rows = await group_rules.list_groups(pc.db, pc.product, req.name)
    return {"groups": [group_rules.group_json(g, n) for g, n in rows]}


@router.post("/v1/products/{product}/groups", status_code=201, summary="Create a device group",
             responses=answers(GroupAnswer, 409, status=201))
async def create_group(
    pc: ProductCtx = Depends(ProductGuard("groups:create")),
    req: GroupCreate = body(GroupCreate),
) -> dict[str, Any]:
    """Create a group: `name` (lowercase letters, digits, `-`, `_`), `color` (`#rrggbb`), `description`; with `query` (a filter over device attributes) a dynamic group whose devices are those matching it."""
    g = await group_rules.create_group(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                       req=req)
    return {"group": group_rules.group_json(g, (await group_rules.group_counts(pc.db, [g]))
                                            .get(g.id, 0))}


@router.post("/v1/products/{product}/groups/preview", summary="Preview a dynamic group's query",
             responses=answers(GroupPreviewAnswer))
async def preview_group(
    pc: ProductCtx = Depends(ProductGuard("devices:list")),
    req: GroupPreview = body(GroupPreview),
) -> dict[str, Any]:
    """How many devices `query` matches now and the first `per_page` (at most 100) of them, most recently heard first; nothing is saved. A bad query is a 400 `invalid_query` with its `line` and `column`."""
    return await service.preview_query(pc.db, pc.product, req.query, req.per_page)


@router.get("/v1/products/{product}/groups/{name}", summary="Get a device group",
            responses=answers(GroupAnswer))
async def get_group(
    name: str, pc: ProductCtx = Depends(ProductGuard("groups:get")),
) -> dict[str, Any]:
    """One group with its device count."""
    g, n = await group_rules.group_with_count(pc.db, pc.product, name)
    return {"group": group_rules.group_json(g, n)}


@router.put("/v1/products/{product}/groups/{name}", summary="Update a device group",
            responses=answers(GroupAnswer, 409))
async def update_group(
    name: str, pc: ProductCtx = Depends(ProductGuard("groups:update")),
    req: GroupChange = body(GroupChange),
) -> dict[str, Any]:
    """Rename, recolor or describe a group, or change its `query` (at least one of `name`, `color`, `description`, `query`; `query: null` makes a dynamic group static)."""
    g, n = await group_rules.update_group(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip,
                                          product=pc.product, name=name, req=req)
    return {"group": group_rules.group_json(g, n)}


@router.delete("/v1/products/{product}/groups/{name}", status_code=204,
               summary="Delete a device group", responses=answers(None))
async def delete_group(
    name: str, pc: ProductCtx = Depends(ProductGuard("groups:remove")),
) -> Response:
    """Delete the group; its devices leave it."""
    await group_rules.delete_group(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                   name=name)
    return Response(status_code=204)


# --- a user's own devices ----------------------------------------------------------------------

@router.get("/v1/devices", summary="List my devices", responses=answers(list[DeviceObject]))
async def list_my_devices(ctx: AuthCtx) -> list[dict[str, Any]]:
    """The caller's own devices (a customer: the devices claimed to them), last handshake first."""
    return await service.my_devices(ctx.db, ctx.me)


@router.get("/v1/devices/{device_id}", summary="Get a device", responses=answers(DeviceObject))
async def get_device(dc: DeviceCtx = Depends(DeviceGuard("devices:get"))) -> dict[str, Any]:
    """A device by ID or by the name of one of the caller's devices."""
    return await service.device_view(dc.db, dc.device)


@router.put("/v1/devices/{device_id}", summary="Rename, change or flash a device",
            responses=answers(DeviceChanged | FlashStarted))
async def update_device(
    request: Request, dc: DeviceCtx = Depends(DeviceGuard("devices:update")),
    req: DeviceChange = body(DeviceChange, files=True),
) -> dict[str, Any]:
    """Change `name` (unique among the owner's devices), `notes` or `firmware_updates_forced`; or flash a binary (multipart `file`; the owner, or for a product device a development device or `firmware:release`): `{"id", "status": "Update started"}`."""
    upload = await _flash_file(request, req)
    if upload is not None:
        return await flash.flash_binary(dc.db, settings=dc.ctx.settings, actor=dc.ctx.me,
                                        ip=dc.ctx.ip, device=dc.device, product=dc.product,
                                        role=dc.role, via=dc.via, upload=upload)
    return await service.update_device(dc.db, actor=dc.ctx.me, ip=dc.ctx.ip, device=dc.device,
                                       req=req, product=dc.product, role=dc.role)
