"""Three real ``corral serve`` processes on one PostgreSQL database and one NATS server,
MQTT and Particle devices spread over the two gateways by a TCP load balancer, calls and an
SSE stream through the API node, and one gateway killed with SIGKILL in the middle of the
load.

It checks what a user of a scaled-out corral relies on: no acknowledged event is lost, no
data operation is counted twice (the usage ledger equals the stored events), every device is
back online through the surviving gateway, a device that does not come back is marked
offline by the registry with its reason within the bound, singleton work moved to a live
node, and presence is correct afterwards.

The database is ``<test database>_cluster`` (created when missing, its schema recreated), the
bus namespace is random, so parallel runs never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from corral.cluster.registry import DEAD_REASON
from corral.db.engine import make_engine
from corral.device.client import Device
from corral.device.particle_fleet import generate_keys, load_device_key, public_pem
from corral.transports.particle import coap
from corral.transports.particle.device import ParticleDevice
from corral.transports.particle.keys import load_or_create_server_key
from helpers import bearer, make_product, new_user, post_ids
from natskit import namespace, need_nats

pytestmark = [pytest.mark.slow, pytest.mark.database_pass]

PG_URL = os.environ.get("CORRAL_TEST_DATABASE_URL", "")
N_MQTT, N_PARTICLE = 6, 4
DEAD_BOUND_S = 30.0  # the registry's promise: a dead node's devices offline within this
START_S = 60.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def cluster_database() -> str:
    """``<test database>_cluster`` with an empty public schema."""
    base = make_url(PG_URL)
    name = f"{base.database}_cluster"
    admin = make_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            if not (await conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                       {"n": name})).first():
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    url = base.set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    finally:
        await engine.dispose()
    return url


class Node:
    def __init__(self, name: str, role: str, proc: subprocess.Popen[bytes], http: int,
                 mqtt: int, particle: int, log: Path) -> None:
        self.name, self.role, self.proc = name, role, proc
        self.http, self.mqtt, self.particle, self.log = http, mqtt, particle, log
        self.url = f"http://127.0.0.1:{http}"
        self.id: str | None = None


def start_node(name: str, role: str, tmp: Path, db_url: str, nats_url: str, ns: str) -> Node:
    http, mqtt, particle = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_ARGON2_TIME_COST="1", CORRAL_ARGON2_MEMORY_KIB="8",
               CORRAL_BUS_NAMESPACE=ns, CORRAL_NODE_HEARTBEAT_S="1",
               CORRAL_NODE_DEAD_AFTER_S="4", CORRAL_LEASE_TTL_S="4",
               CORRAL_EVENT_RATE_PER_S="200", CORRAL_EVENT_RATE_BURST="200",
               CORRAL_METERING_REFRESH_S="0.5", CORRAL_LOG_FORMAT="text")
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral.cli.main", "serve", "--role", role,
             "--http-port", str(http), "--mqtt-port", str(mqtt), "--mqtt-tls-port", "0",
             "--particle-port", str(particle), "--particle-udp-port", "0", "--data-dir", str(tmp / "data"),
             "--database-url", db_url, "--bus-url", nats_url],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    return Node(name, role, proc, http, mqtt, particle, log)


async def wait_healthy(node: Node) -> None:
    deadline = time.monotonic() + START_S
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                pytest.fail(f"{node.name} exited:\n{node.log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.TransportError):
                r = await http.get(f"{node.url}/healthz")
                if r.status_code == 200:
                    node.id = r.json()["node"]
                    return
            await asyncio.sleep(0.2)
    pytest.fail(f"{node.name} not healthy:\n{node.log.read_text()[-4000:]}")


class Balancer:
    """A TCP load balancer in front of the gateways' device ports: round-robin over the
    backends that accept a connection (a dead one refuses, the next is tried)."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.next = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = None
        for _ in range(len(self.backends)):
            port = self.backends[self.next % len(self.backends)]
            self.next += 1
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
                break
            except (OSError, TimeoutError):
                continue
        if upstream is None:
            writer.close()
            return
        ur, uw = upstream

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class Load:
    """Devices publishing numbered QoS 1 events; what the server acknowledged is recorded."""

    def __init__(self) -> None:
        self.acked: dict[str, set[int]] = defaultdict(set)
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def mqtt(self, dev: Device) -> None:
        runner = asyncio.create_task(dev.run_forever())
        seq = 0
        try:
            while not self.stop.is_set():
                seq += 1
                try:
                    await asyncio.wait_for(dev.wait_connected(), 10)
                    await asyncio.wait_for(dev.publish("load/seq", str(seq), qos=1), 10)
                except Exception:
                    await asyncio.sleep(0.1)
                    continue
                self.acked[dev.device_id].add(seq)
                await asyncio.sleep(0.05)
        finally:
            await dev.close()
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner

    async def particle(self, did: str, key: Any, server_key: Any, port: int,
                       connected: dict[str, ParticleDevice]) -> None:
        seq = 0
        while not self.stop.is_set():
            dev = ParticleDevice(did, key, server_key, platform_id=12,
                                 functions={"ping": lambda arg: len(arg)})
            try:
                await dev.connect("127.0.0.1", port, within=15)
            except Exception:
                await dev.close()
                await asyncio.sleep(0.3)
                continue
            connected[did] = dev
            try:
                while not self.stop.is_set() and not dev.closed.is_set():
                    seq += 1
                    try:
                        code = await dev.publish_confirmed("load/seq", str(seq), within=10)
                    except Exception:
                        break
                    if code == coap.CHANGED:  # stored
                        self.acked[did].add(seq)
                    await asyncio.sleep(0.1)
            finally:
                connected.pop(did, None)
                await dev.close()


