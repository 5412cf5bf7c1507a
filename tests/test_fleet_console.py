"""The console's Fleet health page: rendered from the rollups with its charts, for a
product member; the permission matrix covers who may open it."""

from __future__ import annotations

import re

import pytest

from corral.fleet.models import FleetAlertRule
from corral.kit import clock
from corral.sessions.link import Hello
from helpers import settle_fleet
from test_permissions_matrix import console_headers, console_world
from test_sessions_core import ScriptedLink


async def test_fleet_health_page_shows_the_fleet(app, client, database_url):
    world = await console_world(app, database_url)
    did = "0123456789abcdef01234567"  # the world's product device
    s = await app.state.runtime.hub.open(Hello(did, firmware_version=4), ScriptedLink())
    await s.publish("temp", "1")
    async with app.state.sessionmaker() as db:
        db.add(FleetAlertRule(product_id=world.product.id, name="Few online",
                              kind="online_below", threshold=5, window_s=900, enabled=True,
                              active=False, created_at=clock.now()))
        await db.commit()
    await s.close("test: unplugged")
    s = await app.state.runtime.hub.open(Hello(did, firmware_version=4), ScriptedLink())
    await app.state.runtime.writer.stop()
    app.state.runtime.writer.start()
    await app.state.runtime.fleet.flush()
    r = await client.get(f"/console/products/{world.product.slug}/fleet?range=hour",
                         headers=console_headers(world, "org:View-only"))
    assert r.status_code == 200, r.text
    html = r.text
    assert "<h1>Fleet health</h1>" in html and html.count("<svg class=\"chart\"") == 3
    assert 'aria-label="Data operations: highest 1 ' in html  # the one counted publish
    assert re.search(r"<dt>Data operations</dt><dd>1</dd>", html)
    assert "<th scope=\"col\">Timed out</th>" in html and "data-timeout-rate" in html
    assert re.search(r"<dt>Online now</dt><dd>1</dd>", html)
    assert "Few online" in html and "<td>4</td>" in html  # the rule; firmware version 4
    assert "<td>test: unplugged</td><td>1</td>" in html
    r = await client.get(f"/console/products/{world.product.slug}/fleet?range=nope&fw=x",
                         headers=console_headers(world, "org:View-only"))
    assert r.status_code == 200  # an unknown range or version shows the default
    await s.close("done")


async def test_fleet_map_places_each_located_device(app, client, database_url):
    world = await console_world(app, database_url)
    did = "0123456789abcdef01234567"
    async with app.state.sessionmaker() as db:
        from corral.products.models import Product

        product = await db.get(Product, world.product.id)
        product.settings = {**(product.settings or {}), "location": {"opt_in": True}}
        await db.commit()
    s = await app.state.runtime.hub.open(Hello(did), ScriptedLink())
    await s.publish("loc", '{"lat": 45, "lon": 90}')
    await app.state.runtime.locations.drain()
    r = await client.get(f"/console/products/{world.product.slug}/fleet/map",
                         headers=console_headers(world, "org:View-only"))
    assert r.status_code == 200, r.text
    # 2 px per degree: lon 90 -> x 540, lat 45 -> y 90; online: green
    assert '<circle cx="540.0" cy="90.0" r="3" fill="#1f9d55">' in r.text
    await s.close("done")


