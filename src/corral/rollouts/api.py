"""/v1 phased rollouts (corral's own, in Particle's style)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from corral.db.session import TransactionRoute
from corral.kit.body import body
from corral.kit.errors import BadRequest
from corral.kit.responses import answers
from corral.products.access import ProductCtx, ProductGuard
from corral.rollouts import service
from corral.rollouts.schemas import (
    RolloutAction,
    RolloutAnswer,
    RolloutsAnswer,
    RolloutShares,
    RolloutStart,
)

router = APIRouter(tags=["rollouts"], route_class=TransactionRoute)


async def _view(pc: ProductCtx, r: Any) -> dict[str, Any]:
    return {"rollout": {**service.rollout_json(r),
                        "progress": await service.progress(pc.db, pc.product, r)}}


@router.get("/v1/products/{product}/rollouts", summary="List rollouts",
            responses=answers(RolloutsAnswer))
async def list_rollouts(pc: ProductCtx = Depends(ProductGuard("rollouts:list"))) -> dict[str, Any]:
    """The product's rollouts, newest first."""
    return {"rollouts": [service.rollout_json(r)
                         for r in await service.list_rollouts(pc.db, pc.product)]}


@router.post("/v1/products/{product}/rollouts", status_code=201, summary="Start a rollout",
             responses=answers(RolloutAnswer, 409, status=201))
async def start_rollout(
    pc: ProductCtx = Depends(ProductGuard("rollouts:manage")),
    req: RolloutStart = body(RolloutStart),
) -> dict[str, Any]:
    """`version` (released), `percent` or `count`, `failure_threshold_percent`, `failure_min_attempts`."""
    r = await service.create(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, req=req)
    return await _view(pc, r)


@router.get("/v1/products/{product}/rollouts/{rollout_id}", summary="Get a rollout and its progress",
            responses=answers(RolloutAnswer))
async def get_rollout(
    rollout_id: str, pc: ProductCtx = Depends(ProductGuard("rollouts:list")),
) -> dict[str, Any]:
    """Targeted, eligible, updated, failed and pending devices (pending by version), updates by state."""
    return await _view(pc, await service.get_rollout(pc.db, pc.product, rollout_id))


@router.put("/v1/products/{product}/rollouts/{rollout_id}", summary="Grow a rollout",
            responses=answers(RolloutAnswer, 409))
async def change_rollout(
    rollout_id: str, pc: ProductCtx = Depends(ProductGuard("rollouts:manage")),
    req: RolloutShares = body(RolloutShares),
) -> dict[str, Any]:
    """Raise `percent` or `count` (a rollout only grows), or change the failure threshold."""
    r = await service.get_rollout(pc.db, pc.product, rollout_id)
    r = await service.change(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                             rollout=r, req=req)
    return await _view(pc, r)


@router.post("/v1/products/{product}/rollouts/{rollout_id}/{action}",
             summary="Pause, resume or abort a rollout", responses=answers(RolloutAnswer, 409))
async def rollout_action(
    rollout_id: str, action: str, pc: ProductCtx = Depends(ProductGuard("rollouts:manage")),
    req: RolloutAction = body(RolloutAction),
) -> dict[str, Any]:
    """`pause`, `resume` or `abort` (optional `reason`)."""
    if action not in service.TRANSITIONS:
        raise BadRequest("The action must be pause, resume or abort", code="invalid_request")
    r = await service.get_rollout(pc.db, pc.product, rollout_id)
    r = await service.act(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                          rollout=r, action=action, reason=req.reason)
    return await _view(pc, r)
