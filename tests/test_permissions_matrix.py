"""The tenancy and role matrix: every guarded route x every role x another tenant.

Routes join by declaring a Guard (``ProductGuard(...)`` / ``OrgGuard(...)``); nothing here
lists routes by hand. For each (route, persona) a fresh world is built and one request is
made with placeholder path values and an empty JSON body. The policy must answer:

* no role in the tenant            -> 404 "<Product|Organization> not found"
* role/scopes lacking permission   -> 403 (``required`` names the permission)
* allowed                          -> anything but those two answers, 401 or a 5xx
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.routing import APIRoute
from sqlalchemy.ext.asyncio import AsyncSession

from corral.accounts.service import issue_token
from corral.auth.guards import Guard
from corral.auth.models import Membership, User
from corral.auth.policy import API_USER_SCOPES, Role, role_allows
from corral.devices.models import Device
from corral.orgs.models import Organization
from corral.products.models import Product
from corral.settings import Settings
from corral.web.app import routers
from dbreset import truncate_all


def _guards(dependant: Any) -> list[Guard]:
    found = []
    for dep in dependant.dependencies:
        if isinstance(dep.call, Guard):
            found.append(dep.call)
        found.extend(_guards(dep))
    return found


def guarded_routes() -> list[tuple[str, str, Guard]]:
    out = []
    for router in routers():
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            guards = _guards(route.dependant)
            if not guards:
                continue
            assert len({(g.scope, g.permission) for g in guards}) == 1, route.path
            for method in sorted(route.methods - {"HEAD"}):
                out.append((method, route.path, guards[0]))
    return out


ROUTES = guarded_routes()

PERSONAS = ["org:Owner", "org:Administrator", "org:Developer", "org:Support", "org:View-only",
            "product:Administrator", "product:View-only", "outsider", "api:all", "api:products:get"]


DEVICE_ID = "0123456789abcdef01234567"  # a device of the tenant's product


@dataclass
class World:
    org: Organization
    product: Product
    tokens: dict[str, str]

    @property
    def token(self) -> str:  # the Owner's (used by other tests)
        return self.tokens["org:Owner"]


async def build_world(db: AsyncSession, settings: Settings, persona: str | None = None) -> World:
    """Tenant A (org, product "widget", one device) with one caller per persona, and tenant B
    (another org and product) for the outsider. ``persona`` is accepted for callers that want
    just one; every persona's token is in ``World.tokens``."""
    n = 0

    def user(kind: str = "user", **kw: Any) -> User:
        nonlocal n
        n += 1
        u = User(username=f"caller{n}@matrix.test", password_hash=None, kind=kind, **kw)
        db.add(u)
        return u

    owner = user()
    owner.username = "owner@matrix.test"
    org = Organization(name="Tenant A", slug="tenant-a")
    other_org = Organization(name="Tenant B", slug="tenant-b")
    db.add_all([org, other_org])
    await db.flush()
    product = Product(org_id=org.id, name="Widget", name_key="widget", slug="widget")
    other_product = Product(org_id=other_org.id, name="Gadget", name_key="gadget", slug="gadget")
    db.add_all([product, other_product])
    await db.flush()
    db.add(Membership(user_id=owner.id, org_id=org.id, role="Owner"))
    db.add(Device(id=DEVICE_ID, product_id=product.id, platform_id=12, name="matrix-device"))

    callers: dict[str, User] = {}
    for p in PERSONAS if persona is None else [persona]:
        kind, _, rest = p.partition(":")
        if kind == "org":
            caller = owner if rest == "Owner" else user()
            await db.flush()
            if caller is not owner:
                db.add(Membership(user_id=caller.id, org_id=org.id, role=rest))
        elif kind == "product":
            caller = user()
            await db.flush()
            db.add(Membership(user_id=caller.id, org_id=org.id, product_id=product.id, role=rest))
        elif kind == "outsider":
            caller = user()
            await db.flush()
            db.add(Membership(user_id=caller.id, org_id=other_org.id, role="Owner"))
            db.add(Membership(user_id=caller.id, org_id=other_org.id,
                              product_id=other_product.id, role="Owner"))
        else:  # API user of the product
            scopes = sorted(API_USER_SCOPES) if rest == "all" else [rest]
            caller = user(kind="api", api_product_id=product.id, api_scopes=scopes,
                          friendly_name="matrix")
            await db.flush()
        callers[p] = caller
    if "org:Owner" not in callers:
        callers["org:Owner"] = owner
    tokens = {p: issue_token(db, settings, user_id=u.id, client="matrix",
                             expires_at=None).access_token for p, u in callers.items()}
    await db.commit()
    return World(org=org, product=product, tokens=tokens)


def expected(persona: str, guard: Guard) -> str:
    kind, _, rest = persona.partition(":")
    perm = guard.permission
    if kind == "outsider":
        return "missing"
    if kind == "api":
        if guard.scope == "org":
            return "denied"
        scopes = API_USER_SCOPES if rest == "all" else {rest}
        return "allowed" if perm in scopes else "denied"
    if kind == "product" and guard.scope == "org":
        return "missing"
    return "allowed" if role_allows(Role.parse(rest), perm) else "denied"


def fill(path: str, world: World) -> str:
    path = path.replace("{product}", world.product.slug).replace("{org}", world.org.slug)
    path = path.replace("{device_id}", DEVICE_ID)
    return re.sub(r"\{[^}]+\}", "matrix-placeholder", path)


@pytest.mark.parametrize(("method", "path", "guard"), ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in ROUTES])
async def test_route_matrix(app, client, database_url, method, path, guard):
    world: World | None = None
    for persona in PERSONAS:
        if world is None:  # rebuilt only after a request that may have changed something
            await truncate_all(database_url)
            async with app.state.sessionmaker() as db:
                world = await build_world(db, app.state.settings)
        r = await client.request(method, fill(path, world), json={},
                                 headers={"Authorization": f"Bearer {world.tokens[persona]}"})
        want = expected(persona, guard)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        where = f"{persona} {method} {path} -> {r.status_code} {r.text[:300]}"
        assert r.status_code != 401 and r.status_code < 500, where
        missing = r.status_code == 404 and body.get("error_description") in (
            "Product not found", "Organization not found", "Device not found")
        denied = r.status_code == 403 and body.get("error") in ("forbidden", "unauthorized")
        if want == "missing":
            assert missing, where
        elif want == "denied":
            assert denied, where
        else:
            assert not missing and not denied, where
            if method != "GET":
                world = None


def test_matrix_covers_routes():
    """Sanity: the route walk finds the guarded routes (catches a silently empty matrix)."""
    paths = {p for _, p, _ in ROUTES}
    assert "/v1/products/{product}/audit" in paths and "/v1/orgs/{org}/audit" in paths


def test_every_tenant_route_is_guarded():
    """A route with {product}, {org} or {device_id} in its path must declare a Guard."""
    for router in routers():
        for route in router.routes:
            if isinstance(route, APIRoute) and any(
                    p in route.path for p in ("{product}", "{org}", "{device_id}")):
                assert _guards(route.dependant), f"unguarded tenant route {route.path}"


def test_permissions_doc_is_current():
    """docs/permissions.md is generated from the policy and routes; regenerate when this fails:
    ``python -m corral.web.permissions_doc > docs/permissions.md``."""
    from pathlib import Path

    from corral.web.permissions_doc import render

    doc = Path(__file__).resolve().parents[1] / "docs" / "permissions.md"
    assert doc.read_text() == render()
