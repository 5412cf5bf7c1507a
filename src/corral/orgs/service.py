"""Organization rules. Services never commit; the boundary does."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.models import Membership, User
from corral.auth.policy import Role
from corral.kit.errors import BadRequest, NotFound
from corral.kit.secrets import new_short_id
from corral.kit.text import slugify
from corral.orgs.models import Organization


async def unique_org_slug(db: AsyncSession, name: str) -> str:
    base = slugify(name)
    slug = base
    while (await db.execute(select(Organization.id).where(Organization.slug == slug))).first():
        slug = f"{base}-{new_short_id(3)}"
    return slug


def clean_org_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("Organization name is required", code="invalid_name")
    name = name.strip()
    if len(name) > 100:
        raise BadRequest("Organization name is at most 100 characters", code="invalid_name")
    return name


async def create_org(db: AsyncSession, owner: User, name: str, *, personal: bool = False
                     ) -> Organization:
    """Create an organization with ``owner`` as its Owner."""
    name = clean_org_name(name)
    org = Organization(name=name, slug=await unique_org_slug(db, name), personal=personal,
                       owner_user_id=owner.id if personal else None)
    db.add(org)
    await db.flush()
    db.add(Membership(user_id=owner.id, org_id=org.id, product_id=None, role=Role.OWNER.label))
    await db.flush()
    return org


async def personal_org(db: AsyncSession, user_id: int) -> Organization:
    org = (await db.execute(
        select(Organization).where(Organization.personal.is_(True),
                                   Organization.owner_user_id == user_id)
    )).scalar_one_or_none()
    if org is None:
        raise NotFound("Personal organization not found")
    return org


async def get_org(db: AsyncSession, key: str) -> Organization | None:
    """By numeric id or slug."""
    if key.isdigit():
        org = await db.get(Organization, int(key))
        if org is not None:
            return org
    return (await db.execute(select(Organization).where(Organization.slug == key.lower()))
            ).scalar_one_or_none()
