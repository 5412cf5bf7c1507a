"""Teams: an organization's and a product's members and roles, the "Invite team member"
dialog, pending invitations (revoke), change role, remove; a product's API users (created
with their one token, shown once; token regenerated; deleted).

The rules are ``orgs.service`` (invite, change_role, remove_member, revoke_invitation) and
``products.service`` (product team, API users), with the request models ``/v1`` uses.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from corral.auth.policy import API_USER_SCOPES, Role, assignable_roles, role_allows
from corral.console.forms import FormErrors, attempt, read_form, text, values
from corral.console.render import page, redirect
from corral.console.session import ConsoleOrgGuard, ConsoleProductGuard
from corral.db.session import TransactionRoute
from corral.orgs import service as orgs
from corral.orgs.access import OrgCtx
from corral.products import service as products
from corral.products.access import ProductCtx
from corral.products.schemas import TeamAdd, TeamChange

router = APIRouter(route_class=TransactionRoute)


def _roles(actor: Role | None, *, product: bool) -> list[tuple[str, str]]:
    """The roles the viewer may grant (none without an admin role); Owner is org-only."""
    roles = assignable_roles(actor) if actor is not None else []
    return [(r.label, r.label) for r in reversed(roles) if not (product and r == Role.OWNER)]


# --- the organization's team ------------------------------------------------------------------

async def _org_team(request: Request, oc: OrgCtx, *, status: int = 200,
                    invite_errors: FormErrors | None = None,
                    member_errors: FormErrors | None = None,
                    form: dict[str, str] | None = None) -> Response:
    members = await orgs.list_team(oc.db, org_id=oc.org.id, product_id=None)
    pending: list[dict[str, Any]] = []
    if role_allows(oc.role, "orgs.team:invite"):
        pending = await orgs.invitations_json(oc.db, await orgs.list_invitations(
            oc.db, org_id=oc.org.id, every_scope=True))
    return await page(request, "team/org.html", status=status, org=oc.org, role=oc.role,
                      title=f"Team · {oc.org.name}", section="team", members=members,
                      pending=pending, roles=_roles(oc.role, product=False),
                      invite_errors=invite_errors or FormErrors(),
                      member_errors=member_errors or FormErrors(), form=form or {},
                      me=oc.ctx.me.username,
                      open_invite=bool(invite_errors) or request.query_params.get("invite") == "1")


@router.get("/console/orgs/{org}/team", summary="Organization team")
async def org_team(request: Request,
                   oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.team:list"))) -> Response:
    """Members and their roles; invitations waiting for an answer."""
    return await _org_team(request, oc)


@router.post("/console/orgs/{org}/team", summary="Invite to the organization")
async def org_invite(request: Request,
                     oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.team:invite"))) -> Response:
    """Invite an e-mail address with a role; the invitee accepts after signing in."""
    form = await read_form(request)
    email, role = text(form, "username").strip(), text(form, "role")

    async def go() -> Any:
        return await orgs.invite(oc.db, oc.ctx.settings, inviter=oc.ctx.me, org=oc.org,
                                 product_id=None, product_name=None, email=email,
                                 role=orgs.parse_role(role, default=Role.VIEW_ONLY),
                                 ip=oc.ctx.ip)

    inv, errors = await attempt(oc.db, ("username", "role"), go)
    if inv is None:
        return await _org_team(request, oc, status=400, invite_errors=errors,
                               form={"username": email, "role": role})
    return redirect(f"/console/orgs/{oc.org.slug}/team",
                    flash=f"Invitation sent to {inv.email} as {inv.role}.")


@router.post("/console/orgs/{org}/team/{username}/role", summary="Change a member's role")
async def org_change_role(username: str, request: Request,
                          oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.team:update"))
                          ) -> Response:
    """Give a member another role (only an Owner grants or takes Owner)."""
    form = await read_form(request)
    member, errors = await attempt(oc.db, ("role",), lambda: orgs.change_role(
        oc.db, actor=oc.ctx.me, actor_role=oc.role, org=oc.org, product_id=None,
        username=username, role=orgs.parse_role(text(form, "role")), ip=oc.ctx.ip))
    if member is None:
        return await _org_team(request, oc, status=400, member_errors=errors)
    return redirect(f"/console/orgs/{oc.org.slug}/team",
                    flash=f"{username} is now {member.role}.")


@router.post("/console/orgs/{org}/team/{username}/remove", summary="Remove a member")
async def org_remove(username: str, request: Request,
                     oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.team:remove"))) -> Response:
    """Take a member off the organization's team (an organization keeps an Owner)."""
    await read_form(request)
    _, errors = await attempt(oc.db, (), lambda: orgs.remove_member(
        oc.db, actor=oc.ctx.me, actor_role=oc.role, org=oc.org, product_id=None,
        username=username, ip=oc.ctx.ip))
    if errors:
        return await _org_team(request, oc, status=400, member_errors=errors)
    return redirect(f"/console/orgs/{oc.org.slug}/team", flash=f"{username} was removed.")


