"""SIM cards: product import (list and file), listing with paging and filters, release,
tenancy, the user's own SIMs, cellular data per SIM and day, and what a SIM's state does to
its device: a device that reports an ICCID (MQTT describe, the session core) is cellular and
its traffic is counted; deactivating the SIM closes its session and refuses reconnects until
it is reactivated."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from corral.device import ConnectError
from corral.device import Device as MqttDevice
from corral.devices.models import Device
from corral.metering import sims
from corral.sessions.link import Hello, Refused
from devicekit import WAIT, eventually, mqtt_listener, provision
from helpers import bearer, seed, user_id
from meteringkit import at, give_sim, team_world, tick
from sessionkit import ScriptedDevice, connect

A = "0123456789abcdef0000cc01"
B = "0123456789abcdef0000cc02"
S1 = "89014103211118510701"
S2 = "89014103211118510702"
S3 = "8901410321111851070F"
S4 = "89014103211118510704"


@pytest.fixture
def settings(settings: Any) -> Any:
    return settings.model_copy(update={"token_lifetime_s": 20 * 365 * 86400})


async def _device(app: Any, device_id: str) -> Device:
    async with app.state.sessionmaker() as db:
        row = await db.get(Device, device_id)
        assert row is not None
        return row


async def test_import_list_get_release_and_tenancy(client, app):
    w = await team_world(client, app)
    ada, widget, gadget = w["tokens"]["ada"], w["widget"], w["gadget"]
    base = f"/v1/products/{widget['slug']}/sims"
    r = await client.post(base, headers=bearer(ada),
                          json={"sims": [S1, S2.lower(), "12345", S1, "x" * 80]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and body["imported"] == [S1, S2]
    assert body["existing"] == [] and body["taken"] == []
    assert body["invalid"] == ["12345", "x" * 40 + "..."]
    # a file, one per line (the same SIM again is already there)
    r = await client.post(base, headers=bearer(ada),
                          files={"file": ("sims.txt", f"{S3.lower()}\r\n\n{S1}\n".encode())})
    assert r.status_code == 200, r.text
    assert r.json()["imported"] == [S3] and r.json()["existing"] == [S1]
    # another product of the org cannot take them
    r = await client.post(f"/v1/products/{gadget['slug']}/sims", headers=bearer(ada),
                          data={"sims": f"{S1}, {S4}"})
    assert r.status_code == 200 and r.json()["taken"] == [S1] and r.json()["imported"] == [S4]
    # listing: ICCID order, paging, filters
    r = await client.get(base, headers=bearer(w["tokens"]["view"]),
                         params={"perPage": 2, "page": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["iccid"] for s in body["sims"]] == [S1, S2]
    assert body["meta"] == {"total": 3, "page": 1, "per_page": 2, "total_pages": 2}
    first = body["sims"][0]
    assert first["_id"] == S1 and first["status"] == "active"
    assert first["last_device_id"] is None and first["product_id"] == widget["id"]
    r = await client.get(base, headers=bearer(ada), params={"per_page": 2, "page": 2})
    assert [s["iccid"] for s in r.json()["sims"]] == [S3]
    r = await client.get(base, headers=bearer(ada), params={"iccid": S2})
    assert [s["iccid"] for s in r.json()["sims"]] == [S2]
    # a device of the product reports S2: it shows as its last device (deviceId/deviceName)
    await seed(app, {"id": A, "product_id": widget["id"], "platform_id": 13, "name": "pump"})
    await give_sim(app, A, S2)
    r = await client.get(base, headers=bearer(ada), params={"deviceName": "pump"})
    sims_ = r.json()["sims"]
    assert [s["iccid"] for s in sims_] == [S2] and sims_[0]["last_device_name"] == "pump"
    r = await client.get(base, headers=bearer(ada), params={"deviceId": A.upper()})
    assert [s["iccid"] for s in r.json()["sims"]] == [S2]
    assert (await _device(app, A)).cellular is True
    # bad input
    for params in ({"page": 0}, {"perPage": 101}, {"per_page": "x"}):
        r = await client.get(base, headers=bearer(ada), params=params)
        assert r.status_code == 400 and r.json()["ok"] is False, params
    for payload in ({}, {"sims": []}, {"sims": [1, 2]}, {"sims": ["1"] * 1001}):
        r = await client.post(base, headers=bearer(ada), json=payload)
        assert r.status_code == 400 and r.json()["ok"] is False, payload
    r = await client.post(base, headers=bearer(ada), files={"file": ("s.bin", b"\x00\x01")})
    assert r.status_code == 400 and r.json()["error"] == "invalid_file"
    # one SIM: another product's is not found; a bad ICCID is a 400
    r = await client.get(f"{base}/{S2}", headers=bearer(ada))
    assert r.status_code == 200 and r.json()["sim"]["last_device_id"] == A
    r = await client.get(f"{base}/{S4}", headers=bearer(ada))
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = await client.get(f"{base}/not-an-iccid", headers=bearer(ada))
    assert r.status_code == 400 and r.json()["error"] == "invalid_iccid"
    # roles: Support reads but may not import or release
    r = await client.post(base, headers=bearer(w["tokens"]["sup"]), json={"sims": [S4]})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = await client.delete(f"{base}/{S1}", headers=bearer(w["tokens"]["sup"]))
    assert r.status_code == 403
    # release: gone from the product; another product may import it then
    r = await client.delete(f"{base}/{S1}", headers=bearer(w["tokens"]["dev"]))
    assert r.status_code == 204, r.text
    assert (await client.get(f"{base}/{S1}", headers=bearer(ada))).status_code == 404
    assert (await client.delete(f"{base}/{S1}", headers=bearer(ada))).status_code == 404
    r = await client.post(f"/v1/products/{gadget['slug']}/sims", headers=bearer(ada),
                          json={"sims": [S1]})
    assert r.json()["imported"] == [S1]
    # an outsider sees no product at all
    other = await client.get(base, headers=bearer(await _outsider(client)))
    assert other.status_code == 404


async def _outsider(client: Any) -> str:
    from helpers import new_user

    return await new_user(client, "eve@example.com")


async def test_my_sims_list_check_release_and_data_usage(client, app, manual_clock):
    manual_clock.set(at(2026, 3, 2, 10))
    w = await team_world(client, app)
    uid = await user_id(app, "dev@example.com")
    tok = w["tokens"]["dev"]
    await seed(app, {"id": B, "owner_user_id": uid, "platform_id": 13, "name": "tracker"})
    await give_sim(app, B, S3)
    r = await client.get("/v1/sims", headers=bearer(tok))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["iccid"] for s in body["sims"]] == [S3] and body["meta"]["total"] == 1
    assert body["sims"][0]["last_device_name"] == "tracker"
    assert body["sims"][0]["owner_user_id"] == uid
    r = await client.get("/v1/sims", headers=bearer(w["tokens"]["ada"]))
    assert r.json()["sims"] == []  # someone else's
    assert (await client.head(f"/v1/sims/{S3}", headers=bearer(tok))).status_code == 200
    r = await client.head(f"/v1/sims/{S3}", headers=bearer(w["tokens"]["ada"]))
    assert r.status_code == 404
    # cellular data: the session's bytes, folded by the tick, recorded per day
    s = await connect(app, B, ScriptedDevice())
    s.count_bytes(1_500_000)
    await s.close("bye")
    await tick(app)
    manual_clock.set(at(2026, 3, 4, 10))
    s = await connect(app, B, ScriptedDevice())
    s.count_bytes(500_000)
    await s.close("bye")
    await tick(app)
    r = await client.get(f"/v1/sims/{S3}/data_usage", headers=bearer(tok))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["iccid"] == S3 and body["total_mbs_used"] == 2.0
    days = {d["date"]: d for d in body["usage_by_day"]}
    assert list(days) == ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"]
    assert days["2026-03-02"]["mbs_used"] == 1.5 and days["2026-03-03"]["mbs_used"] == 0
    assert days["2026-03-04"] == {"date": "2026-03-04", "mbs_used": 0.5,
                                  "mbs_used_cumulative": 2.0}
    # the month's usage shows the same bytes
    r = await client.get(f"/v1/sims/{S3}/data_usage", headers=bearer(w["tokens"]["ada"]))
    assert r.status_code == 404
    r = await client.delete(f"/v1/sims/{S3}", headers=bearer(tok))
    assert r.status_code == 204
    assert (await client.get("/v1/sims", headers=bearer(tok))).json()["sims"] == []
    # the device reports it again: the SIM is back, with its history
    await give_sim(app, B, S3)
    r = await client.get(f"/v1/sims/{S3}/data_usage", headers=bearer(tok))
    assert r.json()["total_mbs_used"] == 2.0


async def test_product_data_usage_sums_its_sims(client, app, manual_clock):
    manual_clock.set(at(2026, 5, 1, 9))
    w = await team_world(client, app)
    ada, widget = w["tokens"]["ada"], w["widget"]
    await seed(app, {"id": A, "product_id": widget["id"], "platform_id": 13},
               {"id": B, "product_id": widget["id"], "platform_id": 13})
    await give_sim(app, A, S1)
    await give_sim(app, B, S2)
    for device, n in ((A, 250_000), (B, 750_000)):
        s = await connect(app, device, ScriptedDevice())
        s.count_bytes(n)
        await s.close("bye")
    await tick(app)
    r = await client.put(f"/v1/products/{widget['slug']}/sims/{S2}", headers=bearer(ada),
                         json={"action": "deactivate"})
    assert r.status_code == 200
    r = await client.get(f"/v1/products/{widget['slug']}/sims/data_usage",
                         headers=bearer(w["tokens"]["view"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total_mbs_used"] == 1.0 and body["total_active_sim_cards"] == 1
    assert body["usage_by_day"] == [{"date": "2026-05-01", "mbs_used": 1.0,
                                     "mbs_used_cumulative": 1.0}]
    r = await client.get(f"/v1/products/{widget['slug']}/sims/{S1}/data_usage",
                         headers=bearer(ada))
    assert r.json()["total_mbs_used"] == 0.25
    r = await client.get(f"/v1/orgs/{w['org']['slug']}/usage", headers=bearer(ada))
    assert r.json()["usage"]["cellular_mb"] == 1.0, r.json()


async def test_describing_an_iccid_makes_a_device_cellular(client, app):
    w = await team_world(client, app)
    widget = w["widget"]
    await seed(app, {"id": A, "product_id": widget["id"], "platform_id": 12})
    s = await connect(app, A, ScriptedDevice())
    s.count_bytes(10_000)  # not cellular yet: not counted
    assert s.unmetered_bytes == 0
    with pytest.raises(Refused):
        await s.describe(iccid="1234")
    with pytest.raises(Refused):
        await s.describe(cellular="yes")  # type: ignore[arg-type]
    await s.describe(iccid=S1.lower())
    assert s.facts.cellular and s.facts.iccid == S1
    s.count_bytes(100)
    assert s.unmetered_bytes == 100
    row = await _device(app, A)
    assert row.cellular and row.iccid == S1
    r = await client.get(f"/v1/products/{widget['slug']}/sims/{S1}",
                         headers=bearer(w["tokens"]["ada"]))
    assert r.status_code == 200 and r.json()["sim"]["last_device_id"] == A
    await s.close("bye")
    # cellular without a SIM
    await seed(app, {"id": B, "product_id": widget["id"], "platform_id": 12})
    s = await connect(app, B, ScriptedDevice())
    await s.describe(cellular=True)
    assert (await _device(app, B)).cellular and (await _device(app, B)).iccid is None
    await s.close("bye")


async def test_a_released_sim_comes_back_when_its_device_reports_it_again(client, app):
    """Releasing a SIM deletes its row but not the device's ICCID: the device's next
    connection that reports the SIM makes it the product's SIM again (as release promises),
    rather than being skipped as "nothing changed"."""
    w = await team_world(client, app)
    ada, widget = w["tokens"]["ada"], w["widget"]
    await seed(app, {"id": A, "product_id": widget["id"], "platform_id": 13})
    s = await connect(app, A, ScriptedDevice())
    await s.describe(iccid=S1)
    await s.close("bye")
    url = f"/v1/products/{widget['slug']}/sims/{S1}"
    assert (await client.delete(url, headers=bearer(ada))).status_code == 204
    assert (await client.get(url, headers=bearer(ada))).status_code == 404
    s = await connect(app, A, ScriptedDevice())
    await s.describe(iccid=S1)
    r = await client.get(url, headers=bearer(ada))
    assert r.status_code == 200 and r.json()["sim"]["last_device_id"] == A, r.text
    await s.describe(iccid=S1)  # held again: nothing more to record
    await s.close("bye")


async def test_deactivating_a_sim_disconnects_and_refuses_the_device(client, app):
    w = await team_world(client, app)
    ada, widget = w["tokens"]["ada"], w["widget"]
    await seed(app, {"id": A, "product_id": widget["id"], "platform_id": 13})
    await give_sim(app, A, S1)
    link = ScriptedDevice()
    s = await connect(app, A, link)
    url = f"/v1/products/{widget['slug']}/sims/{S1}"
    r = await client.put(url, headers=bearer(ada), json={"action": "deactivate"})
    assert r.status_code == 200 and r.json()["sim"]["status"] == "inactive_user_deactivated"

    async def closed() -> bool:
        return s.closed

    await eventually(closed)
    assert s.close_reason == sims.DEACTIVATED_REASON
    hub = app.state.runtime.hub
    with pytest.raises(Refused) as refused:
        await asyncio.wait_for(hub.open(Hello(A), ScriptedDevice()), WAIT)
    assert refused.value.code == "denied"
    r = await client.put(url, headers=bearer(ada), json={"action": "reactivate"})
    assert r.status_code == 200 and r.json()["sim"]["activations_count"] == 2
    s = await connect(app, A, ScriptedDevice())
    assert not s.closed
    await s.close("bye")


async def test_mqtt_device_reports_its_sim_and_is_refused_while_deactivated(client, app):
    w = await team_world(client, app)
    ada, widget = w["tokens"]["ada"], w["widget"]
    [(did, secret)] = await provision(client, ada, widget["slug"])
    async with mqtt_listener(app) as mqtt:
        dev = MqttDevice(did, secret, "127.0.0.1", mqtt.port, reconnect_initial=0.05,
                         reconnect_max=0.2)
        dev.describe(iccid=S2, firmware_version=1)
        async with asyncio.timeout(WAIT):
            await dev.connect()
        try:
            async def described() -> bool:
                row = await _device(app, did)
                return row.cellular and row.iccid == S2

            await eventually(described)
            await dev.publish("hello", "x" * 200)
            url = f"/v1/products/{widget['slug']}/sims/{S2}"
            r = await client.get(url, headers=bearer(ada))
            assert r.status_code == 200 and r.json()["sim"]["last_device_id"] == did
            r = await client.put(url, headers=bearer(ada), json={"action": "deactivate"})
            assert r.status_code == 200

            async def offline() -> bool:
                row = await _device(app, did)
                return not row.online and row.last_disconnect_reason == sims.DEACTIVATED_REASON

            await eventually(offline)
        finally:
            await dev.close()
        again = MqttDevice(did, secret, "127.0.0.1", mqtt.port)
        with pytest.raises(ConnectError):
            async with asyncio.timeout(WAIT):
                await again.connect()
        await again.close()
    await tick(app)
    # its traffic while cellular was counted (MQTT packets, both ways)
    from meteringkit import counters

    rows = [c for c in await counters(app) if c.device_id == did]
    assert rows and rows[0].cellular_bytes > 200


async def test_a_sim_another_tenant_holds_keeps_its_holder(client, app):
    """A SIM someone else holds keeps its holder when another tenant's device reports it."""
    w = await team_world(client, app)
    widget, gadget = w["widget"], w["gadget"]
    await seed(app, {"id": A, "product_id": widget["id"], "platform_id": 13},
               {"id": B, "product_id": gadget["id"], "platform_id": 13})
    await give_sim(app, A, S1)
    await give_sim(app, B, S1)
    r = await client.get(f"/v1/products/{widget['slug']}/sims/{S1}",
                         headers=bearer(w["tokens"]["ada"]))
    assert r.json()["sim"]["last_device_id"] == A
    r = await client.get(f"/v1/products/{gadget['slug']}/sims/{S1}",
                         headers=bearer(w["tokens"]["ada"]))
    assert r.status_code == 404


def test_iccid_entries() -> None:
    assert sims.is_iccid(S3) and not sims.is_iccid("8901") and not sims.is_iccid(None)
    assert sims.read_entries(f"{S1},{S2} {S3}", None) == [S1, S2, S3]
    assert sims.read_entries(None, f"\ufeff{S1}\n".encode()) == [S1]
