"""MQTT forwarding against the Mosquitto broker on 127.0.0.1:1883 (here and in CI): matching
events are published to the customer's broker (topic and payload templates, QoS 1), through
the same outbox, retries, log and SSRF guard as webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from sqlalchemy import select

from corral.integrations.models import Delivery
from corral.settings import Settings
from corral.transports.mqtt.tls import ensure_server_certificate
from devicekit import eventually
from helpers import bearer, new_user
from hookkit import free_port, hook_settings

BROKER = ("127.0.0.1", 1883)
MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)


def broker_up() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(BROKER, 2):
        return True
    return False


# CI has the broker (.ci/run starts one if the machine has not): there a missing broker fails
pytestmark = pytest.mark.skipif(not broker_up() and not os.environ.get("CI"),
                                reason="no MQTT broker on 127.0.0.1:1883")


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return hook_settings(database_url, tmp_path)


@contextlib.asynccontextmanager
async def subscriber(topic: str) -> AsyncIterator[asyncio.Queue[aiomqtt.Message]]:
    queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
    async with aiomqtt.Client(*BROKER) as c:
        await c.subscribe(topic, qos=1)

        async def pump() -> None:
            async for m in c.messages:
                await queue.put(m)

        task = asyncio.get_running_loop().create_task(pump())
        try:
            yield queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def publish(client: Any, token: str, name: str, data: str) -> None:
    r = await client.post("/v1/devices/events", headers=bearer(token),
                          json={"name": name, "data": data})
    assert r.status_code == 200, r.text


async def test_events_are_forwarded_to_the_broker(client, app) -> None:
    app.state.runtime.integrations.start()
    ada = await new_user(client, "ada@example.com")
    root = f"corral-test/{secrets.token_hex(4)}"
    async with subscriber(f"{root}/#") as got:
        r = await client.post("/v1/integrations", headers=bearer(ada), json={
            "integration_type": "MQTT", "event": "env", "url": "mqtt://127.0.0.1:1883",
            "topic": root + "/{{{PARTICLE_DEVICE_ID}}}/{{{PARTICLE_EVENT_NAME}}}", "qos": 1})
        assert r.status_code == 201, r.text
        hook = r.json()
        r = await client.post("/v1/integrations", headers=bearer(ada), json={
            "integration_type": "MQTT", "event": "env/room", "url": "mqtt://127.0.0.1:1883",
            "topic": root + "/rooms/{{{room}}}", "payload": "{{{t}}} C", "qos": 0})
        assert r.status_code == 201, r.text
        await publish(client, ada, "env/room", '{"room":"kitchen","t":21.5}')
        messages = {}
        async with asyncio.timeout(10):
            while len(messages) < 2:
                m = await got.get()
                messages[str(m.topic)] = m.payload
    default = json.loads(messages[f"{root}/api/env/room"])
    assert (default["event"], default["coreid"]) == ("env/room", "api")
    assert default["data"] == '{"room":"kitchen","t":21.5}' and default["published_at"]
    assert messages[f"{root}/rooms/kitchen"] == b"21.5 C"

    async def logged() -> bool:
        r = await client.get(f"/v1/integrations/{hook['id']}/log", headers=bearer(ada))
        return bool(r.json()["log"])

    await eventually(logged)
    r = await client.get(f"/v1/integrations/{hook['id']}/log", headers=bearer(ada))
    [entry] = r.json()["log"]
    assert entry["outcome"] == "success" and entry["response"] == "PUBACK"
    assert entry["request"].startswith("PUBLISH mqtt://127.0.0.1:1883 topic=")


async def test_unreachable_broker_is_retried_then_delivered(client, app) -> None:
    """A broker that is down: the delivery is retried (same outbox, same backoff) and goes
    out once the integration points at a live one."""
    worker = app.state.runtime.integrations
    worker.start()
    ada = await new_user(client, "ada@example.com")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    app.state.settings.integrations_max_attempts = 50
    root = f"corral-test/{secrets.token_hex(4)}"
    r = await client.post("/v1/integrations", headers=bearer(ada), json={
        "integration_type": "MQTT", "event": "m", "url": f"mqtt://127.0.0.1:{dead_port}",
        "topic": root + "/x", "auth": {"username": "u", "password": "broker-secret-pw"}})
    hook = r.json()

    async def retried() -> bool:
        r = await client.get(f"/v1/integrations/{hook['id']}/log", headers=bearer(ada))
        return len(r.json()["log"]) >= 2

    async with subscriber(f"{root}/#") as got:
        await publish(client, ada, "m", "payload")
        await eventually(retried, within=10)
        r = await client.get(f"/v1/integrations/{hook['id']}", headers=bearer(ada))
        assert "broker-secret-pw" not in r.text
        assert r.json()["integration"]["auth"] == {"username": "u", "password": "brok…"}
        r = await client.put(f"/v1/integrations/{hook['id']}", headers=bearer(ada), json={
            "url": "mqtt://127.0.0.1:1883", "topic": root + "/x", "auth": None})
        assert r.status_code == 200, r.text
        async with asyncio.timeout(15):
            m = await got.get()
    assert json.loads(m.payload)["data"] == "payload"

    async def delivered() -> bool:
        async with app.state.sessionmaker() as db:
            [d] = (await db.execute(select(Delivery))).scalars().all()
        return d.status == "success" and d.attempts >= 2

    await eventually(delivered)


async def test_broker_address_goes_through_the_ssrf_guard(client, app) -> None:
    worker = app.state.runtime.integrations
    worker.policy.networks.clear()
    worker.policy.hosts.clear()
    ada = await new_user(client, "ada@example.com")
    r = await client.post("/v1/integrations", headers=bearer(ada), json={
        "integration_type": "MQTT", "event": "m", "url": "mqtt://127.0.0.1:1883"})
    assert r.status_code == 400 and "private" in r.json()["error_description"]
    r = await client.post("/v1/integrations", headers=bearer(ada), json={
        "integration_type": "MQTT", "event": "m", "url": "mqtt://localhost:1883"})
    hook = r.json()
    r = await client.post(f"/v1/integrations/{hook['id']}/test", headers=bearer(ada))
    assert r.json()["pass"] is False and "loopback" in r.json()["error"]


@contextlib.contextmanager
def tls_mosquitto(folder: Path) -> Any:
    """A private Mosquitto with a TLS listener (a self-signed certificate for 127.0.0.1) and
    a plain one for the test's subscriber; stopped by PID."""
    cert, key = ensure_server_certificate(Settings(data_dir=folder))
    tls_port, plain_port = free_port(), free_port()
    conf = folder / "mosquitto.conf"
    # run as root, Mosquitto drops to its own user before it reads the key: stay root then
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}per_listener_settings false\nallow_anonymous true\n"
                    f"persistence false\nlog_dest stderr\n"
                    f"listener {plain_port} 127.0.0.1\n"
                    f"listener {tls_port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n")
    assert MOSQUITTO is not None, "mosquitto is not installed"
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        for port in (plain_port, tls_port):
            while True:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
                assert time.monotonic() < deadline, "the private Mosquitto did not listen"
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except OSError:
                    time.sleep(0.05)
        yield tls_port, plain_port, cert.read_text()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_forwarding_over_tls(client, app, tmp_path) -> None:
    """mqtts:// to a broker with a self-signed certificate: refused while the certificate
    is checked against the system's CAs, delivered with its PEM as `ca`, and delivered with
    `rejectUnauthorized: false`."""
    if MOSQUITTO is None and not os.environ.get("CI"):
        pytest.skip("mosquitto is not installed")
    app.state.runtime.integrations.start()
    app.state.settings.integrations_max_attempts = 50
    ada = await new_user(client, "ada@example.com")
    with tls_mosquitto(tmp_path) as (tls_port, plain_port, pem):
        url = f"mqtts://127.0.0.1:{tls_port}"
        queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        async with aiomqtt.Client("127.0.0.1", plain_port) as sub:
            await sub.subscribe("tls/#", qos=1)

            async def pump() -> None:
                async for m in sub.messages:
                    await queue.put(m)

            pumping = asyncio.get_running_loop().create_task(pump())
            try:
                r = await client.post("/v1/integrations", headers=bearer(ada), json={
                    "integration_type": "MQTT", "event": "sec", "url": url,
                    "topic": "tls/strict"})
                assert r.status_code == 201, r.text
                strict = r.json()
                await publish(client, ada, "sec", "one")

                async def refused() -> bool:
                    r = await client.get(f"/v1/integrations/{strict['id']}/log",
                                         headers=bearer(ada))
                    return bool(r.json()["log"])

                await eventually(refused, within=15)
                r = await client.get(f"/v1/integrations/{strict['id']}/log",
                                     headers=bearer(ada))
                entry = r.json()["log"][0]
                assert entry["outcome"] != "success", entry
                assert "certificate" in (entry.get("error") or "").lower(), entry
                assert queue.empty()
                # trusting the broker's certificate as a CA (a PUT replaces the settings,
                # as on Particle): the next retry goes through
                r = await client.put(f"/v1/integrations/{strict['id']}", headers=bearer(ada),
                                     json={"url": url, "topic": "tls/strict", "ca": pem})
                assert r.status_code == 200, r.text
                async with asyncio.timeout(30):
                    m = await queue.get()
                assert str(m.topic) == "tls/strict" and json.loads(m.payload)["data"] == "one"
                # or not checking it at all
                r = await client.post("/v1/integrations", headers=bearer(ada), json={
                    "integration_type": "MQTT", "event": "lax", "url": url,
                    "topic": "tls/lax", "rejectUnauthorized": False})
                assert r.status_code == 201, r.text
                await publish(client, ada, "lax", "two")
                async with asyncio.timeout(15):
                    while True:
                        m = await queue.get()
                        if str(m.topic) == "tls/lax":
                            break
                assert json.loads(m.payload)["data"] == "two"
                # the worker's last outcomes are written before the fixture resets the data
                await app.state.runtime.integrations.stop()
            finally:
                pumping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pumping
