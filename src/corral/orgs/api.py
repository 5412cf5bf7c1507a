"""/v1/orgs (organizations, their team and invitations) and the invitee's side of invitations."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from corral.auth.deps import AuthCtx
from corral.auth.policy import Role
from corral.kit.body import as_str, read_body
from corral.kit.errors import BadRequest
from corral.kit.responses import ok
from corral.orgs import service
from corral.orgs.access import OrgCtx, OrgGuard

router = APIRouter(tags=["orgs"])

# particle-api-js inviteTeamMember sends only `username`; the least privileged role then
DEFAULT_INVITE_ROLE = Role.VIEW_ONLY


# --- organizations --------------------------------------------------------------------------

@router.get("/v1/orgs", summary="List my organizations")
async def list_orgs(ctx: AuthCtx) -> dict[str, Any]:
    """Organizations where the caller holds an organization-scope role, with that role; one
    whose subscription is locked or inactive is kept (its billing page stays reachable) and
    marked `subscription_status`."""
    return ok(organizations=await service.my_orgs_json(ctx.db, actor=ctx.me))


@router.post("/v1/orgs", status_code=201, summary="Create an organization")
async def create_org(request: Request, ctx: AuthCtx) -> dict[str, Any]:
    """Create an organization named `name`; the caller becomes its Owner."""
    body = await read_body(request)
    name = as_str(body.get("name"), field="name", required=True, max_len=100)
    org = await service.new_org(ctx.db, actor=ctx.me, name=name, ip=ctx.ip)
    return ok(organization=service.org_json(org, Role.OWNER))


@router.get("/v1/orgs/{org}", summary="Get an organization")
async def get_org(oc: OrgCtx = Depends(OrgGuard("orgs:get"))) -> dict[str, Any]:
    """The organization (by id or slug) and the caller's role in it."""
    return ok(organization=service.org_json(oc.org, oc.role))


@router.put("/v1/orgs/{org}", summary="Rename an organization")
async def update_org(request: Request,
                     oc: OrgCtx = Depends(OrgGuard("orgs:update"))) -> dict[str, Any]:
    """Change the organization's `name`; its slug stays the same."""
    body = await read_body(request)
    name = as_str(body.get("name"), field="name", required=True, max_len=100)
    org = await service.rename_org(oc.db, actor=oc.ctx.me, org=oc.org, name=name, ip=oc.ctx.ip)
    return ok(organization=service.org_json(org, oc.role))


@router.delete("/v1/orgs/{org}", summary="Delete an organization")
async def delete_org(oc: OrgCtx = Depends(OrgGuard("orgs:remove"))) -> dict[str, Any]:
    """Delete a shared organization that has no products (Owner only)."""
    await service.delete_org(oc.db, actor=oc.ctx.me, org=oc.org, ip=oc.ctx.ip)
    return ok()


# --- team -------------------------------------------------------------------------------------

@router.get("/v1/orgs/{org}/team", summary="List the organization's team")
async def list_team(oc: OrgCtx = Depends(OrgGuard("orgs.team:list"))) -> dict[str, Any]:
    """Organization-scope members and their roles."""
    rows = await service.list_team(oc.db, org_id=oc.org.id, product_id=None)
    return ok(team=[service.team_member_json(u, m) for u, m in rows])


@router.post("/v1/orgs/{org}/team", summary="Invite a team member")
async def invite_member(request: Request,
                        oc: OrgCtx = Depends(OrgGuard("orgs.team:invite"))) -> dict[str, Any]:
    """Invite `username` (an e-mail address) with `role` (default View-only); e-mails a code."""
    body = await read_body(request)
    if "friendly_name" in body or "scopes" in body:
        raise BadRequest("API users belong to a product; create them with "
                         "POST /v1/products/:product/team", code="invalid_request")
    role = service.parse_role(body.get("role"), default=DEFAULT_INVITE_ROLE)
    email = as_str(body.get("username"), field="username", required=True, max_len=254)
    inv = await service.invite(oc.db, oc.ctx.settings, inviter=oc.ctx.me, org=oc.org,
                               product_id=None, product_name=None, email=email or "",
                               role=role, ip=oc.ctx.ip)
    return ok(invited={"username": inv.email, "role": inv.role, "id": inv.id})


