"""Fleet alert rules: CRUD over /v1, raised and cleared by themselves with a corral/alert
event (seen by the product's stream and integrations) and an e-mail to the team."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from sqlalchemy import select

from corral.events.models import Event
from corral.fleet import alerts
from corral.fleet.models import FleetAlertRule
from corral.kit import clock
from corral.sessions.link import Hello
from helpers import add_device, bearer, new_user, owner_and_product
from test_sessions_core import ScriptedLink

DEV = "0123456789abcdef0123ab01"
DEV2 = "0123456789abcdef0123ab02"


@pytest.fixture
async def product(app: Any, client: Any) -> dict[str, Any]:
    tok, prod = await owner_and_product(client)
    await add_device(app, DEV, prod["id"])
    await add_device(app, DEV2, prod["id"])
    return {"token": tok, "product": prod}


async def alert_events(app: Any) -> list[tuple[str, dict[str, Any]]]:
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(Event).where(Event.name.like("corral/alert/%"))
                                 .order_by(Event.id))).scalars().all()
    return [(e.name, json.loads(e.data)) for e in rows]


async def tick(app: Any) -> list[alerts.Change]:
    rt = app.state.runtime
    return await alerts.run_pass(rt.sessionmaker, rt.writer)


async def test_rules_are_created_listed_changed_and_deleted(client, product):
    tok, base = product["token"], f"/v1/products/{product['product']['id']}/fleet/alerts"
    r = await client.post(base, headers=bearer(tok),
                          json={"kind": "online_below", "threshold": 2, "name": "Fleet down"})
    assert r.status_code == 201, r.text
    rule = r.json()["alert"]
    assert (rule["kind"], rule["threshold"], rule["active"]) == ("online_below", 2.0, False)
    r = await client.put(f"{base}/{rule['id']}", headers=bearer(tok),
                         json={"threshold": 1, "enabled": False})
    assert r.status_code == 200 and r.json()["alert"]["enabled"] is False, r.text
    r = await client.get(base, headers=bearer(tok))
    assert [a["threshold"] for a in r.json()["alerts"]] == [1.0]
    for bad in ({"kind": "nope", "threshold": 1}, {"kind": "error_rate_above", "threshold": 150},
                {"kind": "silent_longer", "threshold": 5}, {"kind": "online_below"},
                {"kind": "error_rate_above", "threshold": 5, "window_s": 10},
                {"kind": "online_below", "threshold": True}):
        r = await client.post(base, headers=bearer(tok), json=bad)
        assert r.status_code == 400 and r.json()["ok"] is False, (bad, r.text)
    r = await client.put(f"{base}/{rule['id']}", headers=bearer(tok),
                         json={"kind": "silent_longer"})
    assert r.status_code == 400
    eve = await new_user(client, "eve@example.com")
    r = await client.delete(f"{base}/{rule['id']}", headers=bearer(eve))
    assert r.status_code == 404
    r = await client.delete(f"{base}/{rule['id']}", headers=bearer(tok))
    assert r.status_code == 200
    r = await client.get(base, headers=bearer(tok))
    assert r.json()["alerts"] == []


async def test_online_below_raises_and_clears_itself_with_events_and_mail(
        app, client, product, mailbox):
    tok, prod = product["token"], product["product"]
    r = await client.post(f"/v1/products/{prod['id']}/fleet/alerts", headers=bearer(tok),
                          json={"kind": "online_below", "threshold": 1})
    assert r.status_code == 201, r.text
    [change] = await tick(app)
    assert change.raised and change.body["value"] == 0.0
    assert await tick(app) == []  # still below: nothing new
    s = await app.state.runtime.hub.open(Hello(DEV), ScriptedLink())
    [change] = await tick(app)
    assert not change.raised and change.body["value"] == 1.0
    events = await alert_events(app)
    assert [n for n, _ in events] == [alerts.RAISED, alerts.CLEARED]
    async with app.state.sessionmaker() as db:
        stored = (await db.execute(select(Event).where(Event.name == alerts.RAISED))).scalar_one()
    assert stored.product_id == prod["id"] and stored.source == "cloud"
    await app.state.runtime.mailer.deliver_due()
    subjects = [subject for _to, subject, _body in mailbox.sent]
    assert any("alert raised" in s for s in subjects) and any("alert cleared" in s
                                                              for s in subjects)
    await s.close("done")


async def test_silent_devices_and_error_rate(app, client, product, manual_clock):
    tok, prod = product["token"], product["product"]
    base = f"/v1/products/{prod['id']}/fleet/alerts"
    await client.post(base, headers=bearer(tok), json={"kind": "silent_longer",
                                                       "threshold": 600})
    await client.post(base, headers=bearer(tok), json={"kind": "error_rate_above",
                                                       "threshold": 40, "window_s": 900})
    hub = app.state.runtime.hub
    link = ScriptedLink()
    link.functions["ok"] = lambda arg: 1
    s = await hub.open(Hello(DEV), link)
    await s.describe(functions=["ok"])
    await s.close("gone")  # last heard now
    assert await tick(app) == []
    manual_clock.set(clock.now() + dt.timedelta(seconds=601))
    tally = app.state.runtime.fleet
    tally.call(DEV2, prod["id"], "function", "failure")
    tally.call(DEV2, prod["id"], "function", "success")
    await tally.flush()
    changes = await tick(app)
    by_kind = {c.body["kind"]: c for c in changes}
    assert by_kind["silent_longer"].body["devices"] == [DEV]
    assert by_kind["error_rate_above"].body["value"] == 50.0
    r = await client.get(base, headers=bearer(tok))
    assert all(a["active"] for a in r.json()["alerts"])
    async with app.state.sessionmaker() as db:
        rules = (await db.execute(select(FleetAlertRule))).scalars().all()
    assert {r.kind for r in rules if r.active} == {"silent_longer", "error_rate_above"}
