"""Flashing one device with a binary (``PUT /v1/devices/:id`` and
``PUT /v1/products/:product/devices/:id`` with a multipart ``file``), over real sockets:
a Particle device on TCP (corral's simulated Device OS) gets THAT binary by OTA, reports
``spark/flash/status``, and the update is applied when it comes back on the binary's
PRODUCT_VERSION; who may flash follows Particle; bad binaries, an offline device and
malformed requests are refused with Particle's error shape and nothing is written."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select

import test_firmware_delivery_particle
import test_particle_gateway
from corral.firmware.models import DeviceBinary, DeviceUpdate
from corral.firmware.module import build_module
from corral.firmware.storage import blob_path
from helpers import add_role, bearer, new_user
from meteringkit import counters
from mqtt_helpers import DEV, DEV2, device_row, events, until
from test_firmware_delivery_particle import reboot, updates_of
from test_particle_gateway import echo_device

gw = test_particle_gateway.gw
settings = test_firmware_delivery_particle.settings  # the same fast retries and rates

WAIT = 10.0
SUPPORT = "support@example.com"


def app_bin(version: int | None = 7, platform: int = 6, size: int = 2500, **kw: Any) -> bytes:
    """A user application as ``particle compile`` makes it (Device OS 4+: the platform ID in
    the product ID field)."""
    return build_module(bytes((i * 7 + 3) % 253 for i in range(size)), platform_id=platform,
                        product_id=platform, product_version=version, **kw)


async def put_file(gw: Any, data: bytes, *, did: str = DEV, product: bool = True,
                   token: str | None = None, fields: dict[str, str] | None = None,
                   name: str = "file") -> Any:
    path = f"/v1/products/{gw.product['id']}/devices/{did}" if product else f"/v1/devices/{did}"
    return await gw.client.put(path, headers=bearer(token or gw.token),
                               data={"latest": "true", **(fields or {})},
                               files={name: ("app.bin", data, "application/octet-stream")})


async def online(gw: Any, did: str = DEV) -> bool:
    return bool((await device_row(gw.app, did)).online)


async def state_is(gw: Any, state: str, did: str = DEV) -> bool:
    ups = await updates_of(gw, did)
    return bool(ups) and ups[0]["state"] == state


async def update_rows(gw: Any) -> int:
    async with gw.app.state.sessionmaker() as db:
        return int((await db.execute(select(func.count()).select_from(DeviceUpdate)))
                   .scalar_one())


async def test_a_binary_is_flashed_to_one_device_and_applied(gw):
    other = echo_device(gw, did=DEV2, keyname="dev2", product_version=1)
    await other.connect("127.0.0.1", gw.port)
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: online(gw), WAIT, "online")
    data = app_bin(7)
    before = [(c.events_published, c.events_delivered) for c in await counters(gw.app, DEV)]

    r = await put_file(gw, data)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": DEV, "status": "Update started"}
    await until(lambda: dev.updates, WAIT, "the OTA image")
    assert dev.updates == [data]  # THAT binary, to THAT device
    await gw.app.state.runtime.delivery.idle()
    assert other.updates == []
    after = [(c.events_published, c.events_delivered) for c in await counters(gw.app, DEV)]
    assert before == after  # OTA is not a data operation (seed 004)
    assert [e.data for e in await events(gw.app, DEV, "spark/flash/status")] == \
        ["started", "success"]

    dev = await reboot(gw, dev, 7)
    await until(lambda: state_is(gw, "applied"), WAIT, "applied")
    [u] = await updates_of(gw)
    assert (u["trigger"], u["firmware_id"], u["version"], u["from_version"], u["transport"]) \
        == ("binary", None, 7, 1, "particle")
    assert u["binary_id"] is not None
    assert (await device_row(gw.app)).firmware_version == 7
    async with gw.app.state.sessionmaker() as db:
        b = await db.get(DeviceBinary, u["binary_id"])
        assert b is not None and b.size == len(data) and b.platform_id == 6
        assert blob_path(gw.app.state.settings, b.sha256).read_bytes() == data
    await gw.app.state.runtime.delivery.idle()
    assert dev.updates == []  # running it: nothing more is sent

    # the same binary again is stored once (content-addressed)
    r = await put_file(gw, data)
    assert r.status_code == 200, r.text
    async with gw.app.state.sessionmaker() as db:
        assert (await db.execute(select(func.count()).select_from(DeviceBinary))
                ).scalar_one() == 1


async def test_a_binary_without_a_product_version_is_applied_when_the_device_returns(gw):
    dev = echo_device(gw, product_version=4)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: online(gw), WAIT, "online")
    data = app_bin(None)
    r = await put_file(gw, data, fields={"file_type": "binary"})
    assert r.status_code == 200, r.text
    await until(lambda: dev.updates, WAIT, "the OTA image")
    await gw.app.state.runtime.delivery.idle()
    dev = await reboot(gw, dev, 4)  # the simulator keeps its version for such an image
    await until(lambda: state_is(gw, "applied"), WAIT, "applied")
    [u] = await updates_of(gw)
    assert u["version"] == 4 and u["bytes_sent"] == len(data)


async def test_who_may_flash_a_product_device(gw):
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: online(gw), WAIT, "online")
    support = await new_user(gw.client, SUPPORT)
    await add_role(gw.app, SUPPORT, gw.product, "support")
    r = await put_file(gw, app_bin(), token=support)
    assert r.status_code == 403, r.text
    assert r.json()["ok"] is False and "development" in r.json()["error_description"]
    assert await update_rows(gw) == 0
    # a development device may be flashed by whoever may update the device
    r = await gw.client.put(f"/v1/products/{gw.product['id']}/devices/{DEV}",
                            headers=bearer(gw.token), json={"development": True})
    assert r.status_code == 200, r.text
    r = await put_file(gw, app_bin(), token=support)
    assert r.status_code == 200, r.text
    await until(lambda: dev.updates, WAIT, "the OTA image")
    # a stranger does not see the device at all; a viewer may not update it
    stranger = await new_user(gw.client, "stranger@example.com")
    assert (await put_file(gw, app_bin(), token=stranger, product=False)).status_code == 404
    viewer = await new_user(gw.client, "viewer@example.com")
    await add_role(gw.app, "viewer@example.com", gw.product, "view_only")
    assert (await put_file(gw, app_bin(), token=viewer)).status_code == 403


async def test_the_owner_flashes_through_the_device_route(gw):
    """``particle flash <device> app.bin`` uses /v1/devices/:id: the product's owner, who
    claimed the device, may (their product role allows releases)."""
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: online(gw), WAIT, "online")
    r = await gw.client.post("/v1/devices", headers=bearer(gw.token), json={"id": DEV})
    assert r.status_code == 200, r.text
    data = app_bin(9)
    r = await put_file(gw, data, product=False)
    assert r.status_code == 200 and r.json()["status"] == "Update started", r.text
    await until(lambda: dev.updates, WAIT, "the OTA image")
    assert dev.updates == [data]


@pytest.mark.parametrize(("case", "code"), [
    ("other platform", "platform_mismatch"),
    ("empty", "invalid_binary"),
    ("not a module", "invalid_binary"),
    ("bad crc", "invalid_binary"),
    ("system part", "invalid_binary"),
])
async def test_bad_binaries_are_refused_and_nothing_is_written(gw, case, code):
    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: online(gw), WAIT, "online")
    data = {"other platform": app_bin(platform=12), "empty": b"",
            "not a module": b"void setup() {}\nvoid loop() {}\n" * 10,
            "bad crc": app_bin(corrupt_crc=True),
            "system part": app_bin(function=4)}[case]
    r = await put_file(gw, data)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["ok"] is False and body["error"] == code, body
    if case == "other platform":
        assert "platform 12" in body["error_description"] and "platform 6" in \
            body["error_description"]
    assert await update_rows(gw) == 0
    async with gw.app.state.sessionmaker() as db:
        assert (await db.execute(select(func.count()).select_from(DeviceBinary))
                ).scalar_one() == 0
    assert dev.updates == []


async def test_requests_that_cannot_flash(gw):
    # offline: refused, not queued
    r = await put_file(gw, app_bin())
    assert r.status_code == 400 and r.json()["error"] == "device_offline", r.text
    assert r.json()["error_description"] == "Device is not connected"
    # unknown device
    r = await put_file(gw, app_bin(), did="0123456789abcdef0000ffff")
    assert r.status_code == 404 and r.json()["ok"] is False
    r = await put_file(gw, app_bin(), did="0123456789abcdef0000ffff", product=False)
    assert r.status_code == 404 and r.json()["ok"] is False
    # the flash fields without a file; a source file field; a file with other changes
    r = await gw.client.put(f"/v1/products/{gw.product['id']}/devices/{DEV}",
                            headers=bearer(gw.token), data={"latest": "true"})
    assert r.status_code == 400 and "field file" in r.json()["error_description"], r.text
    r = await put_file(gw, app_bin(), name="file1")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
    r = await put_file(gw, app_bin(), fields={"name": "renamed"})
    assert r.status_code == 400 and "alone" in r.json()["error_description"], r.text
    r = await put_file(gw, app_bin(), fields={"file_type": "source"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
    assert await update_rows(gw) == 0
    # a plain rename still works on the same route
    r = await gw.client.put(f"/v1/products/{gw.product['id']}/devices/{DEV}",
                            headers=bearer(gw.token), json={"name": "kept"})
    assert r.status_code == 200 and r.json()["name"] == "kept", r.text


async def test_a_binary_is_too_large(gw, settings):
    limit = settings.firmware_max_bytes
    r = await put_file(gw, b"\0" * (limit + 1))
    assert r.status_code == 413 and r.json()["ok"] is False, r.text


async def test_replacing_a_live_devices_key_ends_its_session(gw):
    """POST /v1/provisioning/:id with another key: the session made with the old key ends
    (the same key again changes nothing)."""
    from test_particle_gateway import key, pub_pem

    dev = echo_device(gw, product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: online(gw), WAIT, "online")
    r = await gw.client.post(f"/v1/provisioning/{DEV}", headers=bearer(gw.token),
                             json={"publicKey": pub_pem(key("dev"))})
    assert r.status_code == 200, r.text
    assert not dev.closed.is_set() and await online(gw)
    r = await gw.client.post(f"/v1/provisioning/{DEV}", headers=bearer(gw.token),
                             json={"publicKey": pub_pem(key("replacement"))})
    assert r.status_code == 200, r.text
    await dev.wait_closed(WAIT)

    async def offline() -> bool:
        return not await online(gw)
    await until(offline, WAIT, "offline")
    # the old key no longer gets in; the new one does
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await gw.device(DEV, "dev").handshake("127.0.0.1", gw.port)
    fresh = echo_device(gw, keyname="replacement", product_version=1)
    await fresh.connect("127.0.0.1", gw.port)
    await until(lambda: online(gw), WAIT, "online with the new key")
