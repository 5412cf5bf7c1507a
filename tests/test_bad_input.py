"""Bad input never produces a 500 or a non-JSON answer, on any route, in any encoding.

Every API route is called by an organization Owner (so the guards let the request through to
validation) with malformed bodies, wrong types, oversized strings and odd path values.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.web.app import routers
from test_permissions_matrix import DEVICE_ID, build_world

ALL_ROUTES = sorted(
    {(m, r.path) for router in routers() for r in router.routes if isinstance(r, APIRoute)
     for m in r.methods - {"HEAD"}}
)

NASTY_VALUES: list[Any] = [None, True, 0, -1, 2**63, 1.5, "", " ", "x" * 5000, "\u0000",
                           "../../etc/passwd", "<script>", [], ["a", 1, None], {}, {"a": {"b": []}}]
FIELDS = ["name", "username", "password", "role", "scopes", "friendly_name", "product",
          "description", "tags", "platform_id", "settings", "type", "redirect_uri", "scope",
          "code", "id", "account_info", "current_password", "grant_type", "expires_in"]


def bodies(seed: int) -> list[Any]:
    """Odd top-level bodies, then every field with four nasty values (rotated by ``seed``, so
    across the routes each field meets every value), then everything at once."""
    out: list[Any] = [{}, [], "string", 7, None]
    for i, f in enumerate(FIELDS):
        for k in range(4):
            out.append({f: NASTY_VALUES[(seed + i + k * 4) % len(NASTY_VALUES)]})
    out.append({f: NASTY_VALUES[(seed + i) % len(NASTY_VALUES)] for i, f in enumerate(FIELDS)})
    out.append({"product": {f: v for f, v in zip(FIELDS, NASTY_VALUES, strict=False)}})
    return out


def fill(path: str, product: str, org: str, other: str) -> str:
    path = path.replace("{product}", product).replace("{org}", org)
    if other == "matrix-placeholder":  # reach the real device, so its validation runs
        path = path.replace("{device_id}", DEVICE_ID)
    return re.sub(r"\{[^}]+\}", other, path)


def check(r: Any, where: str) -> None:
    assert r.status_code < 500, f"{where} -> {r.status_code} {r.text[:300]}"
    if r.status_code != 204 and r.content:
        assert r.headers["content-type"].startswith(("application/json", "text/event-stream")), where
        if r.status_code >= 400:
            body = r.json()
            assert "error" in body or "errors" in body, where


@pytest.mark.parametrize(("method", "path"), ALL_ROUTES, ids=[f"{m} {p}" for m, p in ALL_ROUTES])
async def test_route_rejects_bad_bodies_cleanly(app, client, method, path):
    async with app.state.sessionmaker() as db:
        world = await build_world(db, app.state.settings, "org:Owner")
    headers = {"Authorization": f"Bearer {world.token}"}
    seed = ALL_ROUTES.index((method, path))
    for other in ("0", "x" * 300, "%00", "-1", "matrix-placeholder"):
        url = fill(path, world.product.slug, world.org.slug, other)
        if method in ("GET", "DELETE"):
            r = await client.request(method, url, headers=headers, params={"page": "-1"})
            check(r, f"{method} {url}")
            continue
        if other != "matrix-placeholder":  # odd path values: one empty body is enough
            check(await client.request(method, url, headers=headers, json={}), f"{method} {url}")
            continue
        for body in bodies(seed):
            r = await client.request(method, url, headers=headers, json=body)
            check(r, f"{method} {url} json={str(body)[:80]}")
        for form in ({"name": "x" * 5000}, {"role": ""}, {"scopes": "a,b"}, {"product": "{"}):
            r = await client.request(method, url, headers=headers, data=form)
            check(r, f"{method} {url} form={form}")
        r = await client.request(method, url, headers={**headers, "content-type": "application/json"},
                                 content=b"\xff\xfe garbage")
        check(r, f"{method} {url} garbage")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6))
async def test_random_bodies_on_writes(app, client, body):
    """Random JSON on the write routes of the foundation never breaks the server."""
    async with app.state.sessionmaker() as db:
        from sqlalchemy import select

        from corral.accounts.service import issue_token
        from corral.auth.models import User

        owner = (await db.execute(select(User).where(User.username == "owner@matrix.test"))).scalar_one_or_none()
        if owner is None:
            world = await build_world(db, app.state.settings, "org:Owner")
            token = world.token
        else:
            token = issue_token(db, app.state.settings, user_id=owner.id, client="fuzz",
                                expires_at=None).access_token
            await db.commit()
    headers = {"Authorization": f"Bearer {token}"}
    for method, path in ALL_ROUTES:
        if method in ("GET", "DELETE") or "{" in path.replace("{product}", "").replace("{org}", ""):
            continue
        r = await client.request(method, fill(path, "widget", "tenant-a", "x"),
                                 headers={**headers, "content-type": "application/json"},
                                 content=json.dumps(body).encode())
        check(r, f"{method} {path} {body!r:.120}")


def test_every_route_has_a_docstring():
    for router in routers():
        for r in router.routes:
            if isinstance(r, APIRoute):
                assert r.description.strip(), f"{r.path} has no docstring"


async def test_openapi_served(client):
    r = await client.get("/openapi.json")
    assert r.status_code == 200 and r.json()["info"]["title"] == "corral"
    assert (await client.get("/docs")).status_code == 200


async def test_openapi_is_serialized_once(app, client, monkeypatch):
    """The document is ~600 KB of JSON: the route sends bytes made once, the same bytes
    FastAPI's JSONResponse would make; under a proxy's root_path the servers name it."""
    first = await client.get("/openapi.json")
    made = []
    real = JSONResponse.render
    monkeypatch.setattr(JSONResponse, "render", lambda self, c: made.append(1) or real(self, c))
    again = await client.get("/openapi.json")
    assert made == [] and again.content == first.content
    assert again.headers["content-type"] == "application/json"
    assert first.content == JSONResponse(app.openapi()).body
    monkeypatch.undo()
    transport = httpx.ASGITransport(app=app, root_path="/corral")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as proxied:
        doc = (await proxied.get("/corral/openapi.json")).json()
    assert doc["servers"][0] == {"url": "/corral"}
    assert "servers" not in (await client.get("/openapi.json")).json()


ODD_IDS = ["%C2%B2", "%D9%A3", "99999999999999999999", "60251084742432", "2147483648", "0"]


@pytest.mark.parametrize("odd", ODD_IDS)
async def test_odd_ids_in_every_path_slot(app, client, odd):
    """One parsing rule for numeric path ids: Unicode digits (``²``, Arabic-Indic ``٣``) and
    values beyond the id column's range are simply not found (or refused), never a 500, in
    every slot of every route, the organization and product slots included."""
    async with app.state.sessionmaker() as db:
        world = await build_world(db, app.state.settings, "org:Owner")
    headers = {"Authorization": f"Bearer {world.token}"}
    for method, path in ALL_ROUTES:
        if "{" not in path:
            continue
        urls = {re.sub(r"\{[^}]+\}", odd, path),
                fill(path, world.product.slug, world.org.slug, odd)}
        for url in urls:
            kw: dict[str, Any] = {} if method in ("GET", "DELETE") else {"json": {}}
            r = await client.request(method, url, headers=headers, **kw)
            check(r, f"{method} {url}")
