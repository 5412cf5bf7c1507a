"""The fleet simulator: ``Fleet`` in-process, ``corral simulate`` as a real command against a
real HTTP + MQTT server, and the demo fleet of ``corral serve --demo``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from corral.audit.models import AuditEntry
from corral.demo import DEMO_FLEET_IDS, DEMO_PRODUCT, ensure_demo
from corral.device.simulator import EVENT_NAME, Fleet
from corral.devices.models import Device as DeviceRow
from corral.events.models import Event
from corral.mail.backends import LogBackend
from corral.settings import Settings
from corral.web.app import Runtime, create_app
from dbreset import truncate_all
from devicekit import WAIT, eventually, mqtt_listener, owner_product_devices, wait_described
from helpers import bearer, make_product, new_user
from sessionkit import live_server

CLI_TIMEOUT_S = 60


@pytest.fixture
async def mqtt(app: Any) -> AsyncIterator[Any]:
    async with mqtt_listener(app) as listener:
        yield listener


async def _online_ids(app: Any, product_id: int) -> set[str]:
    async with app.state.sessionmaker() as db:
        rows = await db.execute(select(DeviceRow.id).where(DeviceRow.product_id == product_id,
                                                           DeviceRow.online.is_(True)))
        return set(rows.scalars())


async def _sim_events(sessionmaker: Any, ids: list[str]) -> list[Event]:
    async with sessionmaker() as db:
        return list((await db.execute(select(Event).where(
            Event.device_id.in_(ids), Event.name == EVENT_NAME).order_by(Event.id))).scalars())


async def _rotations(app: Any) -> int:
    async with app.state.sessionmaker() as db:
        return int((await db.execute(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == "device.mqtt_secret_rotated"))).scalar_one())


async def _true(value: bool) -> bool:
    return value


# --- Fleet, in-process -----------------------------------------------------------------------

async def test_fleet_publishes_and_answers(app: Any, client: httpx.AsyncClient,
                                           mqtt: Any) -> None:
    token, product, creds = await owner_product_devices(client, 3)
    ids = [did for did, _s in creds]
    fleet = Fleet(creds, "127.0.0.1", mqtt.port, interval=0.5, connect_concurrency=2, seed=1,
                  labels=["one", "two", "three"])
    await fleet.start()
    try:
        async with asyncio.timeout(WAIT):
            await fleet.wait_connected()
        assert await _online_ids(app, product["id"]) == set(ids)
        base = f"/v1/products/{product['slug']}/devices/{ids[0]}"
        h = bearer(token)
        r = await client.post(f"{base}/led", headers=h, json={"arg": "toggle"})
        assert r.status_code == 200 and r.json()["return_value"] == 1, r.text
        r = await client.post(f"{base}/led", headers=h, json={"arg": "blink"})
        assert r.status_code == 400 and "on, off or toggle" in r.json()["error_description"]
        r = await client.post(f"{base}/interval", headers=h, json={"arg": "2"})
        assert r.json()["return_value"] == 2
        reads = {}
        for name in ("temperature", "uptime", "label", "on"):
            r = await client.get(f"{base}/{name}", headers=h)
            assert r.status_code == 200, r.text
            reads[name] = r.json()["result"]
        assert 10 < reads["temperature"] < 35 and isinstance(reads["uptime"], int)
        assert reads["label"] == "one" and reads["on"] is True
        assert fleet.stats.calls_answered == 2 + 4  # a failed call is not an answer

        async def published() -> bool:
            return {e.device_id for e in await _sim_events(app.state.sessionmaker, ids)} \
                == set(ids)

        await eventually(published)
        events = await _sim_events(app.state.sessionmaker, ids)
        assert all(10 < float(e.data or "") < 35 for e in events)
        assert fleet.stats.events_sent >= len(events) - 1
    finally:
        async with asyncio.timeout(WAIT):
            await fleet.stop()
    assert fleet.connected == 0

    async def offline() -> bool:
        return not await _online_ids(app, product["id"])

    await eventually(offline)


async def test_fleet_replaces_a_refused_secret(app: Any, client: httpx.AsyncClient,
                                               mqtt: Any) -> None:
    token, product, [(did, _secret)] = await owner_product_devices(client)
    asked: list[str] = []

    async def reprovision(device_id: str) -> str | None:
        asked.append(device_id)
        [(_id, fresh)] = await _rotate(client, token, product["slug"], device_id)
        return fresh

    fleet = Fleet([(did, "stale")], "127.0.0.1", mqtt.port, reprovision=reprovision)
    await fleet.start()
    try:
        async with asyncio.timeout(WAIT):
            await fleet.wait_connected()
        assert asked == [did] and fleet.stats.reprovisioned == 1
    finally:
        await fleet.stop()


async def _rotate(client: httpx.AsyncClient, token: str, product: str,
                  did: str) -> list[tuple[str, str]]:
    r = await client.post(f"/v1/products/{product}/devices/{did}/mqtt_secret",
                          headers=bearer(token))
    assert r.status_code == 200, r.text
    return [(did, r.json()["mqtt_secret"])]


async def test_fleet_gives_up_on_a_refused_secret_without_reprovisioning(
        app: Any, client: httpx.AsyncClient, mqtt: Any) -> None:
    _token, _product, [(did, _secret)] = await owner_product_devices(client)
    fleet = Fleet([(did, "stale")], "127.0.0.1", mqtt.port)
    await fleet.start()
    try:
        await eventually(lambda: _true(fleet.stats.gave_up == 1))
        assert fleet.ever_connected == 0
    finally:
        await fleet.stop()


# --- `corral simulate` -------------------------------------------------------------------------

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


async def test_corral_simulate_end_to_end(app: Any, client: httpx.AsyncClient, mqtt: Any,
                                          tmp_path: Path) -> None:
    token = await new_user(client, "sim@example.com")
    product = await make_product(client, token, "Sim Fleet", platform_id=12)
    slug = product["slug"]
    h = bearer(token)
    async with live_server(app) as url:
        common = ("--product", slug, "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt.port))
        run = asyncio.create_task(_simulate(url, token, tmp_path, *common, "--devices", "3",
                                            "--interval", "0.5", "--duration", "4"))
        # while it runs: the devices come online and answer the cloud
        await eventually(lambda: _n_online(app, product["id"], 3), within=20)
        [did, *_] = sorted(await _online_ids(app, product["id"]))
        await wait_described(client, token, f"/v1/products/{slug}/devices/{did}", "led")
        r = await client.post(f"/v1/products/{slug}/devices/{did}/led", headers=h,
                              json={"arg": "on"})
        assert r.status_code == 200 and r.json()["return_value"] == 1, r.text
        r = await client.get(f"/v1/products/{slug}/devices/{did}/on", headers=h)
        assert r.status_code == 200 and r.json()["result"] is True, r.text
        code, out, err = await run
        assert code == 0, out + err
        assert "Simulated 3 devices" in out and "2 calls answered" in out, out
        # the state file keeps the fleet, readable by its owner only
        [state_file] = list((tmp_path / "corral" / "simulate").glob("*.json"))
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        state = json.loads(state_file.read_text())
        ids = [d["id"] for d in state["devices"]]
        assert state["api_url"] == url and state["product"] == slug
        assert len(ids) == 3 and all(d["secret"] for d in state["devices"])
        events = await _sim_events(app.state.sessionmaker, ids)
        assert {e.device_id for e in events} == set(ids)
        r = await client.get(f"/v1/products/{slug}/devices/{did}", headers=h)
        assert r.json()["firmware_version"] == 1, r.text
        await eventually(lambda: _n_online(app, product["id"], 0))
        assert await _rotations(app) == 3

        # the secret of one device changed meanwhile: the next run gets it a new one and
        # reuses the others (no new devices, no other rotation)
        await _rotate(client, token, slug, ids[0])
        code, out, err = await _simulate(url, token, tmp_path, *common, "--devices", "2",
                                         "--duration", "2")
        assert code == 0, out + err
        assert "Simulated 2 devices" in out and re.search(r"\b[23] connections", out), out
        again = json.loads(state_file.read_text())
        assert [d["id"] for d in again["devices"]] == ids  # the third one is kept for later
        assert again["devices"][0]["secret"] != state["devices"][0]["secret"]
        assert again["devices"][1:] == state["devices"][1:]
        assert await _rotations(app) == 3 + 1 + 1
        async with app.state.sessionmaker() as db:
            n = (await db.execute(select(func.count()).select_from(DeviceRow).where(
                DeviceRow.product_id == product["id"]))).scalar_one()
        assert n == 3


async def _n_online(app: Any, product_id: int, n: int) -> bool:
    return len(await _online_ids(app, product_id)) == n


async def test_corral_simulate_needs_a_login_and_a_product(app: Any, client: httpx.AsyncClient,
                                                           tmp_path: Path) -> None:
    token = await new_user(client, "sim@example.com")
    async with live_server(app) as url:
        code, _out, err = await _simulate(url, token, tmp_path, "--product", "nope",
                                          "--devices", "1", "--duration", "1")
        assert code == 1 and "Product not found" in err, err
        code, _out, err = await _simulate(url, token, tmp_path, "--product", "nope",
                                          "--devices", "0")
        assert code == 2, err


# --- the demo fleet -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serve_demo_runs_live_devices(settings: Settings, database_url: str) -> None:
    """``Runtime.start_transports`` with ``demo``: the MQTT listener and the demo fleet."""
    await truncate_all(database_url)
    demo_settings = settings.model_copy(update={
        "demo": True, "demo_simulated_devices": 3, "host": "127.0.0.1",
        "mqtt_port": _free_port(), "mqtt_tls_port": 0, "particle_port": 0})
    runtime = Runtime(demo_settings, mail_backend=LogBackend())
    app = create_app(demo_settings, runtime=runtime)
    await runtime.start(app, migrate_db=False, background=False)
    try:
        assert runtime.sessionmaker is not None
        info = await ensure_demo(runtime.sessionmaker, demo_settings)
        assert info.live == 3 and info.fleet_summary.endswith("3 live over MQTT)")
        await runtime.start_transports()
        live = DEMO_FLEET_IDS[:3]

        async def all_online() -> bool:
            return await _online_ids(app, info.product_id) == set(live)

        await eventually(all_online, within=10)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://corral.test") as c:
            r = await c.post("/oauth/token", data={
                "grant_type": "password", "username": info.username, "password": info.password,
                "client_id": "corral-cli", "client_secret": "corral-cli"})
            token = r.json()["access_token"]
            h = bearer(token)
            device_url = f"/v1/products/{info.product_slug}/devices/{live[0]}"
            await wait_described(c, token, device_url, "label")
            r = await c.get(f"{device_url}/label", headers=h)
            assert r.status_code == 200 and r.json()["result"] == "demo-sensor-01", r.text
            r = await c.get(f"/v1/products/{info.product_slug}/devices", headers=h,
                            params={"per_page": 100})
            online = {d["id"] for d in r.json()["devices"] if d["online"]}
            assert online == set(live)
            [product] = [p for p in (await c.get("/v1/products", headers=h)).json()["products"]
                         if p["name"] == DEMO_PRODUCT]
            assert product["id"] == info.product_id

        async def published() -> bool:
            return len(await _sim_events(runtime.sessionmaker, live)) >= 1

        await eventually(published, within=10)  # every 5 s, starting at a random moment
        fleet = runtime.transports[-1]  # the demo fleet: stopped first on shutdown
        await fleet.stop()
        await eventually(lambda: _n_online(app, info.product_id, 0))
    finally:
        await runtime.stop()


async def test_demo_fleet_without_a_listener_stays_offline(app: Any) -> None:
    from corral.demo import start_demo_fleet

    runtime = app.state.runtime
    fleet = await start_demo_fleet(runtime)  # nothing listens: nothing runs, nothing fails
    await fleet.stop()
    assert runtime.transports == []
