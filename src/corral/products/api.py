"""/v1 products, product team and API users, OAuth clients (Particle wire format)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from corral.auth.deps import AuthCtx
from corral.auth.policy import api_users_not_allowed
from corral.auth.subject import Subject
from corral.db.session import TransactionRoute
from corral.kit.body import body
from corral.kit.responses import OkAnswer, answers, ok
from corral.orgs.access import OrgCtx, OrgGuard
from corral.products import service
from corral.products.access import ProductCtx, ProductGuard
from corral.products.schemas import (
    ClientAnswer,
    ClientChange,
    ClientCreate,
    ClientsAnswer,
    MemberUpdated,
    ProductAnswer,
    ProductChange,
    ProductCreate,
    ProductGet,
    ProductsAnswer,
    ProductTeamAnswer,
    TeamAdd,
    TeamAdded,
    TeamChange,
    TokenRotatedAnswer,
)
from corral.products.views import (
    client_json,
    member_update_json,
    product_json,
    team_addition_json,
    team_json,
    tokens_json,
)

router = APIRouter(tags=["products"], route_class=TransactionRoute)


def _person(me: Subject) -> Subject:
    if me.kind != "user":
        raise api_users_not_allowed()
    return me


# --- products ----------------------------------------------------------------------------

@router.post("/v1/orgs/{org}/products", responses=answers(ProductAnswer, 409), summary="Create a product in an organization")
async def create_org_product(
    oc: OrgCtx = Depends(OrgGuard("orgs.products:create")),
    req: ProductCreate = body(ProductCreate),
) -> dict[str, Any]:
    """Create a product from `{product: {name, description, platform_id, settings, tags}}` or flat fields."""
    pv = await service.create_product(oc.db, actor=oc.ctx.me, org=oc.org, req=req, ip=oc.ctx.ip)
    return ok(product=product_json(pv))


@router.get("/v1/orgs/{org}/products", responses=answers(ProductsAnswer), summary="List an organization's products")
async def list_org_products(
    oc: OrgCtx = Depends(OrgGuard("orgs.products:list")),
) -> dict[str, Any]:
    """Every product of the organization."""
    return {"products": [product_json(pv) for pv in await service.org_products(oc.db, oc.org)]}


@router.post("/v1/user/products", responses=answers(ProductAnswer, 404, 409), summary="Create a product in my personal organization")
async def create_user_product(ctx: AuthCtx, req: ProductCreate = body(ProductCreate)) -> dict[str, Any]:
    """Create a product in the caller's personal organization (people only)."""
    me = _person(ctx.me)
    pv = await service.create_personal_product(ctx.db, actor=me, req=req, ip=ctx.ip)
    return ok(product=product_json(pv))


@router.get("/v1/user/products", responses=answers(ProductsAnswer), summary="List the products I can see")
async def list_user_products(ctx: AuthCtx) -> dict[str, Any]:
    """Products in the caller's organizations and products they are a team member of."""
    return {"products": [product_json(pv) for pv in await service.visible_products(ctx.db, ctx.me)]}


@router.get("/v1/products", responses=answers(ProductsAnswer), summary="List the products I can see (particle-api-js)")
async def list_products(ctx: AuthCtx) -> dict[str, Any]:
    """Same as `GET /v1/user/products` (particle-api-js `listProducts` calls this path)."""
    return {"products": [product_json(pv) for pv in await service.visible_products(ctx.db, ctx.me)]}


@router.get("/v1/products/{product}", responses=answers(ProductGet), summary="Get a product")
async def get_product(pc: ProductCtx = Depends(ProductGuard("products:get"))) -> dict[str, Any]:
    """A product by id or slug."""
    return {"product": product_json(await service.view(pc.db, pc.product, pc.org_slug))}


