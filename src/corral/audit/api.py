"""Audit log routes: readable by Administrators (and Owners) of the org or product."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from corral.audit import service
from corral.orgs.access import OrgCtx, OrgGuard
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["audit"])


def _page(rows: list[Any], more: bool, page: int, per_page: int) -> dict[str, Any]:
    return {"ok": True, "entries": [service.to_json(e) for e in rows],
            "meta": {"page": page, "per_page": per_page, "has_more": more}}


@router.get("/v1/orgs/{org}/audit", summary="Organization audit log")
async def org_audit(
    oc: OrgCtx = Depends(OrgGuard("orgs.audit:list")),
    page: int = Query(1, ge=1, le=100_000), per_page: int = Query(50, ge=1, le=500),
    action: str | None = Query(None, max_length=64, description="action prefix, e.g. team."),
) -> dict[str, Any]:
    """Changes in the organization and all its products, newest first."""
    rows, more = await service.list_entries(oc.db, org_id=oc.org.id, page=page,
                                            per_page=per_page, action_prefix=action)
    return _page(rows, more, page, per_page)


@router.get("/v1/products/{product}/audit", summary="Product audit log")
async def product_audit(
    pc: ProductCtx = Depends(ProductGuard("audit:list")),
    page: int = Query(1, ge=1, le=100_000), per_page: int = Query(50, ge=1, le=500),
    action: str | None = Query(None, max_length=64, description="action prefix, e.g. product."),
) -> dict[str, Any]:
    """Changes to the product, newest first."""
    rows, more = await service.list_entries(pc.db, product_id=pc.product.id, page=page,
                                            per_page=per_page, action_prefix=action)
    return _page(rows, more, page, per_page)
