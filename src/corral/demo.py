"""Demo data for ``corral serve --demo``: an owner account, an organization, a product.

:func:`ensure_demo` is idempotent: each piece is looked up first and only created when
missing, so running it again changes nothing. Each piece is one ``_ensure_*`` step; later
pieces (a demo fleet of devices) are further steps that build on :class:`DemoInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.accounts import service as accounts
from corral.auth.models import User
from corral.auth.subject import Subject
from corral.db.session import commit
from corral.orgs import service as orgs
from corral.orgs.models import Organization
from corral.products import service as products
from corral.products.models import Product
from corral.settings import Settings

DEMO_ORG = "Demo Org"
DEMO_PRODUCT = "Demo Product"
DEMO_PLATFORM_ID = 12  # Argon
DEMO_DESCRIPTION = "Created by `corral serve --demo`."


@dataclass
class DemoInfo:
    username: str
    password: str
    org_id: int
    org_slug: str
    product_id: int
    product_slug: str
    created: list[str] = field(default_factory=list)  # what this run added ("user", ...)


async def ensure_demo(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
                      ) -> DemoInfo:
    """Make sure the demo owner, "Demo Org" and "Demo Product" exist (one transaction)."""
    created: list[str] = []
    async with sessionmaker() as db:
        user = await _ensure_user(db, settings, created)
        # the steps below act as the demo owner (audit entries name them), without a token
        owner = Subject(kind="user", token_id=0, client="corral-demo", user_id=user.id,
                        username=user.username)
        org = await _ensure_org(db, owner, created)
        product = await _ensure_product(db, owner, org, created)
        await commit(db)
    return DemoInfo(username=user.username, password=settings.demo_password, org_id=org.id,
                    org_slug=org.slug, product_id=product.id, product_slug=product.slug,
                    created=created)


async def _ensure_user(db: AsyncSession, settings: Settings, created: list[str]) -> User:
    user = await accounts.find_user(db, accounts.normalize_email(settings.demo_username))
    if user is None:
        user = await accounts.create_user(db, settings, username=settings.demo_username,
                                          password=settings.demo_password,
                                          account_info={"first_name": "Demo"})
        created.append("user")
    return user


async def _ensure_org(db: AsyncSession, owner: Subject, created: list[str]) -> Organization:
    for org, _role in await orgs.list_orgs(db, actor=owner):
        if not org.personal and org.name == DEMO_ORG:
            return org
    created.append("org")
    return await orgs.new_org(db, actor=owner, name=DEMO_ORG, ip=None)  # type: ignore[arg-type]


async def _ensure_product(db: AsyncSession, owner: Subject, org: Organization,
                          created: list[str]) -> Product:
    for view in await products.org_products(db, org):
        if view.product.name_key == DEMO_PRODUCT.lower():
            return view.product
    created.append("product")
    body = {"product": {"name": DEMO_PRODUCT, "platform_id": DEMO_PLATFORM_ID,
                        "description": DEMO_DESCRIPTION}}
    view = await products.create_product(db, actor=owner, org=org, body=body,
                                         ip=None)  # type: ignore[arg-type]
    return view.product