@router.put("/v1/products/{product}", responses=answers(ProductAnswer, 409), summary="Update a product")
async def update_product(
    pc: ProductCtx = Depends(ProductGuard("products:update")),
    req: ProductChange = body(ProductChange),
) -> dict[str, Any]:
    """Change `name`, `description`, `tags`, `platform_id` or `settings` (merged)."""
    pv = await service.update_product(pc.db, actor=pc.ctx.me, product=pc.product, req=req,
                                      ip=pc.ctx.ip)
    return ok(product=product_json(pv))


@router.delete("/v1/products/{product}", responses=answers(None, 409), summary="Delete a product", status_code=204)
async def delete_product(pc: ProductCtx = Depends(ProductGuard("products:remove"))) -> Response:
    """Delete an empty product with its API users, OAuth clients and product roles."""
    await service.delete_product(pc.db, actor=pc.ctx.me, product=pc.product, ip=pc.ctx.ip)
    return Response(status_code=204)


# --- product team and API users ------------------------------------------------------------

@router.get("/v1/products/{product}/team", responses=answers(ProductTeamAnswer), summary="List the product team")
async def list_team(pc: ProductCtx = Depends(ProductGuard("teams.users:list"))) -> dict[str, Any]:
    """People (organization and product roles) and then API users of the product."""
    return ok(team=team_json(await service.product_team(pc.db, pc.product)))


@router.post("/v1/products/{product}/team", responses=answers(TeamAdded, 409), summary="Invite a team member or create an API user")
async def add_team_member(
    pc: ProductCtx = Depends(ProductGuard("teams.users:invite")),
    req: TeamAdd = body(TeamAdd),
) -> dict[str, Any]:
    """`{username, role}` invites a person; `{friendly_name, scopes}` creates an API user."""
    ctx = pc.ctx
    added = await service.add_team_member(pc.db, ctx.settings, actor=ctx.me, product=pc.product,
                                          req=req, ip=ctx.ip)
    return ok(**team_addition_json(added))


@router.post("/v1/products/{product}/team/{username}", responses=answers(MemberUpdated, 409), summary="Update a team member")
@router.put("/v1/products/{product}/team/{username}", responses=answers(MemberUpdated, 409), summary="Update a team member")
async def update_team_member(
    username: str,
    pc: ProductCtx = Depends(ProductGuard("teams.users:update")),
    req: TeamChange = body(TeamChange),
) -> dict[str, Any]:
    """A person's product `role`, or an API user's `friendly_name`/`scopes` (rotates its token)."""
    ctx = pc.ctx
    res = await service.update_team_member(
        pc.db, ctx.settings, actor=ctx.me, actor_role=pc.role, product=pc.product,
        username=username, req=req, ip=ctx.ip)
    return ok(updated=member_update_json(res))


@router.put("/v1/products/{product}/team/{username}/token", responses=answers(TokenRotatedAnswer), summary="Regenerate an API user's token")
async def rotate_api_user_token(
    username: str, pc: ProductCtx = Depends(ProductGuard("teams.users:update")),
) -> dict[str, Any]:
    """Revoke the API user's tokens and issue one new non-expiring token."""
    ctx = pc.ctx
    user, issued = await service.rotate_api_user_token(pc.db, ctx.settings, actor=ctx.me,
                                                       product=pc.product, username=username,
                                                       ip=ctx.ip)
    return ok(updated={"username": user.username, "tokens": tokens_json(issued)})


@router.delete("/v1/products/{product}/team/{username}", responses=answers(OkAnswer, 409), summary="Remove a team member")
async def remove_team_member(
    username: str, pc: ProductCtx = Depends(ProductGuard("teams.users:remove")),
) -> dict[str, Any]:
    """Delete an API user, or remove a person's product role."""
    await service.remove_team_member(pc.db, actor=pc.ctx.me, actor_role=pc.role,
                                     product=pc.product, username=username, ip=pc.ctx.ip)
    return ok()


# --- OAuth clients -------------------------------------------------------------------------

