"""Product customers (Particle wire format, reference §1.9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from corral.accounts import service as accounts
from corral.accounts.schemas import TokenAnswer
from corral.auth.deps import Ctx, basic_credentials, optional_ctx
from corral.auth.guards import Guard
from corral.auth.models import OAuthClient
from corral.auth.policy import Role, check_scopes
from corral.customers import service
from corral.customers.schemas import CustomerCreate, CustomerPage, CustomerPassword, CustomersAnswer
from corral.db.session import TransactionRoute
from corral.kit.body import body, query, raw_body
from corral.kit.errors import NotFound, OAuthError
from corral.kit.responses import NO_STORE, OkAnswer, answers, ok, paging
from corral.products.access import ProductCtx, ProductGuard, get_product
from corral.products.models import Product

router = APIRouter(tags=["customers"], route_class=TransactionRoute)


@dataclass
class CustomerCreateCtx:
    """The product, and who asks: a team member (``oauth_client`` None) or the product's
    OAuth client ("two-legged")."""

    ctx: Ctx
    product: Product
    role: Role | None
    oauth_client: OAuthClient | None

    @property
    def db(self) -> AsyncSession:
        return self.ctx.db


def _client_may_create_customers(client: OAuthClient) -> None:
    """A client without a scope is a plain product client (Particle: scope only limits it);
    one with a scope needs ``customers:create`` (or ``*:*``)."""
    if client.scope:
        check_scopes(frozenset(accounts.client_scopes(client)), "customers:create")


class CustomerCreateGuard(Guard):
    """``customers:create`` on ``{product}``: the product's OAuth client credentials (HTTP
    Basic, or ``client_id``/``client_secret`` in the body), else a bearer token judged by
    :class:`ProductGuard`."""

    scope = "product"
    path_param = "product"

    async def __call__(self, product: str, request: Request,
                       ctx: Ctx = Depends(optional_ctx)) -> CustomerCreateCtx:
        cid, secret = basic_credentials(request)
        if cid is None:
            raw = await raw_body(request)
            if raw.get("client_id") not in (None, ""):
                cid, secret = raw.get("client_id"), raw.get("client_secret")
                if not isinstance(cid, str) or not isinstance(secret, str | None):
                    raise OAuthError("Invalid or missing client_id parameter")
        if cid is None:
            pc = await ProductGuard(self.permission).resolve(ctx, product)
            return CustomerCreateCtx(ctx=ctx, product=pc.product, role=pc.role, oauth_client=None)
        client = await accounts.authenticate_client(ctx.db, cid, secret, required=True)
        assert client is not None
        row = await get_product(ctx.db, product)
        if row is None or client.product_id != row.id:
            raise NotFound("Product not found")
        _client_may_create_customers(client)
        return CustomerCreateCtx(ctx=ctx, product=row, role=None, oauth_client=client)


@router.post("/v1/products/{product}/customers", summary="Create a customer", status_code=201,
             responses=answers(TokenAnswer, 409, status=201))
async def create_customer(
    cc: CustomerCreateCtx = Depends(CustomerCreateGuard("customers:create")),
    req: CustomerCreate = body(CustomerCreate),
) -> JSONResponse:
    """`email` + `password` (team token or client credentials), or `no_password=true` (client credentials)."""
    ctx = cc.ctx
    creator = service.Creator(actor=ctx.subject if cc.oauth_client is None else None,
                              oauth_client=cc.oauth_client)
    issued = await service.create_customer(cc.db, ctx.settings, creator=creator,
                                           product=cc.product, req=req, ip=ctx.ip)
    return JSONResponse(issued.body(), status_code=201, headers=NO_STORE)


@router.get("/v1/products/{product}/customers", summary="List customers",
            responses=answers(CustomersAnswer))
async def list_customers(
    pc: ProductCtx = Depends(ProductGuard("customers:list")),
    q: CustomerPage = query(CustomerPage),
) -> dict[str, Any]:
    """The product's customers with the ids of their devices (`page`, `per_page`/`perPage`)."""
    page, size = q.page, q.per_page
    result = await service.list_customers(pc.db, pc.product, page=page, per_page=size)
    return {
        "customers": [{"id": c.id, "username": c.email, "devices": devices}
                      for c, devices in result.rows],
        "meta": paging(page, size, result.total),
    }


@router.put("/v1/products/{product}/customers/{email}", summary="Change a customer's password",
            responses=answers(OkAnswer))
async def update_customer(
    email: str, pc: ProductCtx = Depends(ProductGuard("customers:update")),
    req: CustomerPassword = body(CustomerPassword),
) -> dict[str, Any]:
    """Set the customer's `password` (team token; a shadow customer gets one)."""
    await service.update_customer(pc.db, pc.ctx.settings, actor=pc.ctx.me, product=pc.product,
                                  email=email, req=req, ip=pc.ctx.ip)
    return ok()


@router.delete("/v1/products/{product}/customers/{email}", summary="Delete a customer",
               responses=answers(OkAnswer))
async def delete_customer(
    email: str, pc: ProductCtx = Depends(ProductGuard("customers:remove")),
) -> dict[str, Any]:
    """Delete the customer, revoke their tokens and claim codes and release their devices."""
    await service.delete_customer(pc.db, actor=pc.ctx.me, product=pc.product, email=email,
                                  ip=pc.ctx.ip)
    return ok()
