"""``corral simulate --cellular`` on every transport (mqtt, particle, particle-udp): the real
command against a real server. Each device gets a SIM whose ICCID (19 or 20 digits starting
89, a valid Luhn check digit, unique) is kept in the state file and reported as that transport
does; corral records it (the device's ``iccid`` and ``cellular``, the product's SIMs) and counts
the devices' traffic as cellular data; a rerun reports the same SIMs. Without ``--cellular``
the devices report none."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from corral.cli.fleet import give_sims
from corral.devices.models import Device as DeviceRow
from corral.transports.particle.keys import server_key_file, udp_server_key_file
from corral.transports.particle.udp import start_particle_udp_listener
from devicekit import eventually, mqtt_listener, wait_described
from helpers import bearer, make_product, new_user
from meteringkit import counters
from sessionkit import live_server
from test_simulator_particle import _simulate, particle_gateway

WITHIN = 30.0  # a subprocess that starts, provisions and connects its devices


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"presence_flush_s": 0.05,
                                       "particle_handshake_timeout_s": 5.0})


def luhn_valid(number: str) -> bool:
    """The Luhn check over the whole number, check digit included (written out here, not
    taken from corral)."""
    total = 0
    for i, ch in enumerate(reversed(number)):
        n = int(ch) * (2 if i % 2 else 1)
        total += n // 10 + n % 10
    return total % 10 == 0


def test_luhn_reference() -> None:
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert luhn_valid("89014103211118510720")  # a real ICCID's check digit


def test_sims_kept_and_given() -> None:
    """A valid ICCID in the state stays; a missing, malformed, badly checked or duplicate one
    is replaced by a new one; the rest of the state file is left alone."""
    good, elsewhere = "89014103211118510720", "8901410321111851072"
    devices = [{"id": "a", "iccid": good}, {"id": "b", "iccid": good},
               {"id": "c", "iccid": "89014103211118510725"}, {"id": "d", "iccid": "89x"},
               {"id": "e"}, {"id": "h", "iccid": elsewhere}]
    others = [{"id": "f", "iccid": "nope"}, {"id": "g", "iccid": elsewhere}]
    before = json.dumps(others)
    give_sims(devices, others)
    iccids = [d["iccid"] for d in devices]
    assert iccids[0] == good and len(set(iccids)) == 6 and elsewhere not in iccids
    assert all(i.isdigit() and len(i) in (19, 20) and i.startswith("89") and luhn_valid(i)
               for i in iccids), iccids
    assert json.dumps(others) == before


def _state(home: Path) -> dict[str, Any]:
    """The run's state file ({} until it is written; the file is replaced atomically)."""
    files = list((home / "corral" / "simulate").glob("*.json"))
    assert len(files) <= 1, files
    return json.loads(files[0].read_text()) if files else {}


async def _device(client: httpx.AsyncClient, token: str, device_id: str) -> dict[str, Any]:
    """``GET /v1/devices/:id`` ({} until the run has imported the device)."""
    r = await client.get(f"/v1/devices/{device_id}", headers=bearer(token))
    return r.json() if r.status_code == 200 else {}


async def _forget_sims(app: Any, ids: list[str]) -> None:
    """The server forgets what the devices reported (so a rerun's report is seen)."""
    async with app.state.sessionmaker() as db:
        await db.execute(update(DeviceRow).where(DeviceRow.id.in_(ids))
                         .values(iccid=None, cellular=False))
        await db.commit()


