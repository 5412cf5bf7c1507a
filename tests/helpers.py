"""Shared test helpers: sign up, log in, authenticated requests, error bodies, products, roles,
devices."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from sqlalchemy import func, select

from corral.audit.models import AuditEntry
from corral.auth.models import Membership, User
from corral.devices.models import Device

PASSWORD = "correct horse battery"


async def signup(client: httpx.AsyncClient, username: str, password: str = PASSWORD) -> None:
    r = await client.post("/v1/users", json={"username": username, "password": password})
    assert r.status_code == 200, r.text


async def login(client: httpx.AsyncClient, username: str, password: str = PASSWORD,
                **extra: Any) -> str:
    form = {"grant_type": "password", "username": username, "password": password,
            "client_id": "particle-api", "client_secret": "particle-api", **extra}
    r = await client.post("/oauth/token", data=form)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


async def new_user(client: httpx.AsyncClient, username: str) -> str:
    """Sign up and log in; returns a bearer token."""
    await signup(client, username)
    return await login(client, username)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- error bodies -----------------------------------------------------------------------------

def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """A Particle /v1 error: ``{"ok": false, "error": ..., "error_description": ...}``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["ok"] is False and body["error"] and body["error_description"], body
    if code is not None:
        assert body["error"] == code, body
    return body


def assert_any_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """An error in either shape: Particle /v1 or OAuth (which has no ``ok`` key)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert "error" in body and "error_description" in body, body
    if code is not None:
        assert body["error"] == code, body
    return body


# --- organizations, products, roles -----------------------------------------------------------

async def make_org(client: httpx.AsyncClient, token: str, name: str = "Acme Inc") -> dict[str, Any]:
    r = await client.post("/v1/orgs", headers=bearer(token), json={"name": name})
    assert r.status_code == 201, r.text
    return r.json()["organization"]


async def make_product(client: httpx.AsyncClient, token: str, name: str = "Widget",
                       **fields: Any) -> dict[str, Any]:
    """Create a product in the caller's personal organization."""
    r = await client.post("/v1/user/products", headers=bearer(token),
                          json={"product": {"name": name, **fields}})
    assert r.status_code == 200, r.text
    return r.json()["product"]


async def two_tenants(client: httpx.AsyncClient) -> dict[str, Any]:
    """ada owns product Widget, bob owns product Gadget (tokens under "ada" and "bob")."""
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    return {"ada": ada, "bob": bob, "widget": await make_product(client, ada, "Widget"),
            "gadget": await make_product(client, bob, "Gadget")}


async def make_client(client: httpx.AsyncClient, token: str,
                      product: dict[str, Any] | int | str | None, name: str = "app",
                      **body: Any) -> dict[str, Any]:
    """Create an OAuth client of ``product`` (a product dict or id; None: a personal client)."""
    if isinstance(product, dict):
        product = product["id"]
    path = f"/v1/products/{product}/clients" if product is not None else "/v1/clients"
    r = await client.post(path, headers=bearer(token),
                          json={"name": name, "type": "installed", **body})
    assert r.status_code == 200, r.text
    return r.json()["client"]


async def user_id(app: Any, username: str) -> int:
    async with app.state.sessionmaker() as db:
        return (await db.execute(select(User.id).where(User.username == username))).scalar_one()


async def add_member(app: Any, username: str, *, org_id: int, product_id: int | None = None,
                     role: str) -> None:
    """Give ``username`` a role directly (the invite flow is tested in test_product_team)."""
    async with app.state.sessionmaker() as db:
        db.add(Membership(user_id=await user_id(app, username), org_id=org_id,
                          product_id=product_id, role=role))
        await db.commit()


async def add_role(app: Any, username: str, product: dict[str, Any], role: str,
                   *, org: bool = False) -> None:
    """Give ``username`` a role on ``product`` (with ``org``: on the product's organization)."""
    await add_member(app, username, org_id=product["org_id"],
                     product_id=None if org else product["id"], role=role)


# --- devices ----------------------------------------------------------------------------------

async def add_device(app: Any, device_id: str, product_id: int | None = None,
                     **fields: Any) -> None:
    await add_devices(app, product_id, device_id, **fields)


async def add_devices(app: Any, product_id: int | None, *ids: str, **fields: Any) -> None:
    async with app.state.sessionmaker() as db:
        db.add_all([Device(id=i, product_id=product_id, platform_id=12, **fields) for i in ids])
        await db.commit()


