"""The guards' statements are built once per shape and reused (corral.products.access.prebuilt):
each request's caller, product and device reach them as parameters, and a tenant check
registered after they were built is in the next request's statement."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event

from corral.auth import guards
from corral.kit.errors import Forbidden
from corral.products import access
from helpers import add_devices, add_role, assert_error, bearer, make_product, new_user

DEVICE = "e00fce68aaaaaaaaaaaaaaaa"


def _refuse_org(org_id: int) -> Any:
    async def check(_db: Any, org: int, _permission: str) -> None:
        raise AssertionError("the guard reads the fact with the tenant: no query of its own")

    def judge(value: Any, org: int, _permission: str) -> None:
        if value == org_id:
            raise Forbidden("refused by a check registered late", code="late_check")

    return guards._Check(check, lambda org_col: org_col + 0, judge)


async def test_a_check_registered_after_the_statements_were_built_applies(client, app,
                                                                          monkeypatch):
    ada = await new_user(client, "ada@example.com")
    product = await make_product(client, ada, "Widget")
    await add_devices(app, product["id"], DEVICE)
    slug = product["slug"]
    # the guards' statements are built and cached by these
    assert (await client.get(f"/v1/products/{slug}", headers=bearer(ada))).status_code == 200
    assert (await client.get(f"/v1/devices/{DEVICE}", headers=bearer(ada))).status_code == 200
    monkeypatch.setattr(guards, "_tenant_checks",
                        [*guards._tenant_checks, _refuse_org(product["org_id"])])
    assert_error(await client.get(f"/v1/products/{slug}", headers=bearer(ada)), 403, "late_check")
    assert_error(await client.get(f"/v1/products/{product['id']}", headers=bearer(ada)), 403,
                 "late_check")
    assert_error(await client.get(f"/v1/devices/{DEVICE}", headers=bearer(ada)), 403,
                 "late_check")
    monkeypatch.undo()
    assert (await client.get(f"/v1/products/{slug}", headers=bearer(ada))).status_code == 200


async def test_one_statement_per_shape_and_each_callers_own_role(client, app):
    """Two people on one product send the same statement (one object, so one compiled-cache
    entry) and each gets their own role: the caller is a parameter, not built in."""
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    product = await make_product(client, ada, "Widget")
    await add_devices(app, product["id"], DEVICE)
    await add_role(app, "bob@example.com", product, "View-only")
    sent: list[Any] = []

    def seen(_conn: Any, clauseelement: Any, *_args: Any) -> None:
        sent.append(clauseelement)

    engine = app.state.runtime.engine.sync_engine
    event.listen(engine, "before_execute", seen)
    try:
        for who in (ada, bob):
            r = await client.get(f"/v1/products/{product['slug']}/team", headers=bearer(who))
            assert r.status_code == 200, r.text
        # View-only may read the product but not change it; the Owner may
        r = await client.put(f"/v1/products/{product['slug']}", headers=bearer(bob),
                             json={"description": "x"})
        assert_error(r, 403)
        r = await client.put(f"/v1/products/{product['slug']}", headers=bearer(ada),
                             json={"description": "x"})
        assert r.status_code == 200, r.text
        for who in (ada, bob):
            r = await client.post(f"/v1/devices/{DEVICE}/led", headers=bearer(who),
                                  json={"arg": "on"})
            assert r.status_code != 200  # not connected, or not allowed
    finally:
        event.remove(engine, "before_execute", seen)
    built = {id(q) for q, _n in access._STATEMENTS.values()}
    used = [q for q in sent if id(q) in built]
    # the product guard's statement four times, the device guard's twice: two objects
    assert len(used) == 6 and len({id(q) for q in used}) == 2, used