@contextlib.asynccontextmanager
async def three_nodes(tmp: Path) -> AsyncIterator[tuple[list[Node], str]]:
    nats_url = need_nats()
    db_url = await cluster_database()
    ns = namespace()
    first = start_node("gw1", "all", tmp, db_url, nats_url, ns)
    nodes = [first]
    try:
        await wait_healthy(first)  # it migrated the database
        nodes += [start_node("gw2", "all", tmp, db_url, nats_url, ns),
                  start_node("api", "api", tmp, db_url, nats_url, ns)]
        await asyncio.gather(*(wait_healthy(n) for n in nodes[1:]))
        yield nodes, db_url
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.send_signal(signal.SIGTERM)
        for n in nodes:
            try:
                n.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                n.proc.kill()
                n.proc.wait()


async def sql(db_url: str, query: str, **params: Any) -> list[Any]:
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(query), params)).all())
    finally:
        await engine.dispose()


async def test_three_nodes_one_killed_mid_load(tmp_path: Path) -> None:
    if not PG_URL.startswith("postgresql"):
        pytest.skip("many nodes share a PostgreSQL database (the suite's PostgreSQL pass)")
    async with three_nodes(tmp_path) as (nodes, db_url):
        gw1, gw2, api = nodes
        http = httpx.AsyncClient(base_url=api.url, timeout=30)
        token = await new_user(http, "ops@example.com")
        product = await make_product(http, token, platform_id=12)
        slug = product["slug"]
        # MQTT devices with secrets, Particle devices with registered keys
        mqtt_ids = [secrets.token_hex(12) for _ in range(N_MQTT + 1)]
        particle_ids = [secrets.token_hex(12) for _ in range(N_PARTICLE)]
        r = await post_ids(http, token, slug, ids=mqtt_ids + particle_ids)
        assert r.status_code == 200, r.text
        creds = {}
        for did in mqtt_ids:
            r = await http.post(f"/v1/products/{slug}/devices/{did}/mqtt_secret",
                                headers=bearer(token))
            creds[did] = r.json()["mqtt_secret"]
        keys = {did: load_device_key(pem)
                for did, pem in zip(particle_ids, generate_keys(N_PARTICLE, workers=1),
                                    strict=True)}
        for did, key in keys.items():
            r = await http.post(f"/v1/provisioning/{did}", headers=bearer(token),
                                json={"publicKey": public_pem(key)})
            assert r.status_code < 300, r.text
        server_key = load_or_create_server_key(tmp_path / "data").public_key()

        # an SSE stream of the product on the API node
        stream_seen: dict[str, set[str]] = defaultdict(set)

        async def stream() -> None:
            async with http.stream("GET", f"/v1/products/{slug}/events/load",
                                   headers=bearer(token), timeout=None) as resp:
                name = None
                async for line in resp.aiter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: ") and name == "load/seq":
                        d = json.loads(line[6:])
                        stream_seen[d["coreid"]].add(d["data"])

        streamer = asyncio.create_task(stream())

        mqtt_lb, particle_lb = Balancer([gw1.mqtt, gw2.mqtt]), Balancer(
            [gw1.particle, gw2.particle])
        await mqtt_lb.start()
        await particle_lb.start()
        load = Load()
        devices: dict[str, Device] = {}
        for did in mqtt_ids[:N_MQTT]:
            dev = Device(did, creds[did], "127.0.0.1", mqtt_lb.port, reconnect_initial=0.2,
                         reconnect_max=1.0, keepalive=10, ack_timeout=10)
            dev.function("ping")(lambda arg: len(arg))
            devices[did] = dev
            load.tasks.append(asyncio.create_task(load.mqtt(dev)))
        particles: dict[str, ParticleDevice] = {}
        for did, key in keys.items():
            load.tasks.append(asyncio.create_task(
                load.particle(did, key, server_key, particle_lb.port, particles)))
        # one device straight on gw1 that will not come back: the registry marks it offline
        silent_id = mqtt_ids[N_MQTT]
        silent = Device(silent_id, creds[silent_id], "127.0.0.1", gw1.mqtt, keepalive=60)
        await silent.connect()

        all_ids = mqtt_ids + particle_ids

        async def holders() -> dict[str, str | None]:
            rows = await sql(db_url, "SELECT id, node_id FROM devices WHERE online")
            return {r[0]: r[1] for r in rows}

        async def until(check: Any, within: float, what: str) -> float:
            t0 = time.monotonic()
            while not await check():
                assert time.monotonic() - t0 < within, f"{what}: not within {within}s"
                await asyncio.sleep(0.2)
            return time.monotonic() - t0

        async def all_online() -> bool:
            return set(await holders()) == set(all_ids)

        await until(all_online, 40, "every device online")
        held = await holders()
        assert {held[d] for d in all_ids} == {gw1.id, gw2.id}, held  # spread over both

        async def call_all(via: httpx.AsyncClient) -> dict[str, int]:
            out = {}
            for did in [*mqtt_ids[:N_MQTT], *particle_ids]:
                r = await via.post(f"/v1/devices/{did}/ping", headers=bearer(token),
                                   json={"arg": "abc"})
                out[did] = r.status_code
            return out

        # calls through the API node reach devices on both gateways
        async def calls_ok() -> bool:
            return set((await call_all(http)).values()) == {200}

        await until(calls_ok, 20, "calls through the API node")
        await asyncio.sleep(2)  # load runs on both gateways

        # --- SIGKILL gw1 mid-load
        before = await holders()
        on_gw1 = [d for d, n in before.items() if n == gw1.id and d != silent_id]
        assert on_gw1, before
        gw1.proc.send_signal(signal.SIGKILL)
        gw1.proc.wait(timeout=10)
        killed_at = time.monotonic()

        async def moved() -> bool:
            h = await holders()
            return all(h.get(d) == gw2.id for d in all_ids if d != silent_id)

        await until(moved, 45, "devices back online through gw2")

        async def silent_offline() -> bool:
            rows = await sql(db_url, "SELECT online, last_disconnect_reason FROM devices "
                                     "WHERE id = :d", d=silent_id)
            return rows[0][0] is False and rows[0][1] == DEAD_REASON

        await until(silent_offline, DEAD_BOUND_S + 5, "the dead node's device offline")
        offline_after = time.monotonic() - killed_at
        assert offline_after <= DEAD_BOUND_S, offline_after
        await until(calls_ok, 20, "calls after the kill")
        await asyncio.sleep(2)  # more load on the surviving gateway

        # --- stop the load; every acknowledged event is stored exactly as acknowledged
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*load.tasks, return_exceptions=True), 30)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(silent.close(), 2)
        rows = await sql(db_url, "SELECT device_id, data FROM events WHERE name = 'load/seq'")
        stored: dict[str, set[int]] = defaultdict(set)
        for did, data in rows:
            stored[did].add(int(data))
        total_acked = sum(len(s) for s in load.acked.values())
        assert total_acked > 100, load.acked
        for did, seqs in load.acked.items():
            missing = seqs - stored[did]
            assert not missing, f"{did}: acknowledged and lost: {sorted(missing)[:10]}"
        # each stored data operation counted once: the usage ledger equals the stored events
        # (after the metering lease moved to a live node and folded)

        async def ledger_matches() -> bool:
            [(counted,)] = await sql(db_url, (
                "SELECT (SELECT coalesce(sum(events_published), 0) FROM usage_counters) + "
                "(SELECT coalesce(sum(events_published), 0) FROM usage_pending)"))
            return int(counted) == len(rows)

        await until(ledger_matches, 20, "usage ledger equals the stored events")
        leases = await sql(db_url, "SELECT name, holder FROM leases WHERE expires_at > now()")
        # gw1's work moved: singleton work to gw2 (the api node takes none), the reaper
        # (any role) to a live node
        assert {n for n, _h in leases} >= {"metering", "billing", "mail-outbox", "node-reaper"}
        assert all(h == gw2.id for n, h in leases if n != "node-reaper"), leases
        assert all(h in (gw2.id, api.id) for _n, h in leases), leases
        # the stream on the API node saw events of devices from both gateways
        on_gw2_before = [d for d, n in before.items() if n == gw2.id]
        assert any(stream_seen[d] for d in on_gw1) and any(stream_seen[d] for d in on_gw2_before)
        streamer.cancel()
        await mqtt_lb.stop()
        await particle_lb.stop()
        # presence afterwards: the devices closed their connections, so all are offline, and
        # gw1's row says it died
        await until(lambda: _none_online(db_url), 20, "presence after the load")
        [(stopped, reason)] = await sql(db_url, "SELECT stopped_at IS NOT NULL, stop_reason "
                                                "FROM nodes WHERE id = :n", n=gw1.id)
        assert stopped and reason == "missed heartbeats"
        await http.aclose()


async def _none_online(db_url: str) -> bool:
    return not await sql(db_url, "SELECT id FROM devices WHERE online")