async def owner_with_products(client: httpx.AsyncClient, app: Any, devices: dict[str, str],
                              username: str = "owner@example.com") -> tuple[str, list[dict[str, Any]]]:
    """``username`` owns one product per ``{product name: device id}``, each with that device."""
    owner = await new_user(client, username)
    products = []
    for name, device_id in devices.items():
        product = await make_product(client, owner, name)
        await add_device(app, device_id, product["id"])
        products.append(product)
    return owner, products


async def owner_and_product(client: httpx.AsyncClient, username: str = "ada@example.com",
                            **fields: Any) -> tuple[str, dict[str, Any]]:
    """A new user and their product (platform 12 unless ``fields`` say otherwise)."""
    tok = await new_user(client, username)
    return tok, await make_product(client, tok, **{"platform_id": 12, **fields})


async def seed(app: Any, *rows: dict[str, Any]) -> None:
    """Insert device rows directly (the state a device session or an earlier import left)."""
    async with app.state.sessionmaker() as db:
        for row in rows:
            db.add(Device(**row))
        await db.commit()


async def load(app: Any, device_id: str) -> Device | None:
    async with app.state.sessionmaker() as db:
        return await db.get(Device, device_id)


async def device_count(app: Any, **where: Any) -> int:
    async with app.state.sessionmaker() as db:
        q = select(func.count()).select_from(Device)
        for k, v in where.items():
            q = q.where(getattr(Device, k) == v)
        return int((await db.execute(q)).scalar_one())


async def audit_actions(app: Any, prefix: str = "") -> list[AuditEntry]:
    """Audit entries whose action starts with ``prefix``, oldest first."""
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(AuditEntry).where(
            AuditEntry.action.startswith(prefix)).order_by(AuditEntry.id))).scalars())


async def post_ids(client: httpx.AsyncClient, token: str, product: Any, **body: Any) -> httpx.Response:
    """Import device IDs into ``product`` (POST /v1/products/:product/devices, JSON)."""
    return await client.post(f"/v1/products/{product}/devices", headers=bearer(token), json=body)


async def settle_fleet(app: Any, *, sample: bool = True) -> None:
    """Store what the devices sent (the event writer's batches), sample the devices online
    now (``sample``) and flush this node's fleet rollups: the fleet-health API then answers
    from everything so far."""
    from corral.fleet.rollups import sample_online

    rt = app.state.runtime
    await rt.writer.stop()
    rt.writer.start()
    if sample:
        async with app.state.sessionmaker() as db:
            await sample_online(db)
            await db.commit()
    await rt.fleet.flush()


@contextlib.asynccontextmanager
async def restarted(app: Any, settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Stop ``app``'s runtime (it flushes what it holds) and start a fresh server on the same
    database; yields a client of the fresh one (stopped on exit)."""
    from corral.web.app import Runtime, create_app

    await app.state.runtime.stop()
    fresh = Runtime(settings)
    fresh_app = create_app(settings, runtime=fresh)
    await fresh.start(fresh_app, migrate_db=False, background=False)
    try:
        transport = httpx.ASGITransport(app=fresh_app, client=("127.0.0.1", 50001))
        async with httpx.AsyncClient(transport=transport, base_url="http://corral.test") as c:
            yield c
    finally:
        await fresh.stop()


def api_routes(routes: list[Any]) -> list[Any]:
    """Every FastAPI route among ``routes``, those of included routers too."""
    from fastapi.routing import APIRoute

    found: list[Any] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):  # an included router
            found += api_routes(route.original_router.routes)
    return found


async def console_session(app: Any, username: str) -> str:
    """A console session's token (the ``corral_session`` cookie) for an existing user, as
    signing in to the console issues one."""
    from corral.accounts.service import issue_token
    from corral.console.session import CONSOLE_CLIENT

    async with app.state.sessionmaker() as db:
        user = (await db.execute(select(User).where(User.username == username))).scalar_one()
        token = issue_token(db, app.state.settings, user_id=user.id, client=CONSOLE_CLIENT,
                            expires_at=None).access_token
        await db.commit()
    return token


class ConsoleForms:
    """Console requests as a signed-in browser sends them: the session cookie on each, a
    form urlencoded with the CSRF token on each post (``console_session`` gives the token)."""

    def __init__(self, client: httpx.AsyncClient, token: str) -> None:
        self.client, self.token = client, token

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.client.get(path, params=params or None,
                                     headers={"Cookie": f"corral_session={self.token}"})

    async def post(self, path: str, **fields: str) -> httpx.Response:
        from urllib.parse import urlencode

        from corral.console.session import csrf_for_session

        body = urlencode({"csrf_token": csrf_for_session(self.token), **fields}).encode()
        return await self.client.post(path, content=body, headers={
            "Cookie": f"corral_session={self.token}",
            "Content-Type": "application/x-www-form-urlencoded"})