@router.put("/v1/orgs/{org}/team/{username}", summary="Change a team member's role")
@router.post("/v1/orgs/{org}/team/{username}", summary="Change a team member's role (POST)")
async def update_member(username: str, request: Request,
                        oc: OrgCtx = Depends(OrgGuard("orgs.team:update"))) -> dict[str, Any]:
    """Give the member `username` the role `role`."""
    role = service.parse_role((await read_body(request)).get("role"))
    member = await service.change_role(oc.db, actor=oc.ctx.me, actor_role=oc.role, org=oc.org,
                                       product_id=None, username=username, role=role,
                                       ip=oc.ctx.ip)
    return ok(updated={"username": username.strip().lower(), "role": member.role})


@router.delete("/v1/orgs/{org}/team/{username}", summary="Remove a team member")
async def remove_member(username: str,
                        oc: OrgCtx = Depends(OrgGuard("orgs.team:remove"))) -> dict[str, Any]:
    """Take `username` off the organization's team."""
    await service.remove_member(oc.db, actor=oc.ctx.me, actor_role=oc.role, org=oc.org,
                                product_id=None, username=username, ip=oc.ctx.ip)
    return ok()


# --- invitations: the organization's side -------------------------------------------------

@router.get("/v1/orgs/{org}/invitations", summary="List pending invitations")
async def list_invitations(
        oc: OrgCtx = Depends(OrgGuard("orgs.team:invite"))) -> dict[str, Any]:
    """Pending invitations to the organization and its products (expired ones flagged)."""
    rows = await service.list_invitations(oc.db, org_id=oc.org.id, every_scope=True)
    return ok(invitations=await service.invitations_json(oc.db, rows))


@router.delete("/v1/orgs/{org}/invitations/{invitation_id}", summary="Revoke an invitation")
async def revoke_invitation(invitation_id: int,
                            oc: OrgCtx = Depends(OrgGuard("orgs.team:invite"))) -> dict[str, Any]:
    """Withdraw a pending invitation; its code stops working."""
    await service.revoke_invitation(oc.db, actor=oc.ctx.me, actor_role=oc.role, org=oc.org,
                                    invitation_id=invitation_id, every_scope=True, ip=oc.ctx.ip)
    return ok()


# --- invitations: the invitee's side -----------------------------------------------------

@router.get("/v1/user/invitations", summary="List my invitations")
async def my_invitations(ctx: AuthCtx) -> dict[str, Any]:
    """Pending, unexpired invitations addressed to the caller."""
    rows = await service.user_invitations(ctx.db, actor=ctx.me)
    return ok(invitations=await service.invitations_json(ctx.db, rows))


def _membership_json(member: Any) -> dict[str, Any]:
    return {"org_id": member.org_id, "product_id": member.product_id, "role": member.role}


@router.post("/v1/user/invitations/{invitation_id}/accept", summary="Accept an invitation")
async def accept_invitation(invitation_id: int, ctx: AuthCtx) -> dict[str, Any]:
    """Join the team the invitation (addressed to the caller) names."""
    member = await service.accept_invitation(ctx.db, actor=ctx.me, invitation_id=invitation_id,
                                             ip=ctx.ip)
    return ok(membership=_membership_json(member))


@router.post("/v1/user/invitations/{invitation_id}/decline", summary="Decline an invitation")
async def decline_invitation(invitation_id: int, ctx: AuthCtx) -> dict[str, Any]:
    """Turn down an invitation addressed to the caller."""
    await service.decline_invitation(ctx.db, actor=ctx.me, invitation_id=invitation_id,
                                     ip=ctx.ip)
    return ok()


@router.post("/v1/invitations/accept", summary="Accept an invitation by its code")
async def accept_by_code(request: Request, ctx: AuthCtx) -> dict[str, Any]:
    """Accept with the `code` from the invitation e-mail (as the invited user)."""
    code = as_str((await read_body(request)).get("code"), field="code", required=True,
                  max_len=200)
    member = await service.accept_invitation(ctx.db, actor=ctx.me, code=code, ip=ctx.ip)
    return ok(membership=_membership_json(member))
