"""ProductGuard: resolve ``{product}`` (id or slug) and check the caller's permission on it."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import Row, Select, and_, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from corral.auth.cache import TenantCache
from corral.auth.deps import Ctx
from corral.auth.guards import Guard, check_tenant, tenant_checks_version, tenant_facts
from corral.auth.models import Membership
from corral.auth.policy import Role, check_role, check_scopes
from corral.auth.subject import Subject
from corral.kit.errors import NotFound
from corral.kit.ids import path_id
from corral.orgs.models import Organization
from corral.products.models import Product


@dataclass
class ProductCtx:
    ctx: Ctx
    product: Product
    role: Role | None  # None for API users and client tokens (scopes decide)
    org_slug: str | None = None  # the product's organization's, when the guard read it

    @property
    def db(self) -> AsyncSession:
        return self.ctx.db


async def get_product(db: AsyncSession, key: str) -> Product | None:
    """A product by numeric id or slug."""
    if (pid := path_id(key)) is not None:
        product = await db.get(Product, pid)
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


async def load_product(db: AsyncSession, key: str, subject: Subject
                       ) -> tuple[Product, Role | None, list[Any]] | None:
    """The product ``key`` (id or slug), the caller's strongest role on it (people) and the
    tenant facts (:func:`corral.auth.guards.tenant_facts`), in one query; None if there is
    no such product."""
    found = await load_product_and_org(db, key, subject)
    return None if found is None else found[:3]


async def load_product_and_org(db: AsyncSession, key: str, subject: Subject
                               ) -> tuple[Product, Role | None, list[Any], str] | None:
    """:func:`load_product`, and the slug of the product's organization (read in the same
    query: a product's answer names it)."""
    n = path_id(key)  # ASCII digits in the column's range (kit.ids: one rule for ids)
    people = is_person(subject)
    q, nfacts = _product_statement(n is not None, people)
    params: dict[str, Any] = {"slug": key.lower()}
    if n is not None:
        params["pid"] = n
    if people:
        params[ROLE_USER] = subject.user_id
    rows = (await db.execute(q, params)).all()
    if not rows:
        return None
    # an id wins over a slug that happens to be the same digits (as get_product does)
    chosen = next((r[0] for r in rows if r[0].id == n), rows[0][0])
    mine = [r for r in rows if r[0] is chosen]
    return (chosen, strongest(mine, people), list(mine[0][1:1 + nfacts]),
            mine[0][1 + nfacts] or "")


READS = frozenset({"GET", "HEAD"})  # the requests the tenant cache answers


def tenant_cache(ctx: Ctx) -> TenantCache | None:
    """The process's tenant cache if it may answer this request: on, and a read."""
    if ctx.request.method not in READS:
        return None
    cache: TenantCache | None = getattr(ctx.runtime, "tenant_cache", None)
    return cache if cache is not None and cache.enabled else None


async def cached_product_and_org(ctx: Ctx, key: str, subject: Subject
                                 ) -> tuple[Product, Role | None, list[Any], str] | None:
    """:func:`load_product_and_org`, answered from the tenant cache on a read when it holds
    the caller and ``key`` (corral.auth.cache says when it is cleared). The product is
    merged into the request's session without a query (``load=False``): the route gets
    an instance of its own, as it would from the query."""
    cache = tenant_cache(ctx)
    if cache is None:
        return await load_product_and_org(ctx.db, key, subject)
    people = is_person(subject)
    # an API user's, a client's or a customer's read does not depend on who asks (the
    # guard then compares the product with the token's); the facts are those of the tenant
    # checks registered when the entry was read
    ck = (subject.user_id if people else None, key, tenant_checks_version())
    hit = cache.get(ck)
    if hit is not None:
        # load=False sends no SQL and flushes nothing: the synchronous call needs no
        # greenlet (the async wrapper's hand-off cost a quarter of the merge)
        product: Product = ctx.db.sync_session.merge(hit[0], load=False)
        return product, hit[1], hit[2], hit[3]
    generation = cache.generation
    found = await load_product_and_org(ctx.db, key, subject)
    if found is not None:
        cache.put(ck, (_detached_copy(found[0]), found[1], found[2], found[3]), None,
                  generation)
    return found