@router.post("/console/orgs/{org}/invitations/{invitation_id}/revoke",
             summary="Revoke an invitation")
async def org_revoke(invitation_id: int, request: Request,
                     oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.team:invite"))) -> Response:
    """Withdraw an invitation (to the organization or one of its products)."""
    await read_form(request)
    _, errors = await attempt(oc.db, (), lambda: orgs.revoke_invitation(
        oc.db, actor=oc.ctx.me, actor_role=oc.role, org=oc.org, invitation_id=invitation_id,
        every_scope=True, ip=oc.ctx.ip))
    if errors:
        return await _org_team(request, oc, status=400, member_errors=errors)
    return redirect(f"/console/orgs/{oc.org.slug}/team", flash="Invitation revoked.")


# --- a product's team --------------------------------------------------------------------------

async def _product_team(request: Request, pc: ProductCtx, *, status: int = 200,
                        invite_errors: FormErrors | None = None,
                        member_errors: FormErrors | None = None,
                        form: dict[str, str] | None = None) -> Response:
    team = await products.product_team(pc.db, pc.product)
    pending: list[dict[str, Any]] = []
    if pc.role is not None and role_allows(pc.role, "teams.users:invite"):
        pending = await orgs.invitations_json(pc.db, await orgs.list_invitations(
            pc.db, org_id=pc.product.org_id, product_id=pc.product.id))
    return await page(request, "team/product.html", status=status, product=pc.product,
                      role=pc.role, title=f"Team · {pc.product.name}", section="team",
                      team=team, pending=pending, roles=_roles(pc.role, product=True),
                      invite_errors=invite_errors or FormErrors(),
                      member_errors=member_errors or FormErrors(), form=form or {},
                      me=pc.ctx.me.username,
                      open_invite=bool(invite_errors) or request.query_params.get("invite") == "1")


@router.get("/console/products/{product}/team", summary="Product team")
async def product_team(request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("teams.users:list"))
                       ) -> Response:
    """Everyone who works on the product: organization members and product members."""
    return await _product_team(request, pc)


@router.post("/console/products/{product}/team", summary="Invite to the product")
async def product_invite(request: Request,
                         pc: ProductCtx = Depends(ConsoleProductGuard("teams.users:invite"))
                         ) -> Response:
    """Invite a person to this product's team only."""
    form = await read_form(request)
    email, role = text(form, "username").strip(), text(form, "role")

    async def go() -> Any:
        req = TeamAdd.model_validate({"username": email, "role": role or None})
        added = await products.add_team_member(pc.db, pc.ctx.settings, actor=pc.ctx.me,
                                               product=pc.product, req=req, ip=pc.ctx.ip)
        return added.invitation

    inv, errors = await attempt(pc.db, ("username", "role"), go)
    if inv is None:
        return await _product_team(request, pc, status=400, invite_errors=errors,
                                   form={"username": email, "role": role})
    return redirect(f"/console/products/{pc.product.slug}/team",
                    flash=f"Invitation sent to {inv.email} as {inv.role}.")


@router.post("/console/products/{product}/team/{username}/role",
             summary="Change a product member's role")
async def product_change_role(username: str, request: Request,
                              pc: ProductCtx = Depends(ConsoleProductGuard("teams.users:update"))
                              ) -> Response:
    """Change a product member's product role."""
    form = await read_form(request)

    async def go() -> Any:
        req = TeamChange.model_validate({"role": text(form, "role")})
        return await products.update_team_member(
            pc.db, pc.ctx.settings, actor=pc.ctx.me, actor_role=pc.role, product=pc.product,
            username=username, req=req, ip=pc.ctx.ip)

    done, errors = await attempt(pc.db, ("role",), go)
    if done is None:
        return await _product_team(request, pc, status=400, member_errors=errors)
    return redirect(f"/console/products/{pc.product.slug}/team",
                    flash=f"{username}'s role changed.")


@router.post("/console/products/{product}/team/{username}/remove",
             summary="Remove a product member")
async def product_remove(username: str, request: Request,
                         pc: ProductCtx = Depends(ConsoleProductGuard("teams.users:remove"))
                         ) -> Response:
    """Take a person's product role away (organization roles are managed there)."""
    await read_form(request)
    _, errors = await attempt(pc.db, (), lambda: products.remove_team_member(
        pc.db, actor=pc.ctx.me, actor_role=pc.role, product=pc.product, username=username,
        ip=pc.ctx.ip))
    if errors:
        return await _product_team(request, pc, status=400, member_errors=errors)
    return redirect(f"/console/products/{pc.product.slug}/team",
                    flash=f"{username} was removed from the product.")


