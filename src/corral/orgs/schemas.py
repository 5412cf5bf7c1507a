"""Request and answer models of organizations, their team and invitations."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from corral.kit.body import RequestModel
from corral.kit.responses import Answer, OkAnswer

# --- requests ------------------------------------------------------------------------------


class OrgName(RequestModel):
    """Create (or rename) an organization."""

    name: str = Field(max_length=100)


class TeamInvite(RequestModel):
    """Invite a person; API users belong to a product (``friendly_name``/``scopes`` are
    refused here)."""

    ERROR_CODES = {"role": "invalid_role"}

    username: str = Field(max_length=254, description="The person's e-mail address")
    role: str | None = Field(None, max_length=40, description="Default: View-only")
    friendly_name: Any = Field(None, description="Refused: API users belong to a product")
    scopes: Any = Field(None, description="Refused: API users belong to a product")


class RoleChange(RequestModel):
    ERROR_CODES = {"role": "invalid_role"}

    role: str = Field(max_length=40, description="Owner, Administrator, Developer, "
                      "Support or View-only")


class InvitationCode(RequestModel):
    code: str = Field(max_length=200, description="The code from the invitation e-mail")


# --- answers -------------------------------------------------------------------------------


class OrgSubscription(Answer):
    plan: str
    status: str


class Org(Answer):
    id: int
    name: str
    slug: str
    personal: bool
    role: str | None
    created_at: str | None
    subscription_status: str | None = Field(
        None, description="Set on a locked or inactive organization in lists")
    subscription: OrgSubscription | None = Field(
        None, description="In lists: the plan and status of its subscription (null: none)")


class OrgAnswer(OkAnswer):
    organization: Org


class OrgsAnswer(OkAnswer):
    organizations: list[Org]


class TeamRole(Answer):
    id: str
    name: str


class TeamMember(Answer):
    id_: str = Field(alias="_id")
    username: str
    role: TeamRole | None = None
    no_mfa: bool | None = None
    scim_provisioned: bool | None = None
    no_password: bool | None = None


class TeamAnswer(OkAnswer):
    team: list[TeamMember]


class Invited(Answer):
    username: str
    role: str
    id: int


class InvitedAnswer(OkAnswer):
    invited: Invited


class RoleUpdated(Answer):
    username: str
    role: str


class RoleUpdatedAnswer(OkAnswer):
    updated: RoleUpdated


class Named(Answer):
    id: int
    name: str
    slug: str


class Invitation(Answer):
    id: int
    username: str
    role: str
    status: str
    organization: Named | None
    product: Named | None
    invited_by: str | None
    created_at: str | None
    expires_at: str | None
    expired: bool


class InvitationsAnswer(OkAnswer):
    invitations: list[Invitation]


class Membership(Answer):
    org_id: int | None
    product_id: int | None
    role: str


class MembershipAnswer(OkAnswer):
    membership: Membership