def _detached_copy(product: Product) -> Product:
    """A copy of ``product`` belonging to no session (what a cache keeps: the request that
    read it goes on using its own)."""
    copy = Product(**{a.key: deepcopy(getattr(product, a.key))
                      for a in Product.__mapper__.column_attrs})
    make_transient_to_detached(copy)
    return copy


# The guards' statements, built once per shape and reused with the request's values as
# parameters: building one (coercing every comparison, the tenant facts' subqueries) cost
# more CPU than compiling and running it, and a reused statement object also keeps its
# compiled-cache key. Keyed by the shape and the tenant checks' version (a check
# registered later rebuilds them).
_STATEMENTS: dict[tuple[Any, ...], tuple[Select[Any], int]] = {}
ROLE_USER = "role_user_id"  # the bound parameter of the caller, in role_columns' join


def prebuilt(key: tuple[Any, ...], build: Any) -> tuple[Select[Any], int]:
    """The statement ``build()`` made for ``key`` (with the tenant checks' version), built
    on first use: ``build`` returns it and the number of tenant-fact columns it selects."""
    full = (*key, tenant_checks_version())
    found = _STATEMENTS.get(full)
    if found is None:
        found = _STATEMENTS[full] = build()
    return found


def _product_statement(numeric: bool, people: bool) -> tuple[Select[Any], int]:
    def build() -> tuple[Select[Any], int]:
        where = Product.slug == bindparam("slug")
        if numeric:
            where = or_(Product.id == bindparam("pid"), where)
        facts = tenant_facts(Product.org_id)
        org_slug = (select(Organization.slug).where(Organization.id == Product.org_id)
                    .scalar_subquery())
        q = select(Product, *facts, org_slug).where(where)
        return (role_columns(q) if people else q), len(facts)
    return prebuilt(("product", numeric, people), build)


def is_person(subject: Subject) -> bool:
    return subject.kind == "user" and subject.user_id is not None


def role_columns(q: Select[Any]) -> Select[Any]:
    """``q`` (which selects ``Product``) with a last column holding each of the caller's
    org-scope and product-scope roles on that product (one row per membership, NULL for
    none); the caller's user id is the parameter ``ROLE_USER``."""
    return q.add_columns(Membership.role).outerjoin(Membership, and_(
        Membership.user_id == bindparam(ROLE_USER),
        or_(and_(Membership.org_id == Product.org_id, Membership.product_id.is_(None)),
            Membership.product_id == Product.id)))


def strongest(rows: Sequence[Row[Any]], people: bool) -> Role | None:
    """The strongest role in the last column of :func:`role_columns`' rows."""
    roles = [Role.parse(r[-1]) for r in rows if people and r[-1] is not None]
    return max(roles) if roles else None


async def authorize_loaded(db: AsyncSession, subject: Subject, product: Product,
                           role: Role | None, facts: list[Any], permission: str) -> Role | None:
    """:func:`authorize_product` on what :func:`load_product` read (no further query)."""
    if subject.kind in ("api", "client", "customer"):
        if subject.product_id != product.id:
            raise NotFound("Product not found")
        check_scopes(subject.scopes, permission)
        await check_tenant(db, product.org_id, permission, facts)
        return None
    checked = check_role(role, permission, what="Product")
    await check_tenant(db, product.org_id, permission, facts)
    return checked


class ProductGuard(Guard):
    """Depend on ``ProductGuard("devices:list")`` in a route with a ``{product}`` path part."""

    scope = "product"
    path_param = "product"

    async def __call__(self, product: str, request: Request) -> ProductCtx:
        return await self.resolve(await self.context(request), product)

    async def resolve(self, ctx: Ctx, product: str) -> ProductCtx:
        """The product ``product`` (id or slug) if the caller may do ``permission`` on it
        (the console's guards call this with their own context)."""
        me = ctx.me
        found = await cached_product_and_org(ctx, product, me)
        if found is None:
            raise NotFound("Product not found")
        row, role, facts, org_slug = found
        role = await authorize_loaded(ctx.db, me, row, role, facts, self.permission)
        return ProductCtx(ctx=ctx, product=row, role=role, org_slug=org_slug)
