"""The tenancy and role matrix: every guarded route x every role x another tenant.

Routes join by declaring a Guard (``ProductGuard(...)`` / ``OrgGuard(...)``); nothing here
lists routes by hand. For each (route, persona) a fresh world is built and one request is
made with placeholder path values and an empty JSON body. The policy must answer:

* no role in the tenant            -> 404 "<Product|Organization> not found"
* role/scopes lacking permission   -> 403 (``required`` names the permission)
* allowed                          -> anything but those two answers, 401 or a 5xx
"""

from __future__ import annotations

import html.parser
import re
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.accounts.service import issue_token
from corral.auth.guards import Guard
from corral.auth.models import Customer, Membership, User
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


def guarded_routes(routers_: list[Any] | None = None) -> list[tuple[str, str, Guard]]:
    """``(method, path, guard)`` of every guarded route of ``routers_`` (default: /v1's)."""
    out = []
    for router in routers() if routers_ is None else routers_:
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
CUSTOMER_DEVICE_ID = "0123456789abcdef0123cccc"  # the customer persona's own device
QUARANTINED_ID = "0123456789abcdef0123eeee"  # waits in the tenant product's quarantine
# the console: people sign in, and customers of a product; API users cannot
CONSOLE_PERSONAS = ["org:Owner", "org:Administrator", "org:Developer", "org:Support",
                    "org:View-only", "product:Administrator", "product:View-only", "outsider",
                    "customer"]


@dataclass
class World:
    org: Organization
    product: Product
    tokens: dict[str, str]

    @property
    def token(self) -> str:  # the Owner's (used by other tests)
        return self.tokens["org:Owner"]


async def build_world(db: AsyncSession, settings: Settings, persona: str | None = None, *,
                      client: str = "matrix") -> World:
    """Tenant A (org, product "widget", one device) with one caller per persona, and tenant B
    (another org and product) for the outsider. ``persona`` is accepted for callers that want
    just one; every persona's token is in ``World.tokens`` (issued to ``client``). The persona
    ``customer`` is a customer of the product (with a device of its own claimed to it)."""
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
    db.add(Device(id=QUARANTINED_ID, product_id=product.id, platform_id=12, quarantined=True))

    callers: dict[str, User] = {}
    for p in dict.fromkeys(PERSONAS + CONSOLE_PERSONAS) if persona is None else [persona]:
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
        elif kind == "customer":
            customer = Customer(product_id=product.id, email="customer@matrix.test",
                                password_hash=None)
            db.add(customer)
            await db.flush()
            db.add(Device(id=CUSTOMER_DEVICE_ID, product_id=product.id, platform_id=12,
                          customer_id=customer.id, name="customer-device"))
            continue
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
    tokens = {p: issue_token(db, settings, user_id=u.id, client=client,
                             expires_at=None).access_token for p, u in callers.items()}
    found = (await db.execute(select(Customer).where(Customer.product_id == product.id))
             ).scalar_one_or_none()
    if found is not None:
        issued = issue_token(db, settings, user_id=None, client=client, expires_at=None)
        issued.row.customer_id = found.id
        tokens["customer"] = issued.access_token
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


# routes of no tenant that every signed-in caller may use (and nobody without a token)
SIGNED_IN_ROUTES = [("GET", "/v1/device_endpoints")]


@pytest.mark.parametrize(("method", "path"), SIGNED_IN_ROUTES)
async def test_signed_in_routes(app, client, method, path):
    async with app.state.sessionmaker() as db:
        world = await build_world(db, app.state.settings)
    assert (await client.request(method, path)).status_code == 401
    for persona in [*PERSONAS, "customer"]:
        r = await client.request(method, path,
                                 headers={"Authorization": f"Bearer {world.tokens[persona]}"})
        assert r.status_code == 200, f"{persona} {method} {path} -> {r.status_code} {r.text}"


def test_matrix_covers_routes():
    """Sanity: the route walk finds the guarded routes (catches a silently empty matrix)."""
    paths = {p for _, p, _ in ROUTES}
    assert "/v1/products/{product}/audit" in paths and "/v1/orgs/{org}/audit" in paths


def test_every_tenant_route_is_guarded():
    """A route with {product}, {org} or {device_id} in its path must declare a Guard (the
    console's routes too)."""
    from corral.console import console_routers

    for router in [*routers(), *console_routers()]:
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


# --- the web console ---------------------------------------------------------------------------
# Every console route x every console persona: the server refuses what the role may not do
# (a 403 page; another tenant's object is a 404 page), and every GET page offers no enabled
# form or button whose target route the persona may not use ("absent or disabled").

def console_routes() -> list[tuple[str, str, Guard]]:
    from corral.console import console_routers

    return guarded_routes(console_routers())


CONSOLE_ROUTES = console_routes()


def console_expected(persona: str, guard: Guard) -> str:
    if persona == "customer":
        # a customer reaches only the devices claimed to them: product and org pages are
        # refused (they know their product exists), other devices do not exist for them
        return "missing" if guard.scope == "device" else "denied"
    return expected(persona, guard)


def console_fill(path: str, world: World) -> str:
    return fill(path, world)


async def console_world(app: Any, database_url: str) -> World:
    from corral.console.session import CONSOLE_CLIENT

    await truncate_all(database_url)
    async with app.state.sessionmaker() as db:
        return await build_world(db, app.state.settings, client=CONSOLE_CLIENT)


def console_headers(world: World, persona: str) -> dict[str, str]:
    return {"Cookie": f"corral_session={world.tokens[persona]}"}


def csrf_of(world: World, persona: str) -> str:
    from corral.console.session import csrf_for_session

    return csrf_for_session(world.tokens[persona])


TENANCY_404 = ("Product not found", "Organization not found", "Device not found")


