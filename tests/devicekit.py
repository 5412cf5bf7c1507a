"""What the device-SDK and simulator tests share: corral's MQTT listener on a free port
against the test app's session hub, and product devices with MQTT secrets made over REST."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from corral.transports.mqtt.server import MqttListener, MqttServer
from helpers import bearer, make_product, new_user, post_ids

WAIT = 15.0  # seconds any single wait may take: a bound for a loaded CI machine, never a pace


@contextlib.asynccontextmanager
async def mqtt_listener(app: Any, port: int = 0) -> AsyncIterator[MqttListener]:
    """corral's MQTT server on 127.0.0.1 (``port=0``: a free port) for the app's hub."""
    runtime = app.state.runtime
    server = MqttServer(runtime.hub, runtime.settings)
    listener = await server.listen("127.0.0.1", port)
    try:
        yield listener
    finally:
        await server.stop()


async def provision(client: httpx.AsyncClient, token: str, product: Any,
                    n: int = 1) -> list[tuple[str, str]]:
    """Import ``n`` new device IDs into ``product`` and give each an MQTT secret."""
    ids = [secrets.token_hex(12) for _ in range(n)]
    r = await post_ids(client, token, product, ids=ids)
    assert r.status_code == 200 and sorted(r.json()["updatedDeviceIds"]) == sorted(ids), r.text
    out = []
    for did in ids:
        r = await client.post(f"/v1/products/{product}/devices/{did}/mqtt_secret",
                              headers=bearer(token))
        assert r.status_code == 200, r.text
        out.append((did, r.json()["mqtt_secret"]))
    return out


async def owner_product_devices(client: httpx.AsyncClient, n: int = 1,
                                username: str = "ada@example.com"
                                ) -> tuple[str, dict[str, Any], list[tuple[str, str]]]:
    """A user, their product and ``n`` devices in it with MQTT secrets."""
    token = await new_user(client, username)
    product = await make_product(client, token, platform_id=12)
    return token, product, await provision(client, token, product["slug"], n)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = WAIT,
                     every: float = 0.05) -> None:
    """Wait until ``await check()`` is true (``AssertionError`` after ``within`` s)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {within} s: {check}")
        await asyncio.sleep(every)


async def wait_described(client: httpx.AsyncClient, token: str, device_url: str,
                         name: str, within: float = WAIT) -> None:
    """Wait until the device at ``device_url`` (its REST path) lists the function or variable
    ``name``: a device is online before its description arrives, and a call or read in
    between is answered 404."""

    async def described() -> bool:
        r = await client.get(device_url, headers=bearer(token))
        if r.status_code != 200:
            return False
        d = r.json()
        return name in (d.get("functions") or []) or name in (d.get("variables") or {})

    await eventually(described, within=within)
