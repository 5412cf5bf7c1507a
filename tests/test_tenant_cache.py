"""The tenant cache (corral.auth.cache.TenantCache): a product route's read is judged without
the guard's query, and a change is never served late.

Each test first makes the cache hold the caller's product and role (a read that loads them,
then one answered from the cache: ``TenantCache.hits`` grows), then changes what the entry
was built from and checks the very next request sees it: a role changed or removed through
the API, a membership added or a role changed by a bulk statement through corral's
sessions, a product deleted, a subscription locked. A write is judged on the database's role
even while a read would still be answered from the cache (a change made behind corral's
back: SQL by hand). Two app instances on one bus: a change committed on one is seen by the
other once the bus message arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text, update
from sqlalchemy.ext.asyncio import create_async_engine

import corral.auth.cache as cache_module
from corral.auth.cache import TenantCache
from corral.auth.models import Membership
from corral.billing.models import Subscription
from corral.settings import Settings
from corral.web.app import Runtime, create_app
from dbreset import truncate_all
from helpers import add_role, assert_error, bearer, new_user, owner_and_product, user_id
from test_token_cache import two_nodes  # noqa: F401 - the fixture, by its name


def _cache(app: Any) -> TenantCache:
    cache: TenantCache = app.state.runtime.tenant_cache
    return cache


@contextmanager
def statements(app: Any) -> Iterator[list[str]]:
    """The SQL sent to the database meanwhile."""
    sent: list[str] = []

    def seen(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        sent.append(sql)

    engine = app.state.runtime.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", seen)


async def _cached(client: httpx.AsyncClient, app: Any, token: str, path: str,
                  status: int = 200) -> None:
    """Two reads of ``path``; the second is judged from the cache."""
    assert (await client.get(path, headers=bearer(token))).status_code == status
    hits = _cache(app).hits
    assert (await client.get(path, headers=bearer(token))).status_code == status
    assert _cache(app).hits == hits + 1, "the second read did not use the cache"


async def _team_of_two(client: httpx.AsyncClient, app: Any, role: str
                       ) -> tuple[str, dict[str, Any], str]:
    """Ada's product, and Bob holding ``role`` on it: Ada's token, the product, Bob's token."""
    ada, product = await owner_and_product(client)
    bob = await new_user(client, "bob@example.com")
    await add_role(app, "bob@example.com", product, role)
    return ada, product, bob


async def test_a_product_read_sends_no_guard_query(client: httpx.AsyncClient, app: Any) -> None:
    ada, product = await owner_and_product(client)
    for key in (product["slug"], str(product["id"])):
        await _cached(client, app, ada, f"/v1/products/{key}")
        with statements(app) as sent:
            r = await client.get(f"/v1/products/{key}", headers=bearer(ada))
        assert r.status_code == 200 and r.json()["product"]["id"] == product["id"], r.text
        assert not [s for s in sent if "FROM products" in s], sent
    # the route's own query still runs, with the product the guard took from the cache
    path = f"/v1/products/{product['slug']}/team"
    await _cached(client, app, ada, path)
    with statements(app) as sent:
        r = await client.get(path, headers=bearer(ada))
    assert r.status_code == 200 and [m["username"] for m in r.json()["team"]] == [
        "ada@example.com"], r.text
    assert len([s for s in sent if s.lstrip().upper().startswith("SELECT")]) == 1, sent


async def test_a_role_change_and_removal_apply_to_the_next_read(client: httpx.AsyncClient,
                                                                app: Any) -> None:
    ada, product, bob = await _team_of_two(client, app, "Administrator")
    path = f"/v1/products/{product['id']}"
    await _cached(client, app, bob, f"{path}/audit")  # Administrators read the audit log
    r = await client.put(f"{path}/team/bob@example.com", headers=bearer(ada),
                         json={"role": "View-only"})
    assert r.status_code == 200, r.text
    assert_error(await client.get(f"{path}/audit", headers=bearer(bob)), 403)
    await _cached(client, app, bob, path)
    r = await client.delete(f"{path}/team/bob@example.com", headers=bearer(ada))
    assert r.status_code == 200, r.text
    assert_error(await client.get(path, headers=bearer(bob)), 404)