async def test_fleet_health_page_filters_by_group_and_device_os(app, client, database_url):
    """The group and Device OS filters count only the selected devices; an unknown group
    is named on the page, which then shows the whole product."""
    from sqlalchemy import func, select

    from corral.devices.models import Device, DeviceGroup, DeviceGroupMember

    world = await console_world(app, database_url)
    did = "0123456789abcdef01234567"  # the world's product device
    async with app.state.sessionmaker() as db:
        group = DeviceGroup(product_id=world.product.id, name="pilot")
        db.add(group)
        await db.flush()
        db.add(DeviceGroupMember(device_id=did, group_id=group.id))
        await db.commit()
        total = (await db.execute(select(func.count()).select_from(Device).where(
            Device.product_id == world.product.id))).scalar_one()
    assert total > 1
    s = await app.state.runtime.hub.open(Hello(did, firmware_version=4, system_version="6.2.0"),
                                         ScriptedLink())
    await s.publish("temp", "1")
    await app.state.runtime.writer.stop()
    app.state.runtime.writer.start()
    await app.state.runtime.fleet.flush()
    headers = console_headers(world, "org:View-only")
    base = f"/console/products/{world.product.slug}/fleet?range=hour"
    for query in ("&group=pilot", "&os=6.2.0", "&group=pilot&fw=4"):
        r = await client.get(base + query, headers=headers)
        assert r.status_code == 200, r.text
        assert re.search(r"<dt>Devices</dt><dd>1</dd>", r.text), query
        assert re.search(r"<dt>Events received</dt><dd>1</dd>", r.text), query
        assert "data-filtered" in r.text and "data-filter-error" not in r.text
    assert '<option value="pilot" selected>pilot</option>' in r.text
    r = await client.get(base + "&os=5.0.0", headers=headers)
    assert re.search(r"<dt>Devices</dt><dd>0</dd>", r.text)
    r = await client.get(base + "&group=nope", headers=headers)
    assert r.status_code == 200 and "data-filter-error" in r.text and "Group nope not found" \
        in r.text
    assert re.search(rf"<dt>Devices</dt><dd>{total}</dd>", r.text)
    await s.close("done")


@pytest.mark.parametrize("query", [
    "fleet?fw=%C2%B2", "fleet?fw=99999999999999999999", "customers?page=%C2%B2",
    "customers?page=99999999999999999999", "logs?before_id=%C2%B2",
    "logs?before_id=99999999999999999999"])
async def test_console_numbers_in_queries_are_ascii_ids_or_ignored(app, client, database_url,
                                                                    query):
    """A Unicode digit (`²`: str.isdigit() says yes, int() refuses) or a number beyond the
    column's range in a console page's query is ignored, never a 500 (kit.ids.path_id, the
    rule the API's ids follow)."""
    world = await console_world(app, database_url)
    r = await client.get(f"/console/products/{world.product.slug}/{query}",
                         headers=console_headers(world, "org:Owner"))
    assert r.status_code == 200, r.text[:300]


async def test_organization_fleet_health_page(app, client, database_url):
    """The organization's page: its products' rows and the total from the same numbers as
    ``/v1/orgs/:org/fleet/health``, linked from the organization's navigation; the filters
    carry to each product's page; a refused filter is named and all devices are shown."""
    world = await console_world(app, database_url)
    did = "0123456789abcdef01234567"  # the world's product device
    s = await app.state.runtime.hub.open(Hello(did, firmware_version=4), ScriptedLink())
    await s.publish("temp", "1")
    await s.publish("temp", "2")
    await settle_fleet(app)
    headers = console_headers(world, "org:View-only")
    base = f"/console/orgs/{world.org.slug}/fleet"
    r = await client.get(f"{base}?range=hour", headers=headers)
    assert r.status_code == 200, r.text
    html = r.text
    api = (await client.get(f"/v1/orgs/{world.org.slug}/fleet/health",
                            headers={"Authorization": f"Bearer {world.token}"})).json()
    [row] = api["products"]
    assert row["events"] == 2 and row["online"] == 1
    assert "<h1>Fleet health</h1>" in html
    assert f'<tr data-product="{world.product.slug}">' in html
    assert re.search(r"<dt>Events received</dt><dd>2</dd>", html)
    assert re.search(r"<dt>Online now</dt><dd>1</dd>", html)
    assert f'href="/console/orgs/{world.org.slug}/fleet" aria-current="page"' in html
    assert f'href="/console/products/{world.product.slug}/fleet?range=hour&amp;fw=&amp;' \
           'group=&amp;os="' in html
    r = await client.get(f"{base}?group=Not+A+Name&fw=4", headers=headers)
    assert r.status_code == 200 and "data-filter-error" in r.text
    assert re.search(r"<dt>Events received</dt><dd>2</dd>", r.text)  # firmware 4's
    r = await client.get(f"{base}?fw=5", headers=headers)
    assert re.search(r"<dt>Events received</dt><dd>0</dd>", r.text) and "data-filtered" in r.text
    r = await client.get(f"{base}?group=nope", headers=headers)
    assert "data-filter-error" in r.text and "Group nope not found" in r.text
    await s.close("done")
