"""``ensure_demo``: the demo owner, organization, product and fleet; idempotent."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import func, select

from corral.audit.models import AuditEntry
from corral.demo import (
    DEMO_BETA_SIZE,
    DEMO_FLEET_IDS,
    DEMO_FLEET_SIZE,
    DEMO_ORG,
    DEMO_PLATFORM_ID,
    DEMO_PRODUCT,
    DEMO_QUARANTINED_ID,
    DemoInfo,
    demo_device_id,
    ensure_demo,
)
from corral.devices.models import Device, DeviceGroup, DeviceGroupMember
from corral.orgs.models import Organization
from corral.products.models import Product
from corral.settings import Settings
from helpers import bearer


async def _token(client: httpx.AsyncClient, info: DemoInfo) -> str:
    r = await client.post("/oauth/token", data={
        "grant_type": "password", "username": info.username, "password": info.password,
        "client_id": "corral-cli", "client_secret": "corral-cli"})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


async def _devices(client: httpx.AsyncClient, token: str, product: str,
                   **params: Any) -> dict[str, Any]:
    r = await client.get(f"/v1/products/{product}/devices", headers=bearer(token),
                         params={"per_page": 100, "sortAttr": "deviceName", "sortDir": "asc",
                                 **params})
    assert r.status_code == 200, r.text
    return r.json()


async def _counts(app: Any) -> tuple[int, int, int, int, int, int]:
    """Orgs named like the demo's, products, devices, groups, group memberships, audit
    entries."""
    async with app.state.sessionmaker() as db:
        def count(model: Any) -> Any:
            return select(func.count()).select_from(model)

        return (
            (await db.execute(count(Organization).where(Organization.name == DEMO_ORG)))
            .scalar_one(),
            (await db.execute(count(Product))).scalar_one(),
            (await db.execute(count(Device))).scalar_one(),
            (await db.execute(count(DeviceGroup))).scalar_one(),
            (await db.execute(count(DeviceGroupMember))).scalar_one(),
            (await db.execute(count(AuditEntry))).scalar_one(),
        )


def test_fleet_ids_are_fixed_and_distinct() -> None:
    ids = [*DEMO_FLEET_IDS, DEMO_QUARANTINED_ID]
    assert len(set(ids)) == DEMO_FLEET_SIZE + 1
    assert all(len(i) == 24 and i == i.lower() and int(i, 16) >= 0 for i in ids)
    assert DEMO_FLEET_IDS[0] == demo_device_id(1)
    # the README's examples use these IDs: they must not change from one release to the next
    assert (DEMO_FLEET_IDS[0], DEMO_QUARANTINED_ID) == (
        "6c8aa4bd66170e1633041e04", "35698f7edadf0e5f91b152f4")


async def test_ensure_demo_is_idempotent(app: Any, settings: Settings,
                                         client: httpx.AsyncClient) -> None:
    first = await ensure_demo(app.state.sessionmaker, settings)
    assert first.created == ["user", "org", "product", "devices", "quarantined device",
                             "subscription", "release"]
    assert (first.devices, first.quarantined) == (DEMO_FLEET_SIZE + 1, 1)
    assert first.fleet_summary == f"{DEMO_FLEET_SIZE + 1} (1 in quarantine)"
    token = await _token(client, first)
    before = await _devices(client, token, first.product_slug)
    counts = await _counts(app)

    second = await ensure_demo(app.state.sessionmaker, settings)
    assert second.created == []
    assert (second.org_id, second.product_id) == (first.org_id, first.product_id)
    assert (second.devices, second.quarantined) == (first.devices, first.quarantined)
    assert await _counts(app) == counts
    assert counts[:5] == (1, 1, DEMO_FLEET_SIZE + 1, 2, DEMO_FLEET_SIZE)
    assert await _devices(client, token, first.product_slug) == before

    async with app.state.sessionmaker() as db:
        products = (await db.execute(select(Product))).scalars().all()
    assert [(p.name, p.platform_id, p.org_id) for p in products] == [
        (DEMO_PRODUCT, DEMO_PLATFORM_ID, first.org_id)]


async def test_demo_fleet(app: Any, settings: Settings, client: httpx.AsyncClient) -> None:
    info = await ensure_demo(app.state.sessionmaker, settings)
    token = await _token(client, info)
    body = await _devices(client, token, info.product_slug)
    assert body["meta"]["total"] == DEMO_FLEET_SIZE + 1
    devices = {d["id"]: d for d in body["devices"]}
    assert set(devices) == {*DEMO_FLEET_IDS, DEMO_QUARANTINED_ID}

    for n, did in enumerate(DEMO_FLEET_IDS, start=1):
        d = devices[did]
        assert d["name"] == f"demo-sensor-{n:02d}"
        assert d["groups"] == (["beta"] if n <= DEMO_BETA_SIZE else ["field"])
        assert d["development"] is (n <= 2)
        assert (d["quarantined"], d["denied"]) == (False, False)
        assert d["platform_id"] == DEMO_PLATFORM_ID
    # devices cannot connect yet: none has ever been online
    assert not any(d["online"] or d["last_heard"] or d["first_online_at"]
                   for d in devices.values())

    waiting = devices[DEMO_QUARANTINED_ID]
    assert (waiting["quarantined"], waiting["name"], waiting["groups"]) == (True, None, [])
    quarantined = await _devices(client, token, info.product_slug, quarantined="true")
    assert [d["id"] for d in quarantined["devices"]] == [DEMO_QUARANTINED_ID]

    r = await client.get(f"/v1/products/{info.product_slug}/groups", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert [(g["name"], g["device_count"]) for g in r.json()["groups"]] == [
        ("beta", DEMO_BETA_SIZE), ("field", DEMO_FLEET_SIZE - DEMO_BETA_SIZE)]
    assert all(g["description"] for g in r.json()["groups"])


async def test_rerun_keeps_the_users_changes_and_restores_missing_devices(
        app: Any, settings: Settings, client: httpx.AsyncClient) -> None:
    info = await ensure_demo(app.state.sessionmaker, settings)
    token = await _token(client, info)
    base = f"/v1/products/{info.product_slug}/devices"
    renamed, removed = DEMO_FLEET_IDS[2], DEMO_FLEET_IDS[10]
    r = await client.put(f"{base}/{renamed}", headers=bearer(token),
                         json={"name": "kitchen", "groups": ["field"]})
    assert r.status_code == 200, r.text
    r = await client.request("DELETE", f"{base}/{DEMO_QUARANTINED_ID}", headers=bearer(token),
                             json={"deny": True})
    assert r.status_code == 204, r.text
    r = await client.delete(f"{base}/{removed}", headers=bearer(token))
    assert r.status_code == 204, r.text

    again = await ensure_demo(app.state.sessionmaker, settings)
    assert again.created == ["devices"]  # only the removed device came back
    assert (again.devices, again.quarantined) == (DEMO_FLEET_SIZE + 1, 0)
    assert again.fleet_summary == f"{DEMO_FLEET_SIZE + 1}"
    devices = {d["id"]: d for d in (await _devices(client, token, info.product_slug))["devices"]}
    assert (devices[renamed]["name"], devices[renamed]["groups"]) == ("kitchen", ["field"])
    assert (devices[DEMO_QUARANTINED_ID]["denied"],
            devices[DEMO_QUARANTINED_ID]["quarantined"]) == (True, False)
    assert (devices[removed]["name"], devices[removed]["groups"]) == ("demo-sensor-11",
                                                                      ["field"])


async def test_demo_org_is_subscribed_on_the_fake_provider(
        app: Any, settings: Settings, client: httpx.AsyncClient) -> None:
    import datetime as dt

    from corral.kit import clock

    mc = clock.ManualClock(dt.datetime(2027, 3, 10, 9, 0, tzinfo=dt.UTC))
    previous = clock.install(mc)
    try:
        info = await ensure_demo(app.state.sessionmaker, settings)
        token = await _token(client, info)
        base = f"/v1/orgs/{info.org_slug}"
        r = await client.get(f"{base}/billing", headers=bearer(token))
        assert r.status_code == 200, r.text
        billing = r.json()["billing"]
        assert (billing["plan"]["code"], billing["plan"]["blocks"]) == ("basic", 1)
        sub = billing["subscription"]
        assert (sub["status"], sub["plan"], sub["interval"]) == ("active", "basic", "month")
        assert sub["payment_method"]["label"] == "visa •••• 4242"
        r = await client.get(f"{base}/invoices", headers=bearer(token))
        [inv] = r.json()["invoices"]
        assert (inv["reason"], inv["status"], inv["total_cents"]) == (
            "subscribe", "paid", 4900 + 29_900)
        r = await client.get(f"{base}/usage", headers=bearer(token))
        assert r.status_code == 200, r.text

        # a second run leaves the subscription alone (no second charge)
        assert "subscription" not in (await ensure_demo(app.state.sessionmaker,
                                                        settings)).created
        assert len((await client.get(f"{base}/invoices", headers=bearer(token))
                    ).json()["invoices"]) == 1

        # the server's own fake provider renews it, and March's statement follows April 1
        mc.set(dt.datetime(2027, 4, 10, 10, 0, tzinfo=dt.UTC))
        await app.state.runtime.billing.tick(mc.now())
        token = await _token(client, info)
        invs = (await client.get(f"{base}/invoices", headers=bearer(token))).json()["invoices"]
        assert [(i["reason"], i["status"]) for i in reversed(invs)] == [
            ("subscribe", "paid"), ("renewal", "paid"), ("statement", "paid")]
        assert invs[0]["number"].endswith("-M202703")
    finally:
        clock.install(previous)


async def test_demo_never_subscribes_with_a_real_provider(
        app: Any, settings: Settings) -> None:
    real = settings.model_copy(update={"payment_provider": "stripe"})
    info = await ensure_demo(app.state.sessionmaker, real)
    assert "subscription" not in info.created
    async with app.state.sessionmaker() as db:
        from corral.billing import subscriptions
        assert await subscriptions.get_subscription(db, info.org_id) is None


async def test_demo_has_a_release_in_progress(app: Any, settings: Settings,
                                              client: httpx.AsyncClient) -> None:
    """Version 2 is the product default as a phased rollout to half of the fleet, live
    (offline devices stay pending); a second run leaves it alone."""
    info = await ensure_demo(app.state.sessionmaker, settings)
    token = await _token(client, info)
    base = f"/v1/products/{info.product_slug}"
    [rollout] = (await client.get(f"{base}/rollouts", headers=bearer(token))).json()["rollouts"]
    assert (rollout["version"], rollout["percent"], rollout["state"]) == (2, 50.0, "active")
    progress = (await client.get(f"{base}/rollouts/{rollout['id']}", headers=bearer(token))
                ).json()["rollout"]["progress"]
    assert progress["targeted"] > 0 and progress["pending"] > 0, progress
    [fw] = (await client.get(f"{base}/firmware", headers=bearer(token))).json()
    assert (fw["version"], fw["product_default"]) == (2, True)
    assert "release" not in (await ensure_demo(app.state.sessionmaker, settings)).created
    assert len((await client.get(f"{base}/rollouts", headers=bearer(token))
                ).json()["rollouts"]) == 1
