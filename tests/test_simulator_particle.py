"""The Particle fleet simulator: ``ParticleFleet`` in-process and ``corral simulate --transport
particle`` as a real command, both against corral's Particle gateway on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import func, select

from corral.audit.models import AuditEntry
from corral.device.particle_fleet import (
    ParticleFleet,
    ServerKeyError,
    generate_keys,
    load_device_key,
    load_server_key,
    public_pem,
)
from corral.device.simulator import EVENT_NAME
from corral.devices.models import Device as DeviceRow
from corral.events.models import Event
from corral.transports.particle.keys import key_path, public_der, server_key_file
from corral.transports.particle.server import start_particle_listener
from devicekit import WAIT, eventually, wait_described
from helpers import bearer, make_product, new_user, post_ids
from sessionkit import live_server

CLI_TIMEOUT_S = 90
_SERVER_KEY: list[rsa.RSAPrivateKey] = []


def _server_key() -> rsa.RSAPrivateKey:
    if not _SERVER_KEY:
        _SERVER_KEY.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _SERVER_KEY[0]


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"presence_flush_s": 0.05,
                                       "particle_handshake_timeout_s": 5.0})


@contextlib.asynccontextmanager
async def particle_gateway(app: Any, settings: Any) -> AsyncIterator[Any]:
    """The Particle listener on a free port, with a premade server key (making one is slow)."""
    path = key_path(settings.data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_server_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    listener = await start_particle_listener(app.state.runtime.hub, settings, host="127.0.0.1",
                                             port=0)
    try:
        yield listener
    finally:
        await listener.stop()


@pytest.fixture
async def gateway(app: Any, settings: Any) -> AsyncIterator[Any]:
    async with particle_gateway(app, settings) as listener:
        yield listener


async def _online_ids(app: Any, product_id: int) -> set[str]:
    async with app.state.sessionmaker() as db:
        rows = await db.execute(select(DeviceRow.id).where(DeviceRow.product_id == product_id,
                                                           DeviceRow.online.is_(True)))
        return set(rows.scalars())


async def _rows(app: Any, ids: list[str]) -> dict[str, DeviceRow]:
    async with app.state.sessionmaker() as db:
        rows = await db.execute(select(DeviceRow).where(DeviceRow.id.in_(ids)))
        return {r.id: r for r in rows.scalars()}


async def _sim_events(app: Any, ids: list[str]) -> list[Event]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(Event).where(
            Event.device_id.in_(ids), Event.name == EVENT_NAME))).scalars())


async def _keys_set(app: Any) -> int:
    async with app.state.sessionmaker() as db:
        return int((await db.execute(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == "device.key_set"))).scalar_one())


# --- pieces ---------------------------------------------------------------------------------

def test_server_key_file_parsing() -> None:
    pub = _server_key().public_key()
    der = public_der(pub)
    for data in (server_key_file(pub, "127.0.0.1"), server_key_file(pub, "corral.example.com"),
                 der, pub.public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)):
        assert public_der(load_server_key(data)) == der
    for bad in (b"", b"\x00" * 400, der[:100], b"-----BEGIN PUBLIC KEY-----\nnope\n"):
        with pytest.raises(ServerKeyError):
            load_server_key(bad)


def test_generated_device_keys() -> None:
    pems = generate_keys(2)
    keys = [load_device_key(p) for p in pems]
    assert len({public_pem(k) for k in keys}) == 2 and keys[0].key_size == 1024
    with pytest.raises(ValueError, match="RSA-1024"):
        load_device_key(_server_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


# --- ParticleFleet, in-process ----------------------------------------------------------------

async def test_particle_fleet_publishes_answers_and_reconnects(
        app: Any, client: httpx.AsyncClient, gateway: Any) -> None:
    token = await new_user(client, "ada@example.com")
    product = await make_product(client, token, platform_id=12)
    h = bearer(token)
    ids = [os.urandom(12).hex() for _ in range(3)]
    r = await post_ids(client, token, product["slug"], ids=ids)
    assert r.status_code == 200, r.text
    keys = [load_device_key(p) for p in generate_keys(3)]
    for did, k in zip(ids, keys, strict=True):
        r = await client.post(f"/v1/provisioning/{did}", headers=h,
                              json={"publicKey": public_pem(k)})
        assert r.status_code == 200, r.text
    fleet = ParticleFleet(list(zip(ids, keys, strict=True)), gateway.server_key.public_key(),
                          "127.0.0.1", gateway.port, interval=0.5, product_id=product["id"],
                          connect_concurrency=2, labels=["one", "two", "three"], seed=1)
    await fleet.start()
    try:
        async with asyncio.timeout(WAIT):
            await fleet.wait_connected()
        assert await _online_ids(app, product["id"]) == set(ids)
        rows = await _rows(app, ids)
        assert all(r.transport == "particle" and r.firmware_version == 1 for r in rows.values())
        base = f"/v1/products/{product['slug']}/devices/{ids[0]}"
        r = await client.post(f"{base}/led", headers=h, json={"arg": "toggle"})
        assert r.status_code == 200 and r.json()["return_value"] == 1, r.text
        r = await client.post(f"{base}/led", headers=h, json={"arg": "blink"})
        assert r.status_code == 200 and r.json()["return_value"] == -1, r.text
        r = await client.post(f"{base}/interval", headers=h, json={"arg": "2"})
        assert r.json()["return_value"] == 2, r.text
        reads = {}
        for name in ("temperature", "uptime", "label", "on"):
            r = await client.get(f"{base}/{name}", headers=h)
            assert r.status_code == 200, r.text
            reads[name] = r.json()["result"]
        assert 10 < reads["temperature"] < 35 and isinstance(reads["uptime"], int)
        assert reads["label"] == "one" and reads["on"] is True
        assert fleet.stats.calls_answered == 2 + 4  # the failed call is not counted

        async def published() -> bool:
            return {e.device_id for e in await _sim_events(app, ids)} == set(ids)

        await eventually(published)
        assert all(10 < float(e.data or "") < 35 for e in await _sim_events(app, ids))
        assert fleet.stats.events_sent >= 3 and fleet.stats.events_refused == 0

        # the server drops one device: it comes back by itself
        conn = gateway.connection(ids[1])
        assert conn is not None
        await conn.disconnect("test drop")
        await eventually(lambda: _true(fleet.stats.disconnects == 1))
        async with asyncio.timeout(WAIT):
            await fleet.wait_connected()
        assert fleet.stats.connects == 4 and fleet.devices[1].connects == 2
    finally:
        async with asyncio.timeout(WAIT):
            await fleet.stop()
    assert fleet.connected == 0

    async def offline() -> bool:
        return not await _online_ids(app, product["id"])

    await eventually(offline)
    rows = await _rows(app, ids)
    assert {r.last_disconnect_reason for r in rows.values()} == {"goodbye"}


async def _true(value: bool) -> bool:
    return value


async def test_particle_fleet_with_an_unregistered_key_keeps_retrying(
        app: Any, client: httpx.AsyncClient, gateway: Any) -> None:
    token = await new_user(client, "ada@example.com")
    product = await make_product(client, token, platform_id=12)
    did = os.urandom(12).hex()
    r = await post_ids(client, token, product["slug"], ids=[did])
    assert r.status_code == 200, r.text
    registered, other = (load_device_key(p) for p in generate_keys(2))
    r = await client.post(f"/v1/provisioning/{did}", headers=bearer(token),
                          json={"publicKey": public_pem(registered)})
    assert r.status_code == 200, r.text
    fleet = ParticleFleet([(did, other)], gateway.server_key.public_key(), "127.0.0.1",
                          gateway.port, product_id=product["id"])
    await fleet.start()
    try:
        await eventually(lambda: _true(fleet.stats.connect_failures >= 2))
        assert fleet.ever_connected == 0 and not await _online_ids(app, product["id"])
    finally:
        async with asyncio.timeout(WAIT):
            await fleet.stop()


# --- `corral simulate --transport particle` ------------------------------------------------

async def _simulate(url: str, token: str, home: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(XDG_CONFIG_HOME=str(home), COLUMNS="200")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli.main", "--api-url", url, "--token", token,
        "simulate", *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(CLI_TIMEOUT_S):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_corral_simulate_particle_end_to_end(app: Any, client: httpx.AsyncClient,
                                                   gateway: Any, tmp_path: Path) -> None:
    token = await new_user(client, "sim@example.com")
    product = await make_product(client, token, "Sim Fleet", platform_id=12)
    slug = product["slug"]
    h = bearer(token)
    key_file = tmp_path / "server_key.der"
    key_file.write_bytes(server_key_file(gateway.server_key.public_key(), "127.0.0.1"))
    common = ("--product", slug, "--transport", "particle", "--server-key", str(key_file),
              "--particle-host", "127.0.0.1", "--particle-port", str(gateway.port))
    async with live_server(app) as url:
        run = asyncio.create_task(_simulate(url, token, tmp_path, *common, "--devices", "3",
                                            "--interval", "0.5", "--duration", "5"))

        async def three_online() -> bool:
            return len(await _online_ids(app, product["id"])) == 3

        await eventually(three_online, within=30)
        [did, *_] = sorted(await _online_ids(app, product["id"]))
        await wait_described(client, token, f"/v1/products/{slug}/devices/{did}", "led")
        r = await client.post(f"/v1/products/{slug}/devices/{did}/led", headers=h,
                              json={"arg": "on"})
        assert r.status_code == 200 and r.json()["return_value"] == 1, r.text
        r = await client.get(f"/v1/products/{slug}/devices/{did}/on", headers=h)
        assert r.status_code == 200 and r.json()["result"] is True, r.text
        code, out, err = await run
        assert code == 0, out + err
        assert "Simulated 3 Particle devices" in out and "2 calls answered" in out, out

        [state_file] = list((tmp_path / "corral" / "simulate").glob("*.json"))
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        state = json.loads(state_file.read_text())
        ids = [d["id"] for d in state["devices"]]
        assert len(ids) == 3 and all(d["rsa_registered"] == "1" for d in state["devices"])
        # the key each device registered is the one kept in the state file
        rows = await _rows(app, ids)
        for d in state["devices"]:
            assert rows[d["id"]].public_key_der == public_der(
                load_device_key(d["rsa_key"]).public_key())
            assert rows[d["id"]].transport == "particle"
        assert {e.device_id for e in await _sim_events(app, ids)} == set(ids)
        assert await _keys_set(app) == 3

        async def none_online() -> bool:
            return not await _online_ids(app, product["id"])

        await eventually(none_online)
        # a second, smaller run reuses the devices and their keys: nothing registered again
        code, out, err = await _simulate(url, token, tmp_path, *common, "--devices", "2",
                                         "--duration", "2")
        assert code == 0, out + err
        assert "Simulated 2 Particle devices" in out and "2 connections" in out, out
        assert json.loads(state_file.read_text())["devices"] == state["devices"]
        assert await _keys_set(app) == 3

        # a wrong server key: nobody connects, the command says so
        wrong = tmp_path / "wrong.der"
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        wrong.write_bytes(server_key_file(other.public_key(), "127.0.0.1"))
        code, out, err = await _simulate(
            url, token, tmp_path, "--product", slug, "--transport", "particle", "--server-key",
            str(wrong), "--particle-port", str(gateway.port), "--devices", "1",
            "--duration", "1.5")
        assert code == 1 and "No device could connect" in err, out + err


async def test_corral_simulate_particle_needs_a_server_key(app: Any, client: httpx.AsyncClient,
                                                           tmp_path: Path) -> None:
    token = await new_user(client, "sim@example.com")
    product = await make_product(client, token, platform_id=12)
    async with live_server(app) as url:
        code, _out, err = await _simulate(url, token, tmp_path, "--product", product["slug"],
                                          "--transport", "particle", "--duration", "1")
        assert code == 2 and "--server-key" in err, err
        bad = tmp_path / "bad.der"
        bad.write_bytes(b"not a key")
        code, _out, err = await _simulate(url, token, tmp_path, "--product", product["slug"],
                                          "--transport", "particle", "--server-key", str(bad),
                                          "--devices", "1", "--duration", "1")
        assert code == 2 and "not a server_key file" in err, err


async def test_corral_simulate_particle_udp_gen3_devices(app: Any, client: httpx.AsyncClient,
                                                        settings: Any, tmp_path: Path) -> None:
    """``--transport particle-udp``: P-256 keys registered, DTLS over UDP, the UDP server key
    file `corral keys server --protocol udp` writes; a TCP server key file is refused."""
    from corral.transports.particle.keys import udp_server_key_file
    from corral.transports.particle.udp import start_particle_udp_listener

    listener = await start_particle_udp_listener(app.state.runtime.hub, settings,
                                                 host="127.0.0.1", port=0)
    try:
        token = await new_user(client, "gen3@example.com")
        product = await make_product(client, token, "Gen3 Fleet", platform_id=12)
        slug = product["slug"]
        key_file = tmp_path / "server_key_udp.der"
        key_file.write_bytes(udp_server_key_file(listener.server_key.public_key(), "127.0.0.1",
                                                 listener.port))
        common = ("--product", slug, "--transport", "particle-udp", "--server-key",
                  str(key_file), "--particle-host", "127.0.0.1", "--particle-port",
                  str(listener.port))
        async with live_server(app) as url:
            run = asyncio.create_task(_simulate(url, token, tmp_path, *common, "--devices", "2",
                                                "--interval", "0.5", "--duration", "5"))

            async def two_online() -> bool:
                return len(await _online_ids(app, product["id"])) == 2

            await eventually(two_online, within=30)
            [did, *_] = sorted(await _online_ids(app, product["id"]))
            await wait_described(client, token, f"/v1/products/{slug}/devices/{did}", "led")
            r = await client.post(f"/v1/products/{slug}/devices/{did}/led",
                                  headers=bearer(token), json={"arg": "on"})
            assert r.status_code == 200 and r.json()["return_value"] == 1, r.text
            code, out, err = await run
            assert code == 0, out + err
            assert "Simulated 2 Particle devices" in out, out
            [state_file] = list((tmp_path / "corral" / "simulate").glob("*.json"))
            state = json.loads(state_file.read_text())
            rows = await _rows(app, [d["id"] for d in state["devices"]])
            for d in state["devices"]:
                assert d["ec_registered"] == "1"
                assert rows[d["id"]].public_key_der == public_der(
                    load_device_key(d["ec_key"]).public_key())
                assert rows[d["id"]].transport == "particle-udp"
            assert {e.device_id for e in await _sim_events(app, list(rows))} == set(rows)
            # the TCP gateway's key file is not the UDP one
            tcp_file = tmp_path / "server_key.der"
            tcp_file.write_bytes(server_key_file(_server_key().public_key(), "127.0.0.1"))
            code, out, err = await _simulate(
                url, token, tmp_path, "--product", slug, "--transport", "particle-udp",
                "--server-key", str(tcp_file), "--devices", "1", "--duration", "1")
            assert code == 2 and "server key of the TCP gateway" in out + err, out + err
    finally:
        await listener.stop()