async def _cellular_runs(app: Any, client: httpx.AsyncClient, home: Path,
                         transport: Callable[[], tuple[str, ...]], *,
                         plain_first: bool = False) -> None:
    token = await new_user(client, "cell@example.com")
    product = await make_product(client, token, "Field Fleet", platform_id=12)
    slug = product["slug"]
    common = ("--product", slug, *transport(), "--devices", "2", "--interval", "0.5")
    async with live_server(app) as url:
        if plain_first:  # without --cellular: the same devices report no SIM
            run = asyncio.create_task(_simulate(url, token, home, *common, "--duration", "4"))

            async def two_ids() -> bool:
                return len(_state(home).get("devices") or []) == 2

            await eventually(two_ids, within=WITHIN)
            ids = [d["id"] for d in _state(home)["devices"]]
            for did in ids:  # the MQTT describe carries functions and the SIM together
                await wait_described(client, token, f"/v1/devices/{did}", "led",
                                     within=WITHIN)
            code, out, err = await run
            assert code == 0, out + err
            assert "Simulating 2 device(s)" in out, out
            for did in ids:
                d = await _device(client, token, did)
                assert d["iccid"] is None and d["cellular"] is False, d
            assert all("iccid" not in d for d in _state(home)["devices"])
            r = await client.get(f"/v1/products/{slug}/sims", headers=bearer(token))
            assert r.status_code == 200 and r.json()["sims"] == [], r.text

        run = asyncio.create_task(_simulate(url, token, home, *common, "--cellular",
                                            "--duration", "6"))

        async def sims_kept() -> bool:
            devices = _state(home).get("devices") or []
            return len(devices) == 2 and all("iccid" in d for d in devices)

        await eventually(sims_kept, within=WITHIN)
        state = _state(home)
        sims = {d["id"]: d["iccid"] for d in state["devices"]}
        assert len(set(sims.values())) == 2
        for iccid in sims.values():
            assert iccid.isdigit() and len(iccid) in (19, 20) and iccid.startswith("89")
            assert luhn_valid(iccid), iccid

        async def reported() -> bool:
            for did, iccid in sims.items():
                d = await _device(client, token, did)
                if d.get("iccid") != iccid or d.get("cellular") is not True:
                    return False
            return True

        await eventually(reported, within=WITHIN)  # the describe is stored
        r = await client.get(f"/v1/products/{slug}/sims", headers=bearer(token))
        assert r.status_code == 200, r.text
        assert {s["iccid"]: s["last_device_id"] for s in r.json()["sims"]} == \
            {iccid: did for did, iccid in sims.items()}
        code, out, err = await run
        assert code == 0, out + err
        assert "Simulating 2 cellular " in out, out
        state = _state(home)  # with the credentials the run got
        assert {d["id"]: d["iccid"] for d in state["devices"]} == sims

        # the devices' traffic was counted as cellular data (flushed when a session ends)
        async def counted() -> bool:
            used = {c.device_id: c.cellular_bytes for c in await counters(app)}
            return all(used.get(did, 0) > 0 for did in sims)

        await eventually(counted, within=WITHIN)

        # a rerun reports the same SIMs
        await _forget_sims(app, list(sims))
        run = asyncio.create_task(_simulate(url, token, home, *common, "--cellular",
                                            "--duration", "4"))
        await eventually(reported, within=WITHIN)
        code, out, err = await run
        assert code == 0, out + err
        assert _state(home)["devices"] == state["devices"]
        r = await client.get(f"/v1/products/{slug}/sims", headers=bearer(token))
        assert sorted(s["iccid"] for s in r.json()["sims"]) == sorted(sims.values())


async def test_simulate_cellular_mqtt(app: Any, client: httpx.AsyncClient,
                                      tmp_path: Path) -> None:
    async with mqtt_listener(app) as mqtt:
        await _cellular_runs(app, client, tmp_path, lambda: (
            "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt.port)), plain_first=True)


async def test_simulate_cellular_particle_tcp(app: Any, client: httpx.AsyncClient,
                                              settings: Any, tmp_path: Path) -> None:
    async with particle_gateway(app, settings) as gateway:
        key_file = tmp_path / "server_key.der"
        key_file.write_bytes(server_key_file(gateway.server_key.public_key(), "127.0.0.1"))
        await _cellular_runs(app, client, tmp_path, lambda: (
            "--transport", "particle", "--server-key", str(key_file), "--particle-host",
            "127.0.0.1", "--particle-port", str(gateway.port)))


async def test_simulate_cellular_particle_udp(app: Any, client: httpx.AsyncClient,
                                              settings: Any, tmp_path: Path) -> None:
    listener = await start_particle_udp_listener(app.state.runtime.hub, settings,
                                                 host="127.0.0.1", port=0)
    try:
        key_file = tmp_path / "server_key_udp.der"
        key_file.write_bytes(udp_server_key_file(listener.server_key.public_key(),
                                                 "127.0.0.1", listener.port))
        await _cellular_runs(app, client, tmp_path, lambda: (
            "--transport", "particle-udp", "--server-key", str(key_file), "--particle-host",
            "127.0.0.1", "--particle-port", str(listener.port)))
    finally:
        await listener.stop()
