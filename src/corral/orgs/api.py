"""/v1/orgs (organizations, their team and invitations) and the invitee's side of invitations."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from corral.auth.deps import AuthCtx
from corral.auth.policy import Role
from corral.db.session import TransactionRoute
from corral.kit.body import body
from corral.kit.errors import BadRequest
from corral.kit.responses import OkAnswer, answers, ok
from corral.orgs import service
from corral.orgs.access import OrgCtx, OrgGuard
from corral.orgs.schemas import (
    InvitationCode,
    InvitationsAnswer,
    InvitedAnswer,
    MembershipAnswer,
    OrgAnswer,
    OrgName,
    OrgsAnswer,
    RoleChange,
    RoleUpdatedAnswer,
    TeamAnswer,
    TeamInvite,
)

router = APIRouter(tags=["orgs"], route_class=TransactionRoute)

# particle-api-js inviteTeamMember sends only `username`; the least privileged role then
DEFAULT_INVITE_ROLE = Role.VIEW_ONLY


# --- organizations --------------------------------------------------------------------------

@router.get("/v1/orgs", summary="List my organizations", responses=answers(OrgsAnswer, 403))
async def list_orgs(ctx: AuthCtx) -> dict[str, Any]:
    """Organizations where the caller holds an organization-scope role, with that role; one
    whose subscription is locked or inactive is kept (its billing page stays reachable) and
    marked `subscription_status`."""
    return ok(organizations=await service.my_orgs_json(ctx.db, actor=ctx.me))


@router.post("/v1/orgs", status_code=201, summary="Create an organization",
             responses=answers(OrgAnswer, 403, 409, status=201))
async def create_org(ctx: AuthCtx, req: OrgName = body(OrgName)) -> dict[str, Any]:
    """Create an organization named `name`; the caller becomes its Owner."""
    org = await service.new_org(ctx.db, actor=ctx.me, name=req.name, ip=ctx.ip)
    return ok(organization=service.org_json(org, Role.OWNER))


@router.get("/v1/orgs/{org}", summary="Get an organization", responses=answers(OrgAnswer))
async def get_org(oc: OrgCtx = Depends(OrgGuard("orgs:get"))) -> dict[str, Any]:
    """The organization (by id or slug) and the caller's role in it."""
    return ok(organization=service.org_json(oc.org, oc.role))


@router.put("/v1/orgs/{org}", summary="Rename an organization",
            responses=answers(OrgAnswer, 409))
async def update_org(oc: OrgCtx = Depends(OrgGuard("orgs:update")),
                     req: OrgName = body(OrgName)) -> dict[str, Any]:
    """Change the organization's `name`; its slug stays the same."""
    org = await service.rename_org(oc.db, actor=oc.ctx.me, org=oc.org, name=req.name,
                                   ip=oc.ctx.ip)
    return ok(organization=service.org_json(org, oc.role))


@router.delete("/v1/orgs/{org}", summary="Delete an organization",
               responses=answers(OkAnswer, 409))
async def delete_org(oc: OrgCtx = Depends(OrgGuard("orgs:remove"))) -> dict[str, Any]:
    """Delete a shared organization that has no products (Owner only)."""
    await service.delete_org(oc.db, actor=oc.ctx.me, org=oc.org, ip=oc.ctx.ip)
    return ok()


# --- team -------------------------------------------------------------------------------------

@router.get("/v1/orgs/{org}/team", summary="List the organization's team",
            responses=answers(TeamAnswer))
async def list_team(oc: OrgCtx = Depends(OrgGuard("orgs.team:list"))) -> dict[str, Any]:
    """Organization-scope members and their roles."""
    rows = await service.list_team(oc.db, org_id=oc.org.id, product_id=None)
    return ok(team=[service.team_member_json(u, m) for u, m in rows])


@router.post("/v1/orgs/{org}/team", summary="Invite a team member",
             responses=answers(InvitedAnswer, 409))
async def invite_member(oc: OrgCtx = Depends(OrgGuard("orgs.team:invite")),
                        req: TeamInvite = body(TeamInvite)) -> dict[str, Any]:
    """Invite `username` (an e-mail address) with `role` (default View-only); e-mails a code."""
    if req.sent("friendly_name", "scopes"):
        raise BadRequest("API users belong to a product; create them with "
                         "POST /v1/products/:product/team", code="invalid_request")
    role = service.parse_role(req.role, default=DEFAULT_INVITE_ROLE)
    inv = await service.invite(oc.db, oc.ctx.settings, inviter=oc.ctx.me, org=oc.org,
                               product_id=None, product_name=None, email=req.username,
                               role=role, ip=oc.ctx.ip)
    return ok(invited={"username": inv.email, "role": inv.role, "id": inv.id})


