"""Audit log routes: readable by Administrators (and Owners) of the org or product."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from corral.audit import service
from corral.audit.schemas import AuditAnswer, AuditQuery
from corral.db.session import TransactionRoute
from corral.kit.body import query
from corral.kit.responses import answers
from corral.orgs.access import OrgCtx, OrgGuard
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["audit"], route_class=TransactionRoute)


def _page(rows: list[Any], more: bool, page: int, per_page: int) -> dict[str, Any]:
    return {"ok": True, "entries": [service.to_json(e) for e in rows],
            "meta": {"page": page, "per_page": per_page, "has_more": more}}


@router.get("/v1/orgs/{org}/audit", summary="Organization audit log",
            responses=answers(AuditAnswer))
async def org_audit(oc: OrgCtx = Depends(OrgGuard("orgs.audit:list")),
                    q: AuditQuery = query(AuditQuery)) -> dict[str, Any]:
    """Changes in the organization and all its products, newest first."""
    rows, more = await service.list_entries(oc.db, org_id=oc.org.id, page=q.page,
                                            per_page=q.per_page, action_prefix=q.action)
    return _page(rows, more, q.page, q.per_page)


@router.get("/v1/products/{product}/audit", summary="Product audit log",
            responses=answers(AuditAnswer))
async def product_audit(pc: ProductCtx = Depends(ProductGuard("audit:list")),
                        q: AuditQuery = query(AuditQuery)) -> dict[str, Any]:
    """Changes to the product, newest first."""
    rows, more = await service.list_entries(pc.db, product_id=pc.product.id, page=q.page,
                                            per_page=q.per_page, action_prefix=q.action)
    return _page(rows, more, q.page, q.per_page)