@router.post("/console/products/{product}/invitations/{invitation_id}/revoke",
             summary="Revoke a product invitation")
async def product_revoke(invitation_id: int, request: Request,
                         pc: ProductCtx = Depends(ConsoleProductGuard("teams.users:invite"))
                         ) -> Response:
    """Withdraw an invitation to this product's team."""
    await read_form(request)
    assert pc.role is not None

    async def go() -> Any:
        org = await orgs.get_org(pc.db, str(pc.product.org_id))
        assert org is not None
        return await orgs.revoke_invitation(pc.db, actor=pc.ctx.me, actor_role=pc.role,
                                            org=org, invitation_id=invitation_id,
                                            product_id=pc.product.id, ip=pc.ctx.ip)

    _, errors = await attempt(pc.db, (), go)
    if errors:
        return await _product_team(request, pc, status=400, member_errors=errors)
    return redirect(f"/console/products/{pc.product.slug}/team", flash="Invitation revoked.")


# --- API users -----------------------------------------------------------------------------

async def _api_users(request: Request, pc: ProductCtx, *, status: int = 200,
                     errors: FormErrors | None = None, created: Any = None,
                     token: str | None = None, form: dict[str, Any] | None = None
                     ) -> Response:
    team = await products.product_team(pc.db, pc.product)
    return await page(request, "team/api_users.html", status=status, product=pc.product,
                      role=pc.role, title=f"API users · {pc.product.name}", section="api-users",
                      users=team.api_users, scopes=sorted(API_USER_SCOPES),
                      errors=errors or FormErrors(), created=created, token=token,
                      form=form or {})


@router.get("/console/products/{product}/api-users", summary="API users")
async def api_users(request: Request,
                    pc: ProductCtx = Depends(ConsoleProductGuard("teams.users:list"))
                    ) -> Response:
    """Programmatic members of the product with explicit scopes."""
    return await _api_users(request, pc)


@router.post("/console/products/{product}/api-users", summary="Create an API user")
async def create_api_user(request: Request,
                          pc: ProductCtx = Depends(ConsoleProductGuard("teams.users:invite"))
                          ) -> Response:
    """An API user with the checked scopes; its token is shown once."""
    form = await read_form(request)
    name, scopes = text(form, "friendly_name").strip(), values(form, "scopes")

    async def go() -> Any:
        req = TeamAdd.model_validate({"friendly_name": name or None, "scopes": scopes})
        return await products.create_api_user(pc.db, pc.ctx.settings, actor=pc.ctx.me,
                                              product=pc.product,
                                              friendly_name=req.friendly_name,
                                              scopes=req.scopes, ip=pc.ctx.ip)

    added, errors = await attempt(pc.db, ("friendly_name", "scopes"), go)
    if added is None:
        return await _api_users(request, pc, status=400, errors=errors,
                                form={"friendly_name": name, "scopes": scopes})
    user, issued = added
    return await _api_users(request, pc, created=user, token=issued.access_token)


@router.post("/console/products/{product}/api-users/{username}/token",
             summary="Regenerate an API user's token")
async def rotate_api_user(username: str, request: Request,
                          pc: ProductCtx = Depends(ConsoleProductGuard("teams.users:update"))
                          ) -> Response:
    """Revoke the API user's tokens and show its new one, once."""
    await read_form(request)
    done, errors = await attempt(pc.db, (), lambda: products.rotate_api_user_token(
        pc.db, pc.ctx.settings, actor=pc.ctx.me, product=pc.product, username=username,
        ip=pc.ctx.ip))
    if done is None:
        return await _api_users(request, pc, status=400, errors=errors)
    user, issued = done
    return await _api_users(request, pc, created=user, token=issued.access_token)


@router.post("/console/products/{product}/api-users/{username}/delete",
             summary="Delete an API user")
async def delete_api_user(username: str, request: Request,
                          pc: ProductCtx = Depends(ConsoleProductGuard("teams.users:remove"))
                          ) -> Response:
    """Delete the API user and its tokens."""
    await read_form(request)
    _, errors = await attempt(pc.db, (), lambda: products.remove_team_member(
        pc.db, actor=pc.ctx.me, actor_role=pc.role, product=pc.product, username=username,
        ip=pc.ctx.ip))
    if errors:
        return await _api_users(request, pc, status=400, errors=errors)
    return redirect(f"/console/products/{pc.product.slug}/api-users",
                    flash="API user deleted.")
