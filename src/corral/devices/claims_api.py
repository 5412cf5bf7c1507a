"""Claiming routes: claim, unclaim, claim codes (Particle wire format, reference §1.3)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from corral.auth.deps import AuthCtx
from corral.db.session import TransactionRoute
from corral.devices import claims
from corral.devices.access import DeviceCtx, DeviceGuard, product_device
from corral.devices.schemas import ClaimCodeAnswer, ClaimCodeRequest, Claimed, ClaimRequest
from corral.kit.body import body
from corral.kit.errors import NotFound
from corral.kit.responses import OkAnswer, answers, ok
from corral.products.access import ProductCtx, ProductGuard, get_product

router = APIRouter(tags=["claiming"], route_class=TransactionRoute)


class ProductOrCustomerGuard(ProductGuard):
    """Like :class:`ProductGuard`, but a customer token of the product is let through too
    (customers create claim codes for their own devices). ``role`` is then None."""

    scope = "product"

    async def __call__(self, product: str, request: Request) -> ProductCtx:
        ctx = await self.context(request)
        me = ctx.me
        if me.kind == "customer":
            row = await get_product(ctx.db, product)
            if row is None or row.id != me.product_id:
                raise NotFound("Product not found")
            return ProductCtx(ctx=ctx, product=row, role=None)
        return await self.resolve(ctx, product)


@router.post("/v1/devices", summary="Claim a device", responses=answers(Claimed, 404, 409))
async def claim_device(ctx: AuthCtx, req: ClaimRequest = body(ClaimRequest)) -> dict[str, Any]:
    """Claim the device `id` to the caller (a person or a customer); `request_transfer` is accepted."""
    device = await claims.claim_device(ctx.db, actor=ctx.me, device_id=req.id,
                                       request_transfer=req.request_transfer, ip=ctx.ip)
    return ok(deviceID=device.id, claimed=True)


@router.delete("/v1/devices/{device_id}", summary="Unclaim a device",
               responses=answers(OkAnswer, 409))
async def unclaim_device(dc: DeviceCtx = Depends(DeviceGuard("devices:update"))) -> dict[str, Any]:
    """Release the device from its owner; a developer device with no product is removed."""
    await claims.unclaim_device(dc.db, actor=dc.ctx.me, device=dc.device, ip=dc.ctx.ip)
    return ok()


@router.delete("/v1/products/{product}/devices/{device_id}/owner",
               summary="Unclaim a product device", responses=answers(OkAnswer, 409))
async def unclaim_product_device(
    device_id: str, pc: ProductCtx = Depends(ProductGuard("devices:update")),
) -> dict[str, Any]:
    """Release a product device from its owner (person or customer); it stays in the product."""
    device = await product_device(pc, device_id)
    await claims.unclaim_device(pc.db, actor=pc.ctx.me, device=device, ip=pc.ctx.ip)
    return ok()


def _claim_code_json(new: claims.NewClaimCode) -> dict[str, Any]:
    return {"claim_code": new.code, "device_ids": new.device_ids}


@router.post("/v1/device_claims", summary="Create a claim code",
             responses=answers(ClaimCodeAnswer, 409))
async def create_claim_code(ctx: AuthCtx,
                            req: ClaimCodeRequest = body(ClaimCodeRequest)) -> dict[str, Any]:
    """A 24-hour claim code for the caller (optional `iccid` or `imei` becomes the code)."""
    new = await claims.create_claim_code(ctx.db, actor=ctx.me, product=None,
                                         iccid=req.iccid, imei=req.imei, ip=ctx.ip)
    return _claim_code_json(new)


@router.post("/v1/products/{product}/device_claims", summary="Create a product claim code",
             responses=answers(ClaimCodeAnswer, 409))
async def create_product_claim_code(
    pc: ProductCtx = Depends(ProductOrCustomerGuard("devices:update")),
    req: ClaimCodeRequest = body(ClaimCodeRequest),
) -> dict[str, Any]:
    """A 24-hour claim code bound to the product and the caller (a team member or a customer)."""
    new = await claims.create_claim_code(pc.db, actor=pc.ctx.me, product=pc.product,
                                         iccid=req.iccid, imei=req.imei, ip=pc.ctx.ip)
    return _claim_code_json(new)
