"""Flashing one device with a binary over the other transports: an MQTT device (corral's
SDK with its OTA updater) downloads THAT binary from its short-lived link, checks it and
restarts; the update is applied when it comes back. A Gen 3 device over UDP/DTLS is in
test_flash_device_udp.py; TCP in test_flash_device.py."""

from __future__ import annotations

from typing import Any

import pytest

import test_firmware_delivery_mqtt
from corral.firmware.module import build_module
from helpers import bearer
from mqtt_helpers import device_row, events, until
from test_firmware_delivery_mqtt import state_is, updates_of

w = test_firmware_delivery_mqtt.w
settings = test_firmware_delivery_mqtt.settings

WAIT = 10.0


async def flash(w: Any, did: str, data: bytes, *, product: bool = True) -> Any:
    path = f"/v1/products/{w.product['id']}/devices/{did}" if product else f"/v1/devices/{did}"
    return await w.client.put(path, headers=bearer(w.token), data={"latest": "true"},
                              files={"file": ("app.bin", data, "application/octet-stream")})


async def test_an_mqtt_device_downloads_and_applies_a_flashed_binary(w):
    d, u = w.device(0, version=3)
    did, other = w.ids[0], w.ids[1]
    await d.connect()
    await until(lambda: _online(w, did), WAIT, "online")
    data = bytes((i * 5 + 1) % 256 for i in range(5000))  # opaque: MQTT devices run anything
    r = await flash(w, did, data)
    assert r.status_code == 200 and r.json() == {"id": did, "status": "Update started"}, r.text
    await until(lambda: state_is(w, did, "applied"), WAIT, "applied")
    assert u.images == [(3, data)]  # type: ignore[attr-defined]
    assert d.connects == 2  # it restarted on what it was sent
    [up] = await updates_of(w, did)
    assert (up["trigger"], up["transport"], up["bytes_sent"], up["firmware_id"]) == \
        ("binary", "mqtt", 5000, None)
    assert [e.data for e in await events(w.app, did, "spark/flash/status")] == \
        ["started", "success"]
    assert await updates_of(w, other) == []


async def test_an_mqtt_device_gets_a_module_with_its_version(w):
    d, u = w.device(0, version=1)
    did = w.ids[0]
    await d.connect()
    await until(lambda: _online(w, did), WAIT, "online")
    data = build_module(b"\x01" * 3000, platform_id=12, product_id=12, product_version=5)
    assert (await flash(w, did, data)).status_code == 200
    await until(lambda: state_is(w, did, "applied"), WAIT, "applied")
    assert u.images == [(5, data)]  # type: ignore[attr-defined]
    assert (await device_row(w.app, did)).firmware_version == 5


@pytest.mark.parametrize("platform", [6, 32])
async def test_an_mqtt_device_refuses_a_module_for_another_platform(w, platform):
    d, _ = w.device(0)
    did = w.ids[0]
    await d.connect()
    await until(lambda: _online(w, did), WAIT, "online")
    data = build_module(b"\x01" * 3000, platform_id=platform, product_version=5)
    r = await flash(w, did, data)
    assert r.status_code == 400 and r.json()["error"] == "platform_mismatch", r.text
    assert await updates_of(w, did) == []


async def _online(w: Any, did: str) -> bool:
    return bool((await device_row(w.app, did)).online)
