"""The token → subject cache (corral.auth.cache): used, and never serving a change late.

Each test first makes the cache hold the caller (a request that resolves the token, then one
that is a cache hit: ``SubjectCache.hits`` grows), then changes what the subject was built
from and checks the very next request sees the change: revocation, logout, password change,
an API user's scopes and removal, a customer's removal, a role change (roles are read on each
request). Two app instances on one bus: a change committed on one is seen by the other once
the bus message arrives (waited for, bounded), and a lookup that raced the change cannot
store its stale answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import corral.auth.cache as cache_module
from corral.auth.cache import SubjectCache
from corral.auth.subject import Subject
from corral.bus.inprocess import InProcessBus
from corral.mail.backends import LogBackend
from corral.settings import Settings
from corral.web.app import Runtime, create_app
from dbreset import truncate_all
from helpers import (
    PASSWORD,
    add_role,
    assert_any_error,
    assert_error,
    bearer,
    login,
    new_user,
    owner_and_product,
)
from natskit import namespace, need_nats


def _cache(app: Any) -> SubjectCache:
    cache: SubjectCache = app.state.runtime.subject_cache
    return cache


async def _cached(client: httpx.AsyncClient, app: Any, token: str, path: str = "/v1/user",
                  status: int = 200) -> None:
    """Two requests with ``token``; the second is answered from the cache."""
    assert (await client.get(path, headers=bearer(token))).status_code == status
    hits = _cache(app).hits
    assert (await client.get(path, headers=bearer(token))).status_code == status
    assert _cache(app).hits == hits + 1, "the second request did not use the cache"


async def test_a_cached_token_is_served_without_the_token_query(client: httpx.AsyncClient,
                                                                app: Any) -> None:
    ada = await new_user(client, "ada@example.com")
    await _cached(client, app, ada)
    assert len(_cache(app)) >= 1


async def test_logout_and_revocation_apply_to_the_next_request(client: httpx.AsyncClient,
                                                               app: Any) -> None:
    ada = await new_user(client, "ada@example.com")
    other = await login(client, "ada@example.com")
    await _cached(client, app, ada)
    await _cached(client, app, other)
    r = await client.delete("/v1/access_tokens/current", headers=bearer(ada))
    assert r.status_code == 200, r.text
    assert_any_error(await client.get("/v1/user", headers=bearer(ada)), 401, 'invalid_token')
    assert (await client.get("/v1/user", headers=bearer(other))).status_code == 200
    await _cached(client, app, other)
    r = await client.delete("/v1/access_tokens", headers=bearer(other))
    assert r.status_code == 200, r.text
    assert_any_error(await client.get("/v1/user", headers=bearer(other)), 401, 'invalid_token')


async def test_a_revocation_made_outside_corral_is_seen_once_the_entry_expires(
        client: httpx.AsyncClient, app: Any, database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the README says of CORRAL_TOKEN_CACHE_S: tokens deleted by SQL typed by hand
    clear nothing, and requests see it once the entry is CORRAL_TOKEN_CACHE_S old."""
    ada = await new_user(client, "ada@example.com")
    await _cached(client, app, ada)
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM access_tokens"))
    finally:
        await engine.dispose()
    assert (await client.get("/v1/user", headers=bearer(ada))).status_code == 200  # cached
    later = time.monotonic() + _cache(app).ttl_s + 0.001
    monkeypatch.setattr(cache_module, "time", SimpleNamespace(monotonic=lambda: later))
    assert_any_error(await client.get("/v1/user", headers=bearer(ada)), 401, "invalid_token")


async def test_a_password_change_applies_to_the_next_request(client: httpx.AsyncClient,
                                                             app: Any) -> None:
    ada = await new_user(client, "ada@example.com")
    elsewhere = await login(client, "ada@example.com")
    await _cached(client, app, elsewhere)
    r = await client.put("/v1/user", headers=bearer(ada), json={
        "current_password": PASSWORD, "password": "a brand new password",
        "invalidate_tokens": True})
    assert r.status_code == 200, r.text
    assert_any_error(await client.get("/v1/user", headers=bearer(elsewhere)), 401, 'invalid_token')


async def test_api_user_scopes_and_removal_apply_to_the_next_request(
        client: httpx.AsyncClient, app: Any) -> None:
    ada, product = await owner_and_product(client)
    r = await client.post(f"/v1/products/{product['id']}/team", headers=bearer(ada),
                          json={"friendly_name": "robot", "scopes": ["devices:list"]})
    assert r.status_code == 200, r.text
    created = r.json()["created"]
    robot, username = created["tokens"][0]["token"], created["username"]
    devices = f"/v1/products/{product['id']}/devices"
    await _cached(client, app, robot, devices)
    r = await client.put(f"/v1/products/{product['id']}/team/{username}", headers=bearer(ada),
                         json={"scopes": ["products:get"]})
    assert r.status_code == 200, r.text
    # a scope change rotates the API user's token: the cached old one is refused at once
    assert_any_error(await client.get(devices, headers=bearer(robot)), 401, 'invalid_token')
    robot = r.json()["updated"]["tokens"][0]["token"]
    assert_error(await client.get(devices, headers=bearer(robot)), 403)
    await _cached(client, app, robot, f"/v1/products/{product['id']}")
    r = await client.delete(f"/v1/products/{product['id']}/team/{username}", headers=bearer(ada))
    assert r.status_code == 200, r.text
    assert_any_error(await client.get(f"/v1/products/{product['id']}", headers=bearer(robot)), 401, 'invalid_token')


