"""OrgGuard: resolve ``{org}`` (id or slug) and check the caller's org-scope role."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.deps import Ctx
from corral.auth.guards import Guard, check_tenant
from corral.auth.models import Membership
from corral.auth.policy import Role, api_users_not_allowed, check_role
from corral.auth.subject import Subject
from corral.kit.errors import NotFound
from corral.orgs.models import Organization
from corral.orgs.service import get_org


@dataclass
class OrgCtx:
    ctx: Ctx
    org: Organization
    role: Role

    @property
    def db(self) -> AsyncSession:
        return self.ctx.db


async def org_role(db: AsyncSession, user_id: int, org_id: int) -> Role | None:
    row = (await db.execute(select(Membership.role).where(
        Membership.user_id == user_id, Membership.org_id == org_id,
        Membership.product_id.is_(None)))).scalar_one_or_none()
    return Role.parse(row) if row else None


async def authorize_org(db: AsyncSession, subject: Subject, org: Organization,
                        permission: str) -> Role:
    if subject.kind != "user":
        raise api_users_not_allowed()
    assert subject.user_id is not None
    role = check_role(await org_role(db, subject.user_id, org.id), permission, what="Organization")
    await check_tenant(db, org.id, permission)  # e.g. billing: subscription inactive
    return role


class OrgGuard(Guard):
    """Depend on ``OrgGuard("orgs.team:list")`` in a route with an ``{org}`` path part."""

    scope = "org"
    path_param = "org"

    async def __call__(self, org: str, request: Request) -> OrgCtx:
        return await self.resolve(await self.context(request), org)

    async def resolve(self, ctx: Ctx, org: str) -> OrgCtx:
        """The organization ``org`` (id or slug) if the caller may do ``permission`` in it."""
        row = await get_org(ctx.db, org)
        if row is None:
            raise NotFound("Organization not found")
        role = await authorize_org(ctx.db, ctx.me, row, self.permission)
        return OrgCtx(ctx=ctx, org=row, role=role)
