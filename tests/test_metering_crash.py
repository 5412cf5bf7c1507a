"""Usage is exact across a crash: ``corral serve`` is SIGKILLed while MQTT devices publish
QoS 1 events, restarted, and the load finishes. Per device, the data operations counted
equal the events stored (the increment commits with the event row: nothing lost, nothing
doubled) and are at least the publishes the device saw acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from corral.transports.mqtt.codec import (
    MQTT_311,
    Connack,
    Connect,
    Decoder,
    Puback,
    Publish,
    encode,
)
from mqtt_helpers import until

pytestmark = pytest.mark.slow

DEVICES = [f"0123456789abcdef00dd{i:04x}" for i in range(6)]
PASSWORD = "crash-test-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``corral serve`` in a subprocess on SQLite in ``data_dir``."""

    def __init__(self, data_dir: Path, env_extra: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.http = free_port()
        self.mqtt = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env.update({"CORRAL_LOG_LEVEL": "WARNING", "CORRAL_ARGON2_TIME_COST": "1",
                    "CORRAL_ARGON2_MEMORY_KIB": "8", "CORRAL_LOG_FORMAT": "text",
                    "CORRAL_DATABASE_URL": f"sqlite+aiosqlite:///{data_dir / 'corral.db'}",
                    **(env_extra or {})})
        self.log = open(data_dir / "serve.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.cli.main", "serve", "--no-demo", "--data-dir",
             str(data_dir), "--http-port", str(self.http), "--mqtt-port", str(self.mqtt),
             "--mqtt-tls-port", "0", "--particle-port", "0", "--particle-udp-port", "0"],
            env=env, stdout=self.log, stderr=self.log)
        self.base = f"http://127.0.0.1:{self.http}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((data_dir / "serve.log").read_text())
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            self.kill()
            raise RuntimeError("corral serve did not start within 60 s")
        with contextlib.suppress(OSError):  # the MQTT listener opens with the app
            socket.create_connection(("127.0.0.1", self.mqtt), 5).close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class Device:
    """A lean QoS 1 publisher: counts PUBACKs (success codes only)."""

    def __init__(self, device_id: str) -> None:
        self.id = device_id
        self.acked = 0
        self.next_id = 0
        self.window = asyncio.Semaphore(4)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    async def connect(self, port: int, secret: str) -> None:
        self.window = asyncio.Semaphore(4)
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), 10)
        self.writer.write(encode(Connect(client_id=self.id, username=self.id,
                                         password=secret.encode(), keep_alive=60,
                                         protocol_level=MQTT_311), MQTT_311))
        dec = Decoder(version=MQTT_311, max_packet_size=1 << 20)
        async with asyncio.timeout(10):
            while True:
                data = await self.reader.read(65536)
                assert data, "closed before CONNACK"
                packets = dec.feed(data)
                if packets:
                    assert isinstance(packets[0], Connack) and packets[0].reason_code == 0
                    break
        self.task = asyncio.get_running_loop().create_task(self._read(dec))

    async def _read(self, dec: Decoder) -> None:
        assert self.reader is not None
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await self.reader.read(65536):
                for p in dec.feed(data):
                    if isinstance(p, Puback):
                        if p.reason_code < 0x80:
                            self.acked += 1
                        self.window.release()

    async def publish(self, n: int | None, stop: asyncio.Event | None = None) -> None:
        assert self.writer is not None
        sent = 0
        with contextlib.suppress(ConnectionError, OSError):
            while (n is None or sent < n) and not (stop and stop.is_set()):
                async with asyncio.timeout(10):
                    await self.window.acquire()
                self.next_id = self.next_id % 65535 + 1
                self.writer.write(encode(Publish(f"devices/{self.id}/events/load",
                                                 b'{"t":21.5}', qos=1,
                                                 packet_id=self.next_id), MQTT_311))
                await self.writer.drain()
                sent += 1

    async def drained(self, within: float = 15) -> None:
        async with asyncio.timeout(within):
            for _ in range(4):
                await self.window.acquire()

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.writer:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


def provision(base: str) -> dict[str, str]:
    with httpx.Client(base_url=base, timeout=30) as c:
        c.post("/v1/users", json={"username": "crash@example.com", "password": PASSWORD})
        token = c.post("/oauth/token", data={
            "grant_type": "password", "username": "crash@example.com", "password": PASSWORD,
            "client_id": "crash", "client_secret": "crash"}).json()["access_token"]
        c.headers["Authorization"] = f"Bearer {token}"
        r = c.post("/v1/user/products", json={"product": {
            "name": "Crash", "platform_id": 12, "settings": {
                "quarantine": False, "event_rate_per_s": 1000, "event_rate_burst": 1000}}})
        assert r.status_code == 200, r.text
        slug = r.json()["product"]["slug"]
        assert c.post(f"/v1/products/{slug}/devices", json={"ids": DEVICES}).status_code == 200
        return {d: c.post(f"/v1/products/{slug}/devices/{d}/mqtt_secret").json()["mqtt_secret"]
                for d in DEVICES}


def stored_and_counted(db_path: Path) -> dict[str, tuple[int, int]]:
    con = sqlite3.connect(db_path)
    try:
        out = {}
        for d in DEVICES:
            stored = con.execute(
                "SELECT count(*) FROM events WHERE device_id = ? AND lower(name) NOT LIKE "
                "'spark%' AND lower(name) NOT LIKE 'particle%'", (d,)).fetchone()[0]
            # folded into the counters, or still a delta (the usage readers add both)
            counted = con.execute(
                "SELECT coalesce(sum(data_operations), 0) FROM (SELECT data_operations FROM "
                "usage_counters WHERE device_id = ?1 UNION ALL SELECT data_operations FROM "
                "usage_deltas WHERE device_id = ?1)", (d,)).fetchone()[0]
            out[d] = (stored, counted)
        return out
    finally:
        con.close()


async def test_usage_is_exact_when_the_server_is_killed_under_load(tmp_path: Path) -> None:
    async with asyncio.timeout(150):
        first = await asyncio.to_thread(Server, tmp_path)
        try:
            secrets = await asyncio.to_thread(provision, first.base)
            devices = [Device(d) for d in DEVICES]
            for dev in devices:
                await dev.connect(first.mqtt, secrets[dev.id])
            stop = asyncio.Event()
            load = [asyncio.create_task(dev.publish(None, stop)) for dev in devices]
            await until(lambda: sum(d.acked for d in devices) >= 300, 20, "acknowledged load")
            first.kill()  # SIGKILL mid-load: publishes in flight are never acknowledged
            stop.set()
            for dev in devices:
                for _ in range(8):
                    dev.window.release()
            await asyncio.gather(*load, return_exceptions=True)
            for dev in devices:
                await dev.close()
        finally:
            if first.proc.poll() is None:
                first.kill()
        acked_before = {d.id: d.acked for d in devices}
        assert sum(acked_before.values()) >= 300

        second = await asyncio.to_thread(Server, tmp_path)  # restart on the same database
        try:
            for dev in devices:
                await dev.connect(second.mqtt, secrets[dev.id])
            await asyncio.gather(*(dev.publish(50) for dev in devices))
            for dev in devices:
                await dev.drained()
                await dev.close()
        finally:
            await asyncio.to_thread(second.stop)  # a clean stop commits what was queued
        results = stored_and_counted(tmp_path / "corral.db")
    for dev in devices:
        stored, counted = results[dev.id]
        assert counted == stored, (dev.id, stored, counted)
        assert counted >= dev.acked, (dev.id, counted, dev.acked)
        assert dev.acked >= acked_before[dev.id] + 50
