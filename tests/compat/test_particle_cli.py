"""particle-cli (npm, pinned in package.json) against a real corral, end to end.

The server is the test's app served by uvicorn on a free 127.0.0.1 port, with corral's MQTT
listener on another; the devices are corral's device SDK connected over real MQTT. Each
``particle`` command runs as its own Node process with a temporary HOME whose profile points
at the server (``particle config set apiUrl URL``), the way a user sets it up. Prompts are
answered on standard input.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from particlecli import ParticleCli
from sqlalchemy import select

from corral.device import Device
from corral.devices.models import Device as DeviceRow
from corral.events.models import Event
from devicekit import eventually, mqtt_listener, provision, wait_described
from helpers import PASSWORD, bearer, make_product, new_user, post_ids
from sessionkit import live_server

pytestmark = pytest.mark.compat

OWNER = "cli-owner@example.com"


@pytest.fixture
async def served(app: Any) -> AsyncIterator[tuple[str, Any]]:
    """The app on a real HTTP port and a real MQTT port: (base URL, MQTT listener)."""
    async with live_server(app) as base, mqtt_listener(app) as mqtt:
        yield base, mqtt


@pytest.fixture
def cli(node_tools: Any, served: tuple[str, Any], tmp_path: Path) -> ParticleCli:
    return ParticleCli(node_tools.node, tmp_path / "home", served[0])


@contextlib.asynccontextmanager
async def sdk_device(mqtt: Any, device_id: str, secret: str,
                     received: list[tuple[str, str]] | None = None) -> AsyncIterator[Device]:
    """A device on corral's device SDK: function ``led``, variables ``temperature`` and
    ``label``; events it is sent land in ``received``."""
    dev = Device(device_id, secret, host="127.0.0.1", port=mqtt.port, reconnect_initial=0.05)
    dev.function("led")(lambda arg: 1 if arg == "on" else 0)
    dev.variable("temperature", "double", lambda: 21.5)
    dev.variable("label", "string", lambda: "greenhouse")
    if received is not None:
        dev.subscribe("hello", lambda name, data: received.append((name, data)))
    runner = asyncio.create_task(dev.run_forever())
    try:
        await asyncio.wait_for(dev.wait_connected(), 10)
        yield dev
    finally:
        await dev.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def _owner_product(client: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    token = await new_user(client, OWNER)
    return token, await make_product(client, token, name="Cli Sensors", platform_id=12)


async def test_login_whoami_tokens_logout(client: httpx.AsyncClient, cli: ParticleCli) -> None:
    await new_user(client, OWNER)
    (await cli("config", "set", "apiUrl", cli.base_url)).ok()
    assert cli.profile()["apiUrl"] == cli.base_url
    # the prompt, answered on standard input (particle-cli sends "Bearer null" here)
    r = (await cli.converse("login", answers=[("email address", OWNER),
                                              ("password", PASSWORD)])).ok()
    assert "Successfully completed login" in r.text, r.text
    token = cli.profile()["access_token"]
    r = await client.get("/v1/user", headers=bearer(token))
    assert r.status_code == 200 and r.json()["username"] == OWNER
    # and with the flags
    token = await cli.login(OWNER, PASSWORD)
    assert (await cli("whoami")).ok().out.strip().endswith(OWNER)

    r = (await cli.converse("token", "create", answers=[("password", PASSWORD)])).ok()
    created = r.out.strip().split()[-1]
    assert len(created) == 40 and created != token, r.text
    r = await client.get("/v1/user", headers=bearer(created))
    assert r.status_code == 200
    r = (await cli("token", "revoke", created)).ok()
    assert "Successfully revoked" in r.text
    assert (await client.get("/v1/user", headers=bearer(created))).status_code == 401

    wrong = await cli("login", "--username", OWNER, "--password", "not the password")
    assert wrong.code != 0 and "credentials are invalid" in wrong.text.lower(), wrong.text

    r = (await cli("logout", stdin="y\n")).ok()
    assert (await client.get("/v1/user", headers=bearer(token))).status_code == 401
    assert not cli.profile().get("access_token")
    assert (await cli("whoami")).code != 0


async def test_product_devices_add_list_remove(client: httpx.AsyncClient, cli: ParticleCli,
                                               served: tuple[str, Any], tmp_path: Path) -> None:
    token, product = await _owner_product(client)
    slug = product["slug"]
    [(online, secret)] = await provision(client, token, slug)
    await cli.login(OWNER, PASSWORD)

    one = "0123456789abcdef0000c1a1"
    r = (await cli("product", "device", "add", slug, one)).ok()
    assert "Success" in r.text and one in r.text, r.text
    ids = tmp_path / "ids.txt"
    ids.write_text("0123456789abcdef0000c1a2\r\n\r\n0123456789abcdef0000c1a3\r\n")
    r = (await cli("product", "device", "add", slug, "--file", str(ids))).ok()
    assert "0123456789abcdef0000c1a2" in r.text and "0123456789abcdef0000c1a3" in r.text

    async with sdk_device(served[1], online, secret):
        await wait_described(client, token, f"/v1/products/{slug}/devices/{online}", "led")
        r = (await cli("product", "device", "list", slug)).ok()
        assert online in r.text and "is online" in r.text, r.text
        assert "temperature (double)" in r.text and "led" in r.text, r.text
        r = (await cli("call", online, "led", "on", "--product", slug)).ok()
        assert r.out.strip() == "1", r.text
        r = (await cli("get", online, "temperature", "--product", slug)).ok()
        assert r.out.strip() == "21.5", r.text

    r = (await cli("product", "device", "remove", slug, one)).ok()
    assert "Removed device" in r.text
    r = await client.get(f"/v1/products/{slug}/devices?per_page=100", headers=bearer(token))
    listed = {d["id"] for d in r.json()["devices"]}
    assert one not in listed and "0123456789abcdef0000c1a2" in listed


async def test_my_devices_claim_rename_call_publish_subscribe(
        client: httpx.AsyncClient, cli: ParticleCli, served: tuple[str, Any], app: Any) -> None:
    token, product = await _owner_product(client)
    slug = product["slug"]
    [(device_id, secret)] = await provision(client, token, slug)
    await cli.login(OWNER, PASSWORD)
    received: list[tuple[str, str]] = []

    async with sdk_device(served[1], device_id, secret, received) as dev:
        await wait_described(client, token, f"/v1/products/{slug}/devices/{device_id}", "led")
        # claim: the product's own team member adds the device to their account
        r = (await cli("device", "add", device_id)).ok()
        assert f"Successfully claimed device {device_id}" in r.text, r.text
        r = (await cli("device", "rename", device_id, "greenhouse")).ok()
        async with app.state.sessionmaker() as db:
            row = await db.get(DeviceRow, device_id)
            assert row is not None and row.name == "greenhouse" and row.owner_user_id

        r = (await cli("list")).ok()
        assert "greenhouse" in r.text and device_id in r.text and "online" in r.text, r.text
        r = (await cli("function", "list")).ok()
        assert "greenhouse" in r.text and "led" in r.text, r.text
        r = (await cli("variable", "list")).ok()
        assert "temperature (double)" in r.text and "label (string)" in r.text, r.text
        assert (await cli("call", "greenhouse", "led", "on")).ok().out.strip() == "1"
        assert (await cli("get", "greenhouse", "label")).ok().out.strip() == "greenhouse"

        # a product publish reaches the product's device; my own publish is stored in my
        # stream; subscribe sees my device's event
        (await cli("publish", "hello", "world", "--product", slug)).ok()
        r = (await cli("publish", "mine", "only")).ok()
        assert "Published private event: mine" in r.text, r.text
        async def delivered() -> bool:
            return ("hello", "world") in received
        await eventually(delivered)
        bus = app.state.runtime.bus
        baseline = bus.subscription_count
        async with cli.running("subscribe", "temp", "--max", "1") as sub:
            async def listening() -> bool:  # the CLI's event stream is open on the server
                return bus.subscription_count > baseline
            await eventually(listening, within=30)
            await dev.publish("temp", "22.5")
            r = await cli.finish(sub, ("subscribe",))
        assert r.code == 0 and '"name":"temp"' in r.out.replace(" ", "") and "22.5" in r.out, r.text
        async with app.state.sessionmaker() as db:
            names = set((await db.execute(
                select(Event.name).where(Event.device_id == device_id))).scalars())
        assert "temp" in names
        async with app.state.sessionmaker() as db:
            mine = (await db.execute(select(Event).where(Event.name == "mine"))).scalar_one()
            assert mine.data == "only" and mine.owner_user_id == row.owner_user_id

        # release it again (the device stays in its product)
        r = (await cli("device", "remove", device_id, "--yes")).ok()
        async with app.state.sessionmaker() as db:
            row = await db.get(DeviceRow, device_id)
            assert row is not None and row.owner_user_id is None and row.product_id
        assert device_id not in (await cli("list")).ok().text


async def test_cli_errors_are_readable(client: httpx.AsyncClient, cli: ParticleCli) -> None:
    token, product = await _owner_product(client)
    await post_ids(client, token, product["slug"], id="0123456789abcdef0000c1b1")
    await cli.login(OWNER, PASSWORD)
    r = await cli("call", "0123456789abcdef0000c1b1", "led", "on", "--product", product["slug"])
    assert r.code != 0 and "Device is not connected" in r.text, r.text
    r = await cli("product", "device", "list", "no-such-product")
    # particle-cli prints error_description when the body has one, else error
    assert r.code != 0 and ("Product not found" in r.text or "not_found" in r.text), r.text


async def test_keys_send_registers_a_new_device_into_a_product(
        client: httpx.AsyncClient, cli: ParticleCli, app: Any, tmp_path: Path) -> None:
    """``particle keys send <new id> key.pem --product_id P``: POST /v1/provisioning/:id with
    product_id imports the device into the product and stores its key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from corral.devices.credentials import spki_der

    token, product = await _owner_product(client)
    await cli.login(OWNER, PASSWORD)
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    path = tmp_path / "device.pub.pem"
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    new = "0123456789abcdef0000beef"
    r = (await cli("keys", "send", new, str(path), "--product_id", str(product["id"]))).ok()
    assert "submitting public key succeeded" in r.text, r.text
    async with app.state.sessionmaker() as db:
        row = await db.get(DeviceRow, new)
        assert row is not None and row.product_id == product["id"]
        assert row.public_key_der == spki_der(key)
    # without a product, a device nobody has is not found (nothing is created)
    other = "0123456789abcdef0000bee2"
    r = await cli("keys", "send", other, str(path))
    # particle-cli prints error_description when the body has one, else error
    assert r.code != 0 and ("Product not found" in r.text or "not_found" in r.text), r.text
    async with app.state.sessionmaker() as db:
        assert await db.get(DeviceRow, other) is None