def console_outcome(r: Any) -> str:
    text = r.text
    if r.status_code in (302, 303) and "/console/login" in r.headers.get("location", ""):
        return "signed-out"
    if r.status_code >= 500:
        return "error"
    if r.status_code == 404 and any(t in text for t in TENANCY_404):
        return "missing"
    if r.status_code == 403:
        return "denied"
    return "allowed"


@pytest.mark.parametrize(("method", "path", "guard"), CONSOLE_ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in CONSOLE_ROUTES])
async def test_console_route_matrix(app, client, database_url, method, path, guard):
    world: World | None = None
    for persona in CONSOLE_PERSONAS:
        if world is None:
            world = await console_world(app, database_url)
        url = console_fill(path, world)
        data = {"csrf_token": csrf_of(world, persona)} if method != "GET" else None
        r = await client.request(method, url, data=data, headers=console_headers(world, persona))
        got = console_outcome(r)
        want = console_expected(persona, guard)
        where = f"{persona} {method} {path} -> {r.status_code} {got} {r.text[:200]!r}"
        assert got not in ("signed-out", "error"), where
        if want == "allowed":
            assert got == "allowed", where
            assert "text/html" in r.headers.get("content-type", "") or r.status_code in (
                204, 303) or r.headers.get("content-type", "").startswith(
                    ("application/json", "text/event-stream", "text/csv")), where
            if method != "GET":
                world = None
        else:
            assert got == want, where
            if got == "missing":
                assert "text/html" in r.headers.get("content-type", ""), where


class _Controls(html.parser.HTMLParser):
    """Every enabled way a page offers to send a state-changing request: ``(action)`` of
    each POST form's enabled submit control (a button's ``formaction`` wins)."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self._form: str | None = None
        self._form_has_button = False
        self._disabled_depth = 0
        self._fieldsets: list[bool] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            method = (a.get("method") or "get").lower()
            self._form = a.get("action") or "" if method == "post" else None
            self._form_has_button = False
        elif tag == "fieldset":
            self._fieldsets.append("disabled" in a)
        elif tag in ("button", "input") and self._form is not None:
            kind = (a.get("type") or ("submit" if tag == "button" else "text")).lower()
            if kind != "submit":
                return
            self._form_has_button = True
            if "disabled" in a or any(self._fieldsets):
                return
            self.targets.append(a.get("formaction") or self._form)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None
        elif tag == "fieldset" and self._fieldsets:
            self._fieldsets.pop()


def _route_for(url: str) -> Guard | None:
    path = url.split("?")[0]
    from corral.console import console_routers

    for router in console_routers():
        for route in router.routes:
            if isinstance(route, APIRoute) and "POST" in route.methods \
                    and route.path_regex.match(path):
                guards = _guards(route.dependant)
                return guards[0] if guards else None
    raise AssertionError(f"a form posts to {url}, which is no console route")


@pytest.mark.parametrize("persona", CONSOLE_PERSONAS)
async def test_console_pages_offer_only_what_the_role_may_do(app, client, database_url,
                                                             persona):
    """Absent or disabled: no page offers an enabled control the server would refuse."""
    world = await console_world(app, database_url)
    pages = sorted({p for m, p, g in CONSOLE_ROUTES if m == "GET"
                    and console_expected(persona, g) == "allowed"})
    checked = 0
    for path in pages:
        url = console_fill(path, world)
        r = await client.get(url, headers=console_headers(world, persona))
        if r.status_code != 200 or "text/html" not in r.headers.get("content-type", ""):
            continue
        parser = _Controls()
        parser.feed(r.text)
        for target in parser.targets:
            guard = _route_for(target)
            if guard is None:
                continue
            assert console_expected(persona, guard) == "allowed", (
                f"{persona}: {url} offers {target}, which needs {guard.permission}")
            checked += 1
    if persona == "org:Owner":
        assert checked, "no guarded form was checked: the walk found nothing"


# flashing a binary (PUT .../devices/{device_id} with a multipart file) asks more than
# devices:update: a non-development product device needs firmware:release (Particle's rule)
FLASH_ROUTES = ["/v1/products/{product}/devices/{device_id}", "/v1/devices/{device_id}"]


def expected_flash(persona: str) -> str:
    kind, _, rest = persona.partition(":")
    if kind in ("outsider", "customer"):
        return "missing"
    if kind == "api":
        scopes = API_USER_SCOPES if rest == "all" else {rest}
        return "allowed" if {"devices:update", "firmware:release"} <= scopes else "denied"
    role = Role.parse(rest)
    return "allowed" if role_allows(role, "firmware:release") else "denied"


@pytest.mark.parametrize("path", FLASH_ROUTES)
async def test_flash_matrix(app, client, database_url, path):
    """Every persona flashes the tenant's (offline, non-development) device: who may not
    gets 404/403 before the binary is judged; who may reaches the device check (offline)."""
    from corral.firmware.module import build_module

    await truncate_all(database_url)
    async with app.state.sessionmaker() as db:
        world = await build_world(db, app.state.settings)
    data = build_module(b"\x00" * 600, platform_id=12, product_id=12, product_version=3)
    for persona in PERSONAS:
        r = await client.put(fill(path, world), data={"latest": "true"},
                             files={"file": ("app.bin", data, "application/octet-stream")},
                             headers={"Authorization": f"Bearer {world.tokens[persona]}"})
        where = f"{persona} PUT {path} -> {r.status_code} {r.text[:300]}"
        want = expected_flash(persona)
        if want == "missing":
            assert r.status_code == 404, where
        elif want == "denied":
            assert r.status_code == 403 and r.json()["ok"] is False, where
        else:
            assert r.status_code == 400 and r.json()["error"] == "device_offline", where
