"""Claiming routes: claim, unclaim, claim codes (Particle wire format, reference §1.3)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from corral.auth.deps import AuthCtx, Ctx, auth_ctx
from corral.devices import claims
from corral.devices.access import DeviceCtx, DeviceGuard, product_device
from corral.kit.body import as_bool, read_body
from corral.kit.errors import NotFound
from corral.kit.responses import ok
from corral.products.access import ProductCtx, ProductGuard, get_product

router = APIRouter(tags=["claiming"])


class ProductOrCustomerGuard(ProductGuard):
    """Like :class:`ProductGuard`, but a customer token of the product is let through too
    (customers create claim codes for their own devices). ``role`` is then None."""

    scope = "product"

    async def __call__(self, product: str, ctx: Ctx = Depends(auth_ctx)) -> ProductCtx:
        me = ctx.me
        if me.kind == "customer":
            row = await get_product(ctx.db, product)
            if row is None or row.id != me.product_id:
                raise NotFound("Product not found")
            return ProductCtx(ctx=ctx, product=row, role=None)
        return await super().__call__(product, ctx)


@router.post("/v1/devices", summary="Claim a device")
async def claim_device(request: Request, ctx: AuthCtx) -> dict[str, Any]:
    """Claim the device `id` to the caller (a person or a customer); `request_transfer` is accepted."""
    body = await read_body(request)
    transfer = as_bool(body.get("request_transfer"), field="request_transfer")
    device = await claims.claim_device(ctx.db, actor=ctx.me, device_id=body.get("id"),
                                       request_transfer=transfer, ip=ctx.ip)
    return ok(deviceID=device.id, claimed=True)


@router.delete("/v1/devices/{device_id}", summary="Unclaim a device")
async def unclaim_device(dc: DeviceCtx = Depends(DeviceGuard("devices:update"))) -> dict[str, Any]:
    """Release the device from its owner; a developer device with no product is removed."""
    await claims.unclaim_device(dc.db, actor=dc.ctx.me, device=dc.device, ip=dc.ctx.ip)
    return ok()


@router.delete("/v1/products/{product}/devices/{device_id}/owner",
               summary="Unclaim a product device")
async def unclaim_product_device(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices:update")),
) -> dict[str, Any]:
    """Release a product device from its owner (person or customer); it stays in the product."""
    device = await product_device(pc, device_id)
    await claims.unclaim_device(pc.db, actor=pc.ctx.me, device=device, ip=pc.ctx.ip)
    return ok()


def _claim_code_json(new: claims.NewClaimCode) -> dict[str, Any]:
    return {"claim_code": new.code, "device_ids": new.device_ids}


@router.post("/v1/device_claims", summary="Create a claim code")
async def create_claim_code(request: Request, ctx: AuthCtx) -> dict[str, Any]:
    """A 24-hour claim code for the caller (optional `iccid` or `imei` becomes the code)."""
    body = await read_body(request)
    new = await claims.create_claim_code(ctx.db, actor=ctx.me, product=None,
                                         iccid=body.get("iccid"), imei=body.get("imei"),
                                         ip=ctx.ip)
    return _claim_code_json(new)


@router.post("/v1/products/{product}/device_claims", summary="Create a product claim code")
async def create_product_claim_code(
    request: Request, pc: ProductCtx = Depends(ProductOrCustomerGuard("devices:update")),
) -> dict[str, Any]:
    """A 24-hour claim code bound to the product and the caller (a team member or a customer)."""
    body = await read_body(request)
    new = await claims.create_claim_code(pc.db, actor=pc.ctx.me, product=pc.product,
                                         iccid=body.get("iccid"), imei=body.get("imei"),
                                         ip=pc.ctx.ip)
    return _claim_code_json(new)
