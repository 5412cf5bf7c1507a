"""Flashing one Gen 3 device (Particle over UDP/DTLS, the v3 OTA protocol) with a binary:
it gets THAT binary, resumes its session on the binary's version, and the update is
applied."""

from __future__ import annotations

from typing import Any

import test_particle_udp
from corral.firmware.module import build_module
from helpers import bearer
from mqtt_helpers import DEV, device_row, events, until

gw = test_particle_udp.gw
settings = test_particle_udp.settings

WAIT = 10.0


async def test_a_gen3_device_is_flashed_with_a_binary_over_udp(gw):
    dev = gw.device(product_version=1)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: _online(gw), WAIT, "online")
    data = build_module(bytes((i * 11) % 251 for i in range(4000)), platform_id=12,
                        product_id=12, product_version=8)
    # the device route, as the product's team member (its owner here)
    r = await gw.client.put(f"/v1/devices/{DEV}", headers=bearer(gw.token),
                            data={"latest": "true"},
                            files={"file": ("app.bin", data, "application/octet-stream")})
    assert r.status_code == 200 and r.json()["status"] == "Update started", r.text
    await until(lambda: dev.updates, WAIT, "the OTA image")
    assert dev.updates == [data]
    await gw.app.state.runtime.delivery.idle()
    await dev.close()
    dev.product_version = 8
    await dev.resume("127.0.0.1", gw.port, hello=True)
    await until(lambda: _applied(gw), WAIT, "applied")
    assert (await device_row(gw.app)).firmware_version == 8
    assert [e.data for e in await events(gw.app, DEV, "spark/flash/status")] == \
        ["started", "success"]


async def _online(gw: Any) -> bool:
    return bool((await device_row(gw.app)).online)


async def _applied(gw: Any) -> bool:
    r = await gw.client.get(f"/v1/products/{gw.product['id']}/devices/{DEV}/updates",
                            headers=bearer(gw.token))
    ups = r.json()["updates"]
    return bool(ups) and ups[0]["state"] == "applied" and ups[0]["trigger"] == "binary" \
        and ups[0]["transport"] == "particle-udp"
