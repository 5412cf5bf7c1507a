"""``corral simulate`` learns where devices connect from the server (GET /v1/device_endpoints),
never reports success for devices corral did not see, and two simulators of one product do
not share a state file. Real servers: ``corral serve`` as a process, or the app on a socket,
and a stand-in for "another MQTT broker" that accepts every device."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from corral.transports.mqtt.codec import (
    Connack,
    Connect,
    Decoder,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    encode,
)
from devicekit import eventually, mqtt_listener
from helpers import bearer, make_product, new_user
from sessionkit import live_server
from test_serve import corral_serve
from test_simulator import _simulate


async def test_device_endpoints_route(app: Any, client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/device_endpoints")).status_code == 401
    token = await new_user(client, "ada@example.com")
    r = await client.get("/v1/device_endpoints", headers=bearer(token))
    assert r.status_code == 200, r.text
    settings = app.state.settings
    ep = r.json()["endpoints"]
    assert ep["mqtt"] == ({"host": "127.0.0.1", "port": settings.mqtt_port}
                          if settings.mqtt_port else None)
    assert set(ep) == {"mqtt", "mqtts", "particle_tcp", "particle_udp"}


async def test_simulate_uses_the_servers_mqtt_port(tmp_path: Path) -> None:
    """Against ``corral serve`` on a non-default MQTT port, with no port option: the devices
    reach corral (it once assumed 1883, where a local Mosquitto accepted them)."""
    with corral_serve(tmp_path / "data", tmp_path / "logs") as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as c:
            token = await new_user(c, "sim@example.com")
            product = await make_product(c, token, "Discovered", platform_id=12)
            ep = (await c.get("/v1/device_endpoints", headers=bearer(token))).json()
        port = ep["endpoints"]["mqtt"]["port"]
        assert port != 1883
        code, out, err = await _simulate(served.url, token, tmp_path / "home", "--product",
                                         product["slug"], "--devices", "2", "--duration", "3")
        assert code == 0, out + err
        assert f"mqtt://127.0.0.1:{port}" in out and "Simulated 2 devices" in out, out
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as c:
            devices = (await c.get(f"/v1/products/{product['slug']}/devices",
                                   headers=bearer(token))).json()["devices"]
        assert len(devices) == 2 and all(d["last_heard"] for d in devices), devices


@contextlib.asynccontextmanager
async def any_broker() -> AsyncIterator[int]:
    """Another MQTT broker on a free port: it accepts every CONNECT, SUBSCRIBE and PUBLISH
    (as an open Mosquitto does) and tells corral nothing."""
    conns: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec, version = Decoder(), 5
        try:
            while data := await reader.read(65536):
                for p in dec.feed(data):
                    if isinstance(p, Connect):
                        version = p.protocol_level
                        writer.write(encode(Connack(False, 0), version))
                    elif isinstance(p, Subscribe):
                        writer.write(encode(Suback(p.packet_id, tuple(
                            s.qos for s in p.subscriptions)), version))
                    elif isinstance(p, Publish) and p.qos == 1 and p.packet_id is not None:
                        writer.write(encode(Puback(p.packet_id), version))
                    elif isinstance(p, Pingreq):
                        writer.write(encode(Pingresp(), version))
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def track(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        t = asyncio.get_running_loop().create_task(serve(r, w))
        conns.add(t)
        t.add_done_callback(conns.discard)

    server = await asyncio.start_server(track, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(conns):
            t.cancel()
        await asyncio.gather(*conns, return_exceptions=True)
        await server.wait_closed()


async def test_simulate_refuses_success_when_corral_never_saw_a_device(
        app: Any, client: httpx.AsyncClient, tmp_path: Path) -> None:
    token = await new_user(client, "sim@example.com")
    product = await make_product(client, token, "Elsewhere", platform_id=12)
    async with live_server(app) as url, any_broker() as port:
        code, out, err = await _simulate(url, token, tmp_path, "--product", product["slug"],
                                         "--mqtt-host", "127.0.0.1", "--mqtt-port", str(port),
                                         "--devices", "2", "--duration", "3")
    assert code == 1, out + err
    assert "never saw them" in err and f"127.0.0.1:{port}" in err, err
    assert "GET /v1/device_endpoints" in err


async def test_two_simulators_of_one_product_do_not_share_a_state_file(
        app: Any, client: httpx.AsyncClient, tmp_path: Path) -> None:
    token = await new_user(client, "sim@example.com")
    product = await make_product(client, token, "Twice", platform_id=12)
    async with live_server(app) as url, mqtt_listener(app) as mqtt:
        common = ("--product", product["slug"], "--mqtt-host", "127.0.0.1",
                  "--mqtt-port", str(mqtt.port), "--interval", "1")
        # the first run must outlive the two below, each a new Python process (seconds apiece
        # on a loaded machine): it holds its state file the whole time
        first = asyncio.create_task(_simulate(url, token, tmp_path, *common, "--devices", "2",
                                              "--duration", "30"))
        states = tmp_path / "corral" / "simulate"

        async def first_has_its_fleet() -> bool:
            return bool(list(states.glob("*.json")))

        await eventually(first_has_its_fleet, within=30)
        # an explicit --state that the first run holds is refused
        [held] = [p for p in states.glob("*.json") if "-2" not in p.name]
        code, out, err = await _simulate(url, token, tmp_path, *common, "--state", str(held),
                                         "--devices", "1", "--duration", "1")
        assert code == 2 and "in use by another" in err, out + err
        code, out, err = await _simulate(url, token, tmp_path, *common, "--devices", "3",
                                         "--duration", "2")
        assert code == 0, out + err
        assert "uses its own" in err, err
        code, out, err = await first
        assert code == 0, out + err
    files = sorted(states.glob("*.json"))
    assert len(files) == 2
    fleets = [{d["id"] for d in json.loads(f.read_text())["devices"]} for f in files]
    assert sorted(len(f) for f in fleets) == [2, 3] and not fleets[0] & fleets[1]