@router.get("/v1/products/{product}/clients", responses=answers(ClientsAnswer), summary="List a product's OAuth clients")
async def list_product_clients(
    pc: ProductCtx = Depends(ProductGuard("clients:list")),
) -> dict[str, Any]:
    """The product's OAuth clients (secrets are never shown again)."""
    return ok(clients=[client_json(c) for c in await service.list_clients(pc.db, product=pc.product)])


@router.post("/v1/products/{product}/clients", responses=answers(ClientAnswer), summary="Create a product OAuth client")
async def create_product_client(
    pc: ProductCtx = Depends(ProductGuard("clients:create")),
    req: ClientCreate = body(ClientCreate),
) -> dict[str, Any]:
    """Register a client (`name`, `type`, `redirect_uri`, `scope`); its secret is shown once."""
    row, secret = await service.create_client(pc.db, actor=pc.ctx.me, product=pc.product,
                                              req=req, ip=pc.ctx.ip)
    return ok(client=client_json(row, secret))


@router.put("/v1/products/{product}/clients/{client_id}", responses=answers(ClientAnswer), summary="Update a product OAuth client")
async def update_product_client(
    client_id: str,
    pc: ProductCtx = Depends(ProductGuard("clients:update")),
    req: ClientChange = body(ClientChange),
) -> dict[str, Any]:
    """Change `name` or `scope` (`none` clears it)."""
    row = await service.update_client(pc.db, actor=pc.ctx.me, client_id=client_id,
                                      product=pc.product, req=req, ip=pc.ctx.ip)
    return ok(client=client_json(row))


@router.delete("/v1/products/{product}/clients/{client_id}", responses=answers(None), summary="Delete a product OAuth client",
               status_code=204)
async def delete_product_client(
    client_id: str, pc: ProductCtx = Depends(ProductGuard("clients:remove")),
) -> Response:
    """Delete the client and every token issued through it."""
    await service.delete_client(pc.db, actor=pc.ctx.me, client_id=client_id, product=pc.product,
                                ip=pc.ctx.ip)
    return Response(status_code=204)


@router.get("/v1/clients", responses=answers(ClientsAnswer), summary="List my OAuth clients")
async def list_my_clients(ctx: AuthCtx) -> dict[str, Any]:
    """The caller's own OAuth clients that belong to no product (people only)."""
    me = _person(ctx.me)
    return ok(clients=[client_json(c) for c in await service.list_clients(ctx.db, owner=me)])


@router.post("/v1/clients", responses=answers(ClientAnswer), summary="Create an OAuth client")
async def create_my_client(ctx: AuthCtx, req: ClientCreate = body(ClientCreate)) -> dict[str, Any]:
    """Register a personal client (`name`, `type`, `redirect_uri`, `scope`); secret shown once."""
    me = _person(ctx.me)
    row, secret = await service.create_client(ctx.db, actor=me, product=None, req=req, ip=ctx.ip)
    return ok(client=client_json(row, secret))


@router.put("/v1/clients/{client_id}", responses=answers(ClientAnswer), summary="Update my OAuth client")
async def update_my_client(client_id: str, ctx: AuthCtx,
                           req: ClientChange = body(ClientChange)) -> dict[str, Any]:
    """Change `name` or `scope` (`none` clears it)."""
    me = _person(ctx.me)
    row = await service.update_client(ctx.db, actor=me, client_id=client_id, product=None,
                                      req=req, ip=ctx.ip)
    return ok(client=client_json(row))


@router.delete("/v1/clients/{client_id}", responses=answers(None), summary="Delete my OAuth client", status_code=204)
async def delete_my_client(client_id: str, ctx: AuthCtx) -> Response:
    """Delete the client and every token issued through it."""
    me = _person(ctx.me)
    await service.delete_client(ctx.db, actor=me, client_id=client_id, product=None, ip=ctx.ip)
    return Response(status_code=204)