async def test_a_role_change_applies_to_the_next_request(client: httpx.AsyncClient,
                                                         app: Any) -> None:
    ada, product = await owner_and_product(client)
    bob = await new_user(client, "bob@example.com")
    await add_role(app, "bob@example.com", product, "View-only")
    path = f"/v1/products/{product['id']}"
    await _cached(client, app, bob, path)
    assert_error(await client.put(path, headers=bearer(bob), json={"description": "x"}), 403)
    r = await client.put(f"{path}/team/bob@example.com", headers=bearer(ada),
                         json={"role": "Administrator"})
    assert r.status_code == 200, r.text
    r = await client.put(path, headers=bearer(bob), json={"description": "changed by bob"})
    assert r.status_code == 200, r.text
    r = await client.delete(f"{path}/team/bob@example.com", headers=bearer(ada))
    assert r.status_code == 200, r.text
    assert_error(await client.get(path, headers=bearer(bob)), 404)


async def test_a_removed_customer_is_refused_at_once(client: httpx.AsyncClient,
                                                     app: Any) -> None:
    ada, product = await owner_and_product(client)
    r = await client.post(f"/v1/products/{product['id']}/customers", headers=bearer(ada),
                          json={"email": "cy@example.com", "password": "customer password"})
    assert r.status_code == 201, r.text
    cy = r.json()["access_token"]
    await _cached(client, app, cy, "/v1/devices")
    r = await client.delete(f"/v1/products/{product['id']}/customers/cy@example.com",
                            headers=bearer(ada))
    assert r.status_code == 200, r.text
    assert_any_error(await client.get("/v1/devices", headers=bearer(cy)), 401, 'invalid_token')


def test_a_lookup_that_raced_a_clear_is_not_stored() -> None:
    cache = SubjectCache(60)
    subject = Subject(kind="user", token_id=1, client="t", user_id=1, username="a")
    generation = cache.generation  # a lookup begins (reads the database after this)
    cache.clear()  # a revocation commits meanwhile
    cache.put("k", subject, None, generation)
    assert cache.get("k") is None
    cache.put("k", subject, None, cache.generation)
    assert cache.get("k") == subject
    assert SubjectCache(0).enabled is False


# --- two app instances on one bus ------------------------------------------------------------

@pytest.fixture(params=["in-process", "nats"])
async def two_nodes(request: pytest.FixtureRequest, settings: Settings,
                    database_url: str) -> AsyncIterator[list[Any]]:
    """Two Runtimes on one database and one bus: one in-process bus shared by both, or each
    its own connection to a NATS server (many nodes; PostgreSQL only)."""
    shared: InProcessBus | None = None
    if request.param == "nats":
        if not database_url.startswith("postgresql"):
            pytest.skip("many nodes share a PostgreSQL database (the suite's PostgreSQL pass)")
        settings = settings.model_copy(update={"bus_url": need_nats(),
                                               "bus_namespace": namespace()})
    else:
        shared = InProcessBus()
    await truncate_all(database_url)
    nodes: list[Any] = []
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            rt = Runtime(settings, mail_backend=LogBackend(), bus=shared)
            app = create_app(settings, runtime=rt)
            await rt.start(app, migrate_db=False, background=False)
            stack.push_async_callback(rt.stop)
            client = await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 50000)),
                base_url="http://corral.test"))
            nodes.append((app, client))
        yield nodes


async def _cleared(app: Any, generation: int) -> None:
    """Until the bus message has cleared ``app``'s cache (bounded)."""
    deadline = asyncio.get_running_loop().time() + 10
    while _cache(app).generation == generation:
        assert asyncio.get_running_loop().time() < deadline, "the bus message never arrived"
        await asyncio.sleep(0.005)


async def test_a_revocation_on_one_node_reaches_the_other(two_nodes: list[Any]) -> None:
    (app_a, a), (app_b, b) = two_nodes
    ada = await new_user(a, "ada@example.com")
    await _cached(b, app_b, ada)
    generation = _cache(app_b).generation
    r = await a.delete("/v1/access_tokens/current", headers=bearer(ada))
    assert r.status_code == 200, r.text
    assert_any_error(await a.get("/v1/user", headers=bearer(ada)), 401, 'invalid_token')
    await _cleared(app_b, generation)
    assert_any_error(await b.get("/v1/user", headers=bearer(ada)), 401, 'invalid_token')


async def test_an_api_user_removed_on_one_node_is_refused_by_the_other(two_nodes: list[Any]) -> None:
    (app_a, a), (app_b, b) = two_nodes
    ada, product = await owner_and_product(a)
    r = await a.post(f"/v1/products/{product['id']}/team", headers=bearer(ada),
                     json={"friendly_name": "robot", "scopes": ["devices:list"]})
    created = r.json()["created"]
    robot, username = created["tokens"][0]["token"], created["username"]
    devices = f"/v1/products/{product['id']}/devices"
    await _cached(b, app_b, robot, devices)
    generation = _cache(app_b).generation
    r = await a.delete(f"/v1/products/{product['id']}/team/{username}", headers=bearer(ada))
    assert r.status_code == 200, r.text
    await _cleared(app_b, generation)
    assert_any_error(await b.get(devices, headers=bearer(robot)), 401, 'invalid_token')
