"""/v1 cohort routes (corral's addition, in Particle's style): a product's cohorts, their
releases, and moving devices between them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from corral.cohorts import service
from corral.cohorts.schemas import (
    CohortAnswer,
    CohortChange,
    CohortCreate,
    CohortDevices,
    CohortMoved,
    CohortsAnswer,
)
from corral.db.session import TransactionRoute
from corral.kit.body import body
from corral.kit.responses import answers
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["cohorts"], route_class=TransactionRoute)


@router.get("/v1/products/{product}/cohorts", summary="List cohorts",
            responses=answers(CohortsAnswer))
async def list_cohorts(pc: ProductCtx = Depends(ProductGuard("cohorts:list"))) -> dict[str, Any]:
    """The product's cohorts by name, each with its release and device count."""
    return {"cohorts": await service.views(pc.db, await service.list_cohorts(pc.db, pc.product))}


@router.post("/v1/products/{product}/cohorts", status_code=201, summary="Create a cohort",
             responses=answers(CohortAnswer, 409, status=201))
async def create_cohort(
    pc: ProductCtx = Depends(ProductGuard("cohorts:create")),
    req: CohortCreate = body(CohortCreate),
) -> dict[str, Any]:
    """`name` (lowercase letters, digits, `-`, `_`), `description`, `firmware_version` (its release; needs firmware:release)."""
    c = await service.create_cohort(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                    role=pc.role, req=req)
    return {"cohort": await service.view(pc.db, c)}


@router.get("/v1/products/{product}/cohorts/{name}", summary="Get a cohort",
            responses=answers(CohortAnswer))
async def get_cohort(name: str,
                     pc: ProductCtx = Depends(ProductGuard("cohorts:get"))) -> dict[str, Any]:
    """One cohort with its release and device count."""
    return {"cohort": await service.view(pc.db, await service.get_cohort(pc.db, pc.product, name))}


@router.put("/v1/products/{product}/cohorts/{name}", summary="Update a cohort",
            responses=answers(CohortAnswer, 409))
async def update_cohort(
    name: str, pc: ProductCtx = Depends(ProductGuard("cohorts:update")),
    req: CohortChange = body(CohortChange),
) -> dict[str, Any]:
    """Rename, describe, or set the cohort's release (`firmware_version`; `null` ends it)."""
    c = await service.update_cohort(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                    role=pc.role, name=name, req=req)
    return {"cohort": await service.view(pc.db, c)}


@router.delete("/v1/products/{product}/cohorts/{name}", status_code=204,
               summary="Delete a cohort", responses=answers(None))
async def delete_cohort(
    name: str, pc: ProductCtx = Depends(ProductGuard("cohorts:remove")),
) -> Response:
    """Delete the cohort; its devices are then in no cohort."""
    await service.delete_cohort(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                name=name)
    return Response(status_code=204)


@router.put("/v1/products/{product}/cohorts/{name}/devices", summary="Move devices",
            responses=answers(CohortMoved))
async def move_devices(
    name: str, pc: ProductCtx = Depends(ProductGuard("cohorts:update")),
    req: CohortDevices = body(CohortDevices),
) -> dict[str, Any]:
    """`{"add": [ids], "remove": [ids]}`: up to 10,000 each; added devices leave their other cohort."""
    return await service.move_devices(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                      name=name, req=req)
