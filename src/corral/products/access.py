"""ProductGuard: resolve ``{product}`` (id or slug) and check the caller's permission on it."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.deps import Ctx, auth_ctx
from corral.auth.guards import Guard, check_tenant
from corral.auth.models import Membership
from corral.auth.policy import Role, check_role, check_scopes
from corral.auth.subject import Subject
from corral.kit.errors import NotFound
from corral.products.models import Product


@dataclass
class ProductCtx:
    ctx: Ctx
    product: Product
    role: Role | None  # None for API users and client tokens (scopes decide)

    @property
    def db(self) -> AsyncSession:
        return self.ctx.db


async def get_product(db: AsyncSession, key: str) -> Product | None:
    """A product by numeric id or slug."""
    if key.isdigit():
        product = await db.get(Product, int(key))
        if product is not None:
            return product
    return (await db.execute(select(Product).where(Product.slug == key.lower()))).scalar_one_or_none()


async def product_role(db: AsyncSession, user_id: int, product: Product) -> Role | None:
    """The strongest of the caller's org-scope and product-scope roles for ``product``."""
    rows = (await db.execute(select(Membership.role).where(
        Membership.user_id == user_id,
        or_(
            (Membership.org_id == product.org_id) & Membership.product_id.is_(None),
            Membership.product_id == product.id,
        ),
    ))).scalars().all()
    roles = [Role.parse(r) for r in rows]
    return max(roles) if roles else None


async def authorize_product(db: AsyncSession, subject: Subject, product: Product,
                            permission: str) -> Role | None:
    if subject.kind in ("api", "client", "customer"):
        if subject.product_id != product.id:
            raise NotFound("Product not found")
        check_scopes(subject.scopes, permission)
        await check_tenant(db, product.org_id, permission)  # e.g. billing: subscription inactive
        return None
    assert subject.user_id is not None
    role = check_role(await product_role(db, subject.user_id, product), permission, what="Product")
    await check_tenant(db, product.org_id, permission)
    return role


class ProductGuard(Guard):
    """Depend on ``ProductGuard("devices:list")`` in a route with a ``{product}`` path part."""

    scope = "product"
    path_param = "product"

    async def __call__(self, product: str, ctx: Ctx = Depends(auth_ctx)) -> ProductCtx:
        row = await get_product(ctx.db, product)
        if row is None:
            raise NotFound("Product not found")
        role = await authorize_product(ctx.db, ctx.me, row, self.permission)
        return ProductCtx(ctx=ctx, product=row, role=role)
