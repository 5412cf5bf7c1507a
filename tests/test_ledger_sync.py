"""Ledgers reach MQTT devices over real sockets (docs/mqtt.md "Ledgers"): corral's MQTT
listener, the SDK's ``device.ledger()``; an online device gets a change at once, an offline
one when it next connects and only when something changed; device overrides product
overrides owner; versions never go down; acknowledgements are recorded and listed; a device
writes its device-to-cloud ledger (schema violations refused with the reason); another
tenant's ledger never reaches a device."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from corral.device import Device
from corral.device.errors import PublishRefused
from corral.ledgers.sync_models import LedgerDeviceState
from devicekit import mqtt_listener, owner_product_devices, provision
from helpers import bearer, make_product, new_user
from mqtt_helpers import until

WAIT = 15.0


@pytest.fixture
async def w(app, client) -> AsyncIterator[Any]:
    token, product, devs = await owner_product_devices(client, 3)
    devices: list[Device] = []
    async with mqtt_listener(app) as mqtt:

        def device(i: int = 0, **kw: Any) -> Device:
            did, secret = devs[i]
            d = Device(did, secret, "127.0.0.1", mqtt.port, reconnect_initial=0.05, **kw)
            devices.append(d)
            return d

        try:
            yield SimpleNamespace(app=app, client=client, token=token, product=product,
                                  ids=[d for d, _ in devs], device=device, port=mqtt.port,
                                  secrets=[s for _, s in devs])
        finally:
            for d in devices:
                with contextlib.suppress(Exception):
                    await d.close()


async def define(w: Any, name: str, scope: str, direction: str = "CloudToDevice",
                 **extra: Any) -> None:
    r = await w.client.post("/v1/ledgers", headers=bearer(w.token), json={"ledger": {
        "name": name, "scope": scope, "direction": direction, **extra}})
    assert r.status_code == 201, r.text


async def put(w: Any, name: str, scope_value: str, data: dict[str, Any],
              mode: str = "Replace") -> dict[str, Any]:
    r = await w.client.put(f"/v1/ledgers/{name}/instances/{scope_value}",
                           headers=bearer(w.token), params={"set_mode": mode},
                           json={"instance": {"data": data}})
    assert r.status_code == 200, r.text
    return r.json()["instance"]


async def states(w: Any, device_id: str) -> dict[int, tuple[int, int | None]]:
    async with w.app.state.sessionmaker() as db:
        rows = (await db.execute(select(LedgerDeviceState).where(
            LedgerDeviceState.device_id == device_id))).scalars()
        return {r.ledger_id: (r.version, r.applied_version) for r in rows}


async def test_product_ledger_reaches_online_and_offline_devices(w: Any) -> None:
    await define(w, "config", "Product")
    await put(w, "config", str(w.product["id"]), {"interval": 10, "led": {"on": True}})
    dev = w.device(0)
    led = dev.ledger("config")
    changes: list[int] = []
    led.on_change(lambda ledger: changes.append(ledger.version))
    await dev.connect()
    await led.wait(within=WAIT)
    assert (led.version, led.get()) == (1, {"interval": 10, "led": {"on": True}})
    await until(lambda: states(w, w.ids[0]), WAIT, "the device's state")
    await until(lambda: _applied(w, w.ids[0], 1), WAIT, "the acknowledgement")
    # online: a change arrives at once (a merge keeps the other keys)
    await put(w, "config", str(w.product["id"]), {"led": {"on": False}}, mode="Merge")
    await led.wait(version=2, within=WAIT)
    assert led.get() == {"interval": 10, "led": {"on": False}}
    await until(lambda: _applied(w, w.ids[0], 2), WAIT, "the second acknowledgement")
    # offline: nothing is resent on reconnect when nothing changed ...
    await dev.close()
    dev2 = w.device(0)
    again = dev2.ledger("config")
    await dev2.connect()
    # ... but the new process holds nothing, so its sync ({"have": {}}) gets version 2
    await again.wait(version=2, within=WAIT)
    assert again.get() == {"interval": 10, "led": {"on": False}}
    await dev2.close()
    # changed while offline: the next connect gets only the newer version
    await put(w, "config", str(w.product["id"]), {"interval": 30})
    await dev.connect()
    await led.wait(version=3, within=WAIT)
    assert led.get() == {"interval": 30} and changes == [1, 2, 3]


async def _applied(w: Any, device_id: str, version: int) -> bool:
    return any(applied == version for _v, applied in (await states(w, device_id)).values())


async def test_device_overrides_product_overrides_owner_and_versions_only_rise(w: Any) -> None:
    await define(w, "settings", "Device")
    await put(w, "settings", "owner", {"mode": "eco", "limits": {"max": 5, "min": 1}})
    await put(w, "settings", f"product:{w.product['id']}", {"limits": {"max": 8}})
    await put(w, "settings", w.ids[1], {"mode": "boost"})
    a, b = w.device(0), w.device(1)
    la, lb = a.ledger("settings"), b.ledger("settings")
    await a.connect()
    await b.connect()
    await la.wait(within=WAIT)
    await lb.wait(within=WAIT)
    assert la.get() == {"mode": "eco", "limits": {"max": 8, "min": 1}}
    assert lb.get() == {"mode": "boost", "limits": {"max": 8, "min": 1}}
    # one device's own instance changes: only that device gets a new version
    await put(w, "settings", w.ids[1], {"mode": "off"})
    await lb.wait(version=2, within=WAIT)
    assert lb.get()["mode"] == "off"
    await w.app.state.runtime.ledger_sync.idle()
    assert la.version == 1
    # deleting the device's own instance falls back to the product's document: a NEW version
    r = await w.client.delete(f"/v1/ledgers/settings/instances/{w.ids[1]}",
                              headers=bearer(w.token))
    assert r.status_code == 200, r.text
    await lb.wait(version=3, within=WAIT)
    assert lb.get() == {"mode": "eco", "limits": {"max": 8, "min": 1}}


async def test_raw_mqtt_contract_and_stored_acknowledgement(w: Any) -> None:
    """A device that is not the SDK: subscribes, is sent what it has not acknowledged, and
    after acknowledging is sent nothing on its next subscription."""
    await define(w, "config", "Product")
    await put(w, "config", str(w.product["id"]), {"a": 1})
    got: list[tuple[str, dict[str, Any]]] = []
    raw = w.device(2)
    # the SDK's on_ota seam gives raw access to messages on a reserved subtopic; here the
    # device subscribes itself, without the SDK's sync message
    conn_msgs: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    orig = raw._incoming

    def tap(conn: Any, p: Any) -> None:
        if "/ledgers/" in p.topic:
            conn_msgs.put_nowait((p.topic, p.payload))
            return
        orig(conn, p)

    raw._incoming = tap  # type: ignore[method-assign]
    await raw.connect()
    conn = raw._require()
    await raw._subscribe(conn, [f"devices/{w.ids[2]}/ledgers/#"])
    async with asyncio.timeout(WAIT):
        topic, payload = await conn_msgs.get()
    doc = json.loads(payload)
    got.append((topic, doc))
    assert topic == f"devices/{w.ids[2]}/ledgers/config"
    assert doc == {"name": "config", "version": 1, "scope": "Product", "data": {"a": 1}}
    await conn.publish(f"devices/{w.ids[2]}/ledgers/config/applied",
                       json.dumps({"version": 1}).encode(), 1)
    # a bad acknowledgement is refused with the reason (MQTT 5 PUBACK 0x99)
    with pytest.raises(PublishRefused) as refused:
        await conn.publish(f"devices/{w.ids[2]}/ledgers/config/applied", b"[1]", 1)
    assert refused.value.reason_code == 0x99
    await raw.close()
    raw2 = w.device(2)
    raw2._incoming = tap  # type: ignore[method-assign]
    await raw2.connect()
    await raw2._subscribe(raw2._require(), [f"devices/{w.ids[2]}/ledgers/#"])
    await w.app.state.runtime.ledger_sync.idle()
    await asyncio.sleep(0.3)
    assert conn_msgs.empty()  # acknowledged and unchanged: nothing again


async def test_device_to_cloud_write_with_schema(w: Any) -> None:
    await define(w, "status", "Device", "DeviceToCloud", schema={
        "type": "object", "properties": {"battery": {"type": "number", "maximum": 100}}})
    await define(w, "config", "Product")
    dev = w.device(0)
    await dev.connect()
    status = dev.ledger("status")
    await status.set({"battery": 87, "fw": "1.2"})
    await status.set({"battery": 80}, merge=True)
    r = await w.client.get(f"/v1/ledgers/status/instances/{w.ids[0]}", headers=bearer(w.token))
    assert r.status_code == 200, r.text
    inst = r.json()["instance"]
    assert inst["data"] == {"battery": 80, "fw": "1.2"}
    assert inst["updated_by"] == f"device:{w.ids[0]}"
    with pytest.raises(PublishRefused) as refused:
        await status.set({"battery": 101})
    assert refused.value.reason_code == 0x99 and "Invalid Schema" in str(refused.value)
    # a cloud-to-device ledger (or an unknown one) is not the device's to write
    for name in ("config", "nope"):
        with pytest.raises(PublishRefused) as refused:
            await dev.ledger(name).set({"x": 1})
        assert refused.value.reason_code == 0x87


async def test_another_tenants_ledger_never_reaches_a_device(w: Any) -> None:
    other = await new_user(w.client, "eve@example.com")
    r = await w.client.post("/v1/ledgers", headers=bearer(other), json={"ledger": {
        "name": "config", "scope": "Owner", "direction": "CloudToDevice"}})
    assert r.status_code == 201, r.text
    r = await w.client.put("/v1/ledgers/config/instances/owner", headers=bearer(other),
                           json={"instance": {"data": {"evil": True}}})
    assert r.status_code == 200, r.text
    eve_product = await make_product(w.client, other, platform_id=12)
    [(eve_dev, eve_secret)] = await provision(w.client, other, eve_product["slug"], 1)
    mine = w.device(0)
    led = mine.ledger("config")
    await mine.connect()
    # eve's own device gets eve's ledger ...
    theirs = Device(eve_dev, eve_secret, "127.0.0.1", w.port)
    try:
        tl = theirs.ledger("config")
        await theirs.connect()
        await tl.wait(within=WAIT)
        assert tl.get() == {"evil": True}
    finally:
        await theirs.close()
    # ... and mine nothing
    await w.app.state.runtime.ledger_sync.idle()
    assert led.version == 0 and led.get() == {}


async def test_devices_applied_versions_and_who_is_behind(w: Any) -> None:
    await define(w, "config", "Product")
    await define(w, "status", "Device", "DeviceToCloud")
    url = "/v1/ledgers/config/devices"
    r = await w.client.get(url, headers=bearer(w.token))
    assert r.status_code == 200, r.text
    # nothing written yet: every device holds "nothing", in sync
    assert {d["device_id"]: (d["latest_version"], d["in_sync"]) for d in r.json()["devices"]} \
        == {did: (0, True) for did in w.ids}
    await put(w, "config", str(w.product["id"]), {"a": 1})
    dev = w.device(0)
    led = dev.ledger("config")
    await dev.connect()
    await led.wait(within=WAIT)
    await until(lambda: _applied(w, w.ids[0], 1), WAIT, "the acknowledgement")

    async def listing(**params: Any) -> dict[str, Any]:
        r = await w.client.get(url, headers=bearer(w.token), params=params)
        assert r.status_code == 200, r.text
        return r.json()

    got = {d["device_id"]: d for d in (await listing())["devices"]}
    assert (got[w.ids[0]]["latest_version"], got[w.ids[0]]["applied_version"],
            got[w.ids[0]]["in_sync"]) == (1, 1, True)
    assert got[w.ids[1]]["in_sync"] is False and got[w.ids[1]]["applied_version"] is None
    behind = await listing(behind="true", product=w.product["slug"])
    assert sorted(d["device_id"] for d in behind["devices"]) == sorted(w.ids[1:])
    assert behind["meta"]["total"] == 2
    # a change while it is offline: the device is behind until it reconnects and acknowledges
    await dev.close()
    await put(w, "config", str(w.product["id"]), {"a": 2})
    stale = {d["device_id"]: d for d in (await listing(behind=1))["devices"]}
    assert (stale[w.ids[0]]["sent_version"], stale[w.ids[0]]["latest_version"]) == (1, 2)
    await dev.connect()
    await led.wait(version=2, within=WAIT)
    await until(lambda: _applied(w, w.ids[0], 2), WAIT, "the second acknowledgement")
    assert w.ids[0] not in {d["device_id"] for d in (await listing(behind=1))["devices"]}
    # errors: not a synced ledger, unknown ledger, unknown product, bad paging
    r = await w.client.get("/v1/ledgers/status/devices", headers=bearer(w.token))
    assert r.status_code == 400 and r.json()["error"] == "ledger_not_synced", r.text
    r = await w.client.get("/v1/ledgers/nope/devices", headers=bearer(w.token))
    assert r.status_code == 404, r.text
    r = await w.client.get(url, headers=bearer(w.token), params={"product": "nope"})
    assert r.status_code == 404, r.text
    r = await w.client.get(url, headers=bearer(w.token), params={"per_page": 0})
    assert r.status_code == 400, r.text


async def test_a_products_view_lists_only_its_devices(w: Any) -> None:
    await define(w, "config", "Owner")
    await put(w, "config", "owner", {"a": 1})
    other = await make_product(w.client, w.token, "Gadget", platform_id=12)
    [(stranger, _secret)] = await provision(w.client, w.token, other["slug"], 1)
    url = f"/v1/products/{w.product['slug']}/ledgers/config/devices"
    r = await w.client.get(url, headers=bearer(w.token), params={"product": other["slug"]})
    assert r.status_code == 200, r.text
    listed = {d["device_id"] for d in r.json()["devices"]}
    assert listed == set(w.ids) and stranger not in listed  # ?product= cannot widen it
    r = await w.client.get("/v1/ledgers/config/devices", headers=bearer(w.token))
    assert stranger in {d["device_id"] for d in r.json()["devices"]}