@router.put("/v1/orgs/{org}/team/{username}", summary="Change a team member's role",
            responses=answers(RoleUpdatedAnswer, 409))
@router.post("/v1/orgs/{org}/team/{username}", summary="Change a team member's role (POST)",
             responses=answers(RoleUpdatedAnswer, 409))
async def update_member(username: str, oc: OrgCtx = Depends(OrgGuard("orgs.team:update")),
                        req: RoleChange = body(RoleChange)) -> dict[str, Any]:
    """Give the member `username` the role `role`."""
    role = service.parse_role(req.role)
    member = await service.change_role(oc.db, actor=oc.ctx.me, actor_role=oc.role, org=oc.org,
                                       product_id=None, username=username, role=role,
                                       ip=oc.ctx.ip)
    return ok(updated={"username": username.strip().lower(), "role": member.role})


@router.delete("/v1/orgs/{org}/team/{username}", summary="Remove a team member",
               responses=answers(OkAnswer, 409))
async def remove_member(username: str,
                        oc: OrgCtx = Depends(OrgGuard("orgs.team:remove"))) -> dict[str, Any]:
    """Take `username` off the organization's team."""
    await service.remove_member(oc.db, actor=oc.ctx.me, actor_role=oc.role, org=oc.org,
                                product_id=None, username=username, ip=oc.ctx.ip)
    return ok()


# --- invitations: the organization's side -------------------------------------------------

@router.get("/v1/orgs/{org}/invitations", summary="List pending invitations",
            responses=answers(InvitationsAnswer))
async def list_invitations(
        oc: OrgCtx = Depends(OrgGuard("orgs.team:invite"))) -> dict[str, Any]:
    """Pending invitations to the organization and its products (expired ones flagged)."""
    rows = await service.list_invitations(oc.db, org_id=oc.org.id, every_scope=True)
    return ok(invitations=await service.invitations_json(oc.db, rows))


@router.delete("/v1/orgs/{org}/invitations/{invitation_id}", summary="Revoke an invitation",
               responses=answers(OkAnswer, 409))
async def revoke_invitation(invitation_id: int,
                            oc: OrgCtx = Depends(OrgGuard("orgs.team:invite"))) -> dict[str, Any]:
    """Withdraw a pending invitation; its code stops working."""
    await service.revoke_invitation(oc.db, actor=oc.ctx.me, actor_role=oc.role, org=oc.org,
                                    invitation_id=invitation_id, every_scope=True, ip=oc.ctx.ip)
    return ok()


# --- invitations: the invitee's side -----------------------------------------------------

@router.get("/v1/user/invitations", summary="List my invitations",
            responses=answers(InvitationsAnswer, 403))
async def my_invitations(ctx: AuthCtx) -> dict[str, Any]:
    """Pending, unexpired invitations addressed to the caller."""
    rows = await service.user_invitations(ctx.db, actor=ctx.me)
    return ok(invitations=await service.invitations_json(ctx.db, rows))


def _membership_json(member: Any) -> dict[str, Any]:
    return {"org_id": member.org_id, "product_id": member.product_id, "role": member.role}


@router.post("/v1/user/invitations/{invitation_id}/accept", summary="Accept an invitation",
             responses=answers(MembershipAnswer, 403, 404, 409))
async def accept_invitation(invitation_id: int, ctx: AuthCtx) -> dict[str, Any]:
    """Join the team the invitation (addressed to the caller) names."""
    member = await service.accept_invitation(ctx.db, actor=ctx.me, invitation_id=invitation_id,
                                             ip=ctx.ip)
    return ok(membership=_membership_json(member))


@router.post("/v1/user/invitations/{invitation_id}/decline", summary="Decline an invitation",
             responses=answers(OkAnswer, 403, 404, 409))
async def decline_invitation(invitation_id: int, ctx: AuthCtx) -> dict[str, Any]:
    """Turn down an invitation addressed to the caller."""
    await service.decline_invitation(ctx.db, actor=ctx.me, invitation_id=invitation_id,
                                     ip=ctx.ip)
    return ok()


@router.post("/v1/invitations/accept", summary="Accept an invitation by its code",
             responses=answers(MembershipAnswer, 403, 404, 409))
async def accept_by_code(ctx: AuthCtx,
                         req: InvitationCode = body(InvitationCode)) -> dict[str, Any]:
    """Accept with the `code` from the invitation e-mail (as the invited user)."""
    member = await service.accept_invitation(ctx.db, actor=ctx.me, code=req.code, ip=ctx.ip)
    return ok(membership=_membership_json(member))