async def test_a_new_membership_applies_to_the_next_read(client: httpx.AsyncClient,
                                                         app: Any) -> None:
    _ada, product, bob = await _team_of_two(client, app, "View-only")
    audit = f"/v1/products/{product['id']}/audit"
    await _cached(client, app, bob, audit, 403)  # the View-only role is in the cache
    await add_role(app, "bob@example.com", product, "Administrator", org=True)  # an insert
    assert (await client.get(audit, headers=bearer(bob))).status_code == 200


async def test_a_bulk_role_update_applies_to_the_next_read(client: httpx.AsyncClient,
                                                           app: Any) -> None:
    _ada, product, bob = await _team_of_two(client, app, "Administrator")
    audit = f"/v1/products/{product['id']}/audit"
    await _cached(client, app, bob, audit)
    bob_id = await user_id(app, "bob@example.com")
    async with app.state.sessionmaker() as db:  # a statement, no ORM object
        await db.execute(update(Membership).where(Membership.user_id == bob_id)
                         .values(role="View-only"))
        await db.commit()
    assert_error(await client.get(audit, headers=bearer(bob)), 403)


async def _delete_product(client: httpx.AsyncClient, _app: Any, ada: str,
                          product: dict[str, Any]) -> None:
    r = await client.delete(f"/v1/products/{product['slug']}", headers=bearer(ada))
    assert r.status_code == 204


async def _lock_subscription(_client: httpx.AsyncClient, app: Any, _ada: str,
                             product: dict[str, Any]) -> None:
    async with app.state.sessionmaker() as db:  # what billing writes after the third failure
        db.add(Subscription(org_id=product["org_id"], plan_code="basic", interval="month",
                            currency="usd", status="locked", provider="fake"))
        await db.commit()


@pytest.mark.parametrize(("change", "path", "status", "code"), [
    (_delete_product, "", 404, None),  # the product is gone
    (_lock_subscription, "/devices", 402, "subscription_inactive"),
], ids=["deleted-product", "locked-subscription"])
async def test_a_tenant_change_applies_to_the_next_read(
        client: httpx.AsyncClient, app: Any, change: Any, path: str, status: int,
        code: str | None) -> None:
    ada, product = await owner_and_product(client)
    url = f"/v1/products/{product['slug']}{path}"
    await _cached(client, app, ada, url)
    await change(client, app, ada, product)
    assert_error(await client.get(url, headers=bearer(ada)), status, code)


async def _bob_made_view_only_by_hand(app: Any, database_url: str) -> None:
    """SQL typed by hand: no corral session sees it, so the cache is not cleared."""
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE memberships SET role = 'View-only' "
                                    "WHERE user_id = :u"),
                               {"u": await user_id(app, "bob@example.com")})
    finally:
        await engine.dispose()


async def test_a_write_is_judged_on_the_role_the_database_holds(
        client: httpx.AsyncClient, app: Any, database_url: str) -> None:
    _ada, product, bob = await _team_of_two(client, app, "Administrator")
    path = f"/v1/products/{product['id']}"
    await _cached(client, app, bob, path)
    await _bob_made_view_only_by_hand(app, database_url)
    hits = _cache(app).hits
    assert (await client.get(path, headers=bearer(bob))).status_code == 200  # until it expires
    assert _cache(app).hits == hits + 1
    assert_error(await client.put(path, headers=bearer(bob), json={"description": "x"}), 403)


