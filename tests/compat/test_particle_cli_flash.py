"""particle-cli (npm, pinned) flashes devices of a real corral: ``particle flash <device>
app.bin`` and ``particle cloud flash <device> app.bin [--product P]``, against real connected
devices (corral's simulated Device OS over Particle's TCP protocol, and corral's MQTT device
SDK with its OTA updater). Each test asserts what the device received and that the update
was applied when it came back, not only what the CLI printed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from particlecli import ParticleCli

from corral.device import Device
from corral.device.ota import Offer, OtaUpdater
from corral.devices.models import Device as DeviceRow
from corral.firmware.module import build_module
from corral.transports.particle.device import ParticleDevice
from corral.transports.particle.keys import key_path
from corral.transports.particle.server import start_particle_listener
from devicekit import eventually, mqtt_listener, provision
from helpers import PASSWORD, bearer, make_product, new_user
from sessionkit import live_server

pytestmark = pytest.mark.compat

OWNER = "cli-flash@example.com"
PHOTON = 6
DEV = "0123456789abcdef0000f1a1"
DEV2 = "0123456789abcdef0000f1a2"


def _key(bits: int = 1024) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _pem(k: rsa.RSAPrivateKey) -> str:
    return k.public_key().public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def app_bin(version: int) -> bytes:
    """A Photon application as ``particle compile`` builds it (Device OS 4+ layout)."""
    return build_module(bytes((i * 17 + version) % 251 for i in range(4000)),
                        platform_id=PHOTON, product_id=PHOTON, product_version=version)


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={
        "event_rate_burst": 1000, "event_rate_per_s": 1000.0, "presence_flush_s": 0.05,
        "particle_handshake_timeout_s": 2.0, "firmware_retry_backoff_s": 0.0,
        "firmware_download_chunk_bytes": 1024})


@pytest.fixture
async def world(app: Any, client: httpx.AsyncClient, settings: Any, node_tools: Any,
                tmp_path: Path) -> AsyncIterator[Any]:
    """corral on real HTTP, MQTT and Particle TCP ports; OWNER with a Photon product holding
    DEV and DEV2 (keys registered), and a particle-cli logged in as OWNER."""
    path = key_path(settings.data_dir)  # a premade server key (making one takes a while)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_key(2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    listener = await start_particle_listener(app.state.runtime.hub, settings,
                                             host="127.0.0.1", port=0)
    devices: list[ParticleDevice] = []
    try:
        async with live_server(app) as base, mqtt_listener(app) as mqtt:
            app.state.runtime.delivery.base_url = base
            token = await new_user(client, OWNER)
            product = await make_product(client, token, name="Flash Photons",
                                         platform_id=PHOTON)
            r = await client.post(f"/v1/products/{product['id']}/devices",
                                  headers=bearer(token), json={"ids": [DEV, DEV2]})
            assert r.status_code == 200, r.text
            keys = {DEV: _key(), DEV2: _key()}
            for did, k in keys.items():
                r = await client.post(f"/v1/provisioning/{did}", headers=bearer(token),
                                      json={"publicKey": _pem(k)})
                assert r.status_code == 200, r.text

            def photon(did: str, version: int) -> ParticleDevice:
                d = ParticleDevice(did, keys[did], listener.server_key.public_key(),
                                   product_id=product["id"], product_version=version,
                                   platform_id=PHOTON)
                devices.append(d)
                return d

            cli = ParticleCli(node_tools.node, tmp_path / "home", base)
            await cli.login(OWNER, PASSWORD)
            yield SimpleNamespace(app=app, client=client, token=token, product=product,
                                  cli=cli, photon=photon, port=listener.port, mqtt=mqtt)
    finally:
        for d in devices:
            await d.close()
        await listener.stop()
        await app.state.runtime.delivery.idle()


async def _update(w: Any, did: str) -> dict[str, Any] | None:
    r = await w.client.get(f"/v1/products/{w.product['id']}/devices/{did}/updates",
                           headers=bearer(w.token))
    assert r.status_code == 200, r.text
    ups = r.json()["updates"]
    return ups[0] if ups else None


async def _online(w: Any, did: str) -> None:
    async def online() -> bool:
        async with w.app.state.sessionmaker() as db:
            row = await db.get(DeviceRow, did)
            return row is not None and row.online
    await eventually(online)


async def _applied(w: Any, did: str) -> dict[str, Any]:
    async def applied() -> bool:
        u = await _update(w, did)
        return u is not None and u["state"] == "applied"
    await eventually(applied)
    u = await _update(w, did)
    assert u is not None
    return u


async def _restart(w: Any, dev: ParticleDevice, version: int) -> ParticleDevice:
    """What Device OS does after an OTA: reset, and say hello running the new app."""
    await dev.close()
    new = w.photon(dev.device_id, version)
    await new.connect("127.0.0.1", w.port)
    return new


async def test_particle_flash_sends_the_binary_to_the_device(world: Any, tmp_path: Path):
    w = world
    dev = w.photon(DEV, 1)
    await dev.connect("127.0.0.1", w.port)
    await _online(w, DEV)
    # `particle flash` goes through /v1/devices/:id: the owner claims the device first
    (await w.cli("device", "add", DEV)).ok()
    data = app_bin(5)
    path = tmp_path / "app.bin"
    path.write_bytes(data)
    r = (await w.cli("flash", DEV, str(path))).ok()
    assert "Flash success!" in r.text, r.text

    async def received() -> bool:
        return dev.updates == [data]
    await eventually(received)  # THAT binary reached THAT device over its OTA session
    await w.app.state.runtime.delivery.idle()
    dev = await _restart(w, dev, 5)
    u = await _applied(w, DEV)
    assert (u["trigger"], u["version"], u["from_version"], u["transport"]) == \
        ("binary", 5, 1, "particle")
    async with w.app.state.sessionmaker() as db:
        row = await db.get(DeviceRow, DEV)
        assert row is not None and row.firmware_version == 5

    # a binary for another platform is refused with the server's reason
    other = tmp_path / "argon.bin"
    other.write_bytes(build_module(b"\x00" * 1000, platform_id=12, product_id=12,
                                   product_version=6))
    r = await w.cli("flash", DEV, str(other))
    assert r.code != 0 and "platform 12" in r.text, r.text


async def test_particle_cloud_flash_with_a_product(world: Any, tmp_path: Path):
    w = world
    dev = w.photon(DEV2, 2)
    await dev.connect("127.0.0.1", w.port)
    await _online(w, DEV2)
    data = app_bin(3)
    path = tmp_path / "app.bin"
    path.write_bytes(data)
    r = (await w.cli("cloud", "flash", DEV2, str(path), "--product",
                     str(w.product["id"]))).ok()
    assert "Flash success!" in r.text and "development" in r.text, r.text
    async with w.app.state.sessionmaker() as db:
        row = await db.get(DeviceRow, DEV2)
        assert row is not None and row.development  # the CLI marks it first, as on Particle

    async def received() -> bool:
        return dev.updates == [data]
    await eventually(received)
    await w.app.state.runtime.delivery.idle()
    await _restart(w, dev, 3)
    assert (await _applied(w, DEV2))["version"] == 3


@contextlib.asynccontextmanager
async def _mqtt_device(w: Any, did: str, secret: str, applied: list[tuple[int, bytes]]
                       ) -> AsyncIterator[Device]:
    d = Device(did, secret, "127.0.0.1", w.mqtt.port, reconnect_initial=0.05)
    d.describe(firmware_version=1)

    def apply(offer: Offer, image: bytes) -> None:
        applied.append((offer.version, image))

    updater = OtaUpdater(d, apply).attach()
    try:
        await d.connect()
        yield d
    finally:
        await updater.close()
        with contextlib.suppress(Exception):
            await d.close()


async def test_particle_cloud_flash_to_an_mqtt_device(world: Any, tmp_path: Path):
    w = world
    other = await make_product(w.client, w.token, name="Flash Mqtt", platform_id=12)
    [(did, secret)] = await provision(w.client, w.token, other["slug"])
    applied: list[tuple[int, bytes]] = []
    data = bytes((i * 3) % 256 for i in range(6000))  # MQTT devices take any image
    path = tmp_path / "firmware.bin"
    path.write_bytes(data)
    async with _mqtt_device(w, did, secret, applied):
        await _online(w, did)
        r = (await w.cli("cloud", "flash", did, str(path), "--product",
                         str(other["id"]))).ok()
        assert "Flash success!" in r.text, r.text

        async def done() -> bool:
            r = await w.client.get(f"/v1/products/{other['id']}/devices/{did}/updates",
                                   headers=bearer(w.token))
            ups = r.json()["updates"]
            return bool(ups) and ups[0]["state"] == "applied"
        await eventually(done)
    assert applied == [(1, data)]  # downloaded over HTTP, checked, applied