async def test_a_change_made_outside_corral_is_read_once_the_entry_expires(
        client: httpx.AsyncClient, app: Any, database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the README says of CORRAL_TENANT_CACHE_S: SQL typed by hand clears nothing, and
    reads see it once the entry is CORRAL_TENANT_CACHE_S old."""
    _ada, product, bob = await _team_of_two(client, app, "Administrator")
    audit = f"/v1/products/{product['id']}/audit"  # Administrators read the audit log
    await _cached(client, app, bob, audit)
    await _bob_made_view_only_by_hand(app, database_url)
    assert (await client.get(audit, headers=bearer(bob))).status_code == 200  # the entry's
    ttl = _cache(app).ttl_s
    later = time.monotonic() + ttl + 0.001
    monkeypatch.setattr(cache_module, "time", SimpleNamespace(monotonic=lambda: later))
    assert_error(await client.get(audit, headers=bearer(bob)), 403)


async def test_off_means_every_read_queries(settings: Settings, database_url: str) -> None:
    settings = settings.model_copy(update={"tenant_cache_s": 0})
    await truncate_all(database_url)
    rt = Runtime(settings)
    app = create_app(settings, runtime=rt)
    await rt.start(app, migrate_db=False, background=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://corral.test") as client:
            ada, product = await owner_and_product(client)
            for _ in range(2):
                with statements(app) as sent:
                    r = await client.get(f"/v1/products/{product['id']}", headers=bearer(ada))
                assert r.status_code == 200, r.text
                assert [s for s in sent if "FROM products" in s], sent
            assert len(_cache(app)) == 0 and _cache(app).hits == 0
    finally:
        await rt.stop()


async def test_a_role_removed_on_one_node_is_refused_by_the_other(
        two_nodes: list[Any]) -> None:  # noqa: F811 - the fixture
    (app_a, a), (app_b, b) = two_nodes
    ada, product, bob = await _team_of_two(a, app_a, "View-only")
    path = f"/v1/products/{product['id']}"
    await _cached(b, app_b, bob, path)
    generation = _cache(app_b).generation
    r = await a.delete(f"{path}/team/bob@example.com", headers=bearer(ada))
    assert r.status_code == 200, r.text
    deadline = asyncio.get_running_loop().time() + 10
    while _cache(app_b).generation == generation:  # until the bus message arrives (bounded)
        assert asyncio.get_running_loop().time() < deadline, "the bus message never arrived"
        await asyncio.sleep(0.005)
    assert_error(await b.get(path, headers=bearer(bob)), 404)


def test_each_write_clears_the_caches_built_from_it() -> None:
    from corral.auth.cache import BOTH, NOTHING, SUBJECTS_ONLY, TENANTS_ONLY, _changes

    assert _changes("memberships", "insert") == TENANTS_ONLY  # a token stays valid
    assert _changes("billing_subscriptions", "update") == TENANTS_ONLY  # (app registers it)
    assert _changes("products", "update") == TENANTS_ONLY
    assert _changes("products", "delete") == BOTH  # cascades remove its API users' tokens
    assert _changes("access_tokens", "update") == SUBJECTS_ONLY
    assert _changes("access_tokens", "insert") == NOTHING  # a new token is looked up anyway
    assert _changes("users", "delete") == BOTH  # cascades remove the user's memberships
    assert _changes("devices", "update") == NOTHING


async def test_a_bus_message_clears_the_caches_it_names(app: Any) -> None:
    from corral.bus.base import Message

    rt = app.state.runtime
    subjects, tenants = rt.subject_cache.generation, rt.tenant_cache.generation
    await rt._on_auth_changed(Message("auth.changed", b'{"node": "x", "caches": ["tenants"]}'))
    assert (rt.subject_cache.generation, rt.tenant_cache.generation) == (subjects, tenants + 1)
    for unreadable in (b"not json", b'{"node": "x", "caches": [{}]}', b'{"node": "x"}'):
        await rt._on_auth_changed(Message("auth.changed", unreadable))  # both, to be safe
    assert (rt.subject_cache.generation, rt.tenant_cache.generation) == (subjects + 3,
                                                                         tenants + 4)
