"""Several corral nodes in one test process: one database, one NATS server, a Runtime per
node (each its own bus connection, writer, session hub, registry). Devices are scripted
sessions on one node; the API, streams and control signals are used through another.

What a real deployment adds (separate processes, real sockets, SIGKILL) is in
tests/test_cluster_processes.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from corral.bus.base import Message
from corral.cluster.lease import Leases
from corral.cluster.models import Lease, Node
from corral.cluster.registry import DEAD_REASON, ORPHAN_REASON
from corral.devices.models import Device
from corral.events.models import Event
from corral.mail.backends import LogBackend
from corral.sessions import contract
from corral.settings import Settings
from corral.web.app import Runtime, create_app
from dbreset import truncate_all
from helpers import bearer, owner_and_product
from natskit import namespace, need_nats
from sessionkit import WAIT, ScriptedDevice, connect, import_device, wait_for

DEV = "0123456789abcdef0000c101"
DEV2 = "0123456789abcdef0000c102"


class Node_:
    """One node: its runtime, app and an in-process HTTP client."""

    def __init__(self, runtime: Runtime, app: Any, client: httpx.AsyncClient) -> None:
        self.runtime, self.app, self.client = runtime, app, client

    @property
    def id(self) -> str:
        return self.runtime.node_id


@pytest.fixture
async def cluster(settings: Settings, database_url: str) -> AsyncIterator[Any]:
    """``start()`` adds a node (all on one database and one bus namespace)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("many nodes share a PostgreSQL database (the suite's PostgreSQL pass)")
    await truncate_all(database_url)
    ns = namespace()
    nodes: list[Node_] = []
    stack = contextlib.AsyncExitStack()
    url = need_nats()

    async def start(**overrides: Any) -> Node_:
        s = settings.model_copy(update={
            "bus_url": url, "bus_namespace": ns, "node_heartbeat_s": 0.2,
            "node_dead_after_s": 1.0, "lease_ttl_s": 2.0, **overrides})
        rt = Runtime(s, mail_backend=LogBackend())
        app = create_app(s, runtime=rt)
        await rt.start(app, migrate_db=False, background=False)
        stack.push_async_callback(rt.stop)
        client = await stack.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 50000)),
            base_url="http://corral.test"))
        node = Node_(rt, app, client)
        nodes.append(node)
        return node

    async with stack:
        yield start


async def online(node: Node_, device_id: str) -> tuple[bool, str | None, str | None]:
    async with node.runtime.sessionmaker() as db:
        row = (await db.execute(select(Device.online, Device.node_id,
                                       Device.last_disconnect_reason)
                                .where(Device.id == device_id))).one()
    return bool(row[0]), row[1], row[2]


async def until(check: Any, within: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"not true within {within}s"
        await asyncio.sleep(0.02)


@pytest.fixture
async def two(cluster: Any) -> dict[str, Any]:
    """Nodes a and b; ada's product with DEV connected (scripted) to node a."""
    a, b = await cluster(), await cluster()
    ada, p = await owner_and_product(a.client)
    await import_device(a.client, ada, p["id"], DEV)
    device = ScriptedDevice(functions={"led": lambda arg: 7 if arg == "on" else 0},
                            variables={"temp": ("double", 21.5)})
    session = await connect(a.app, DEV, device)

    async def on_a() -> bool:
        return (await online(a, DEV))[:2] == (True, a.id)

    await until(on_a)
    return {"a": a, "b": b, "ada": ada, "p": p, "device": device, "session": session}


async def test_calls_through_any_node_reach_the_device(two: dict[str, Any]) -> None:
    b, ada = two["b"], two["ada"]
    r = await b.client.post(f"/v1/devices/{DEV}/led", headers=bearer(ada), json={"arg": "on"})
    assert r.status_code == 200, r.text
    assert r.json()["return_value"] == 7
    r = await b.client.get(f"/v1/devices/{DEV}/temp", headers=bearer(ada))
    assert r.status_code == 200 and r.json()["result"] == 21.5
    assert two["device"].calls == [("led", "on")]
    r = await b.client.post(f"/v1/devices/{DEV2}/led", headers=bearer(ada), json={})
    assert r.status_code == 404  # no node holds it (and it is not ada's)


async def test_events_cross_nodes_both_ways(two: dict[str, Any]) -> None:
    a, b, ada, p = two["a"], two["b"], two["ada"], two["p"]
    seen: list[dict[str, Any]] = []

    async def stream(msg: Message) -> None:
        seen.append(msg.json())

    # a product stream on node b (what an SSE stream there subscribes to)
    await b.runtime.bus.subscribe(contract.stream_pattern(product_id=p["id"]), stream)
    event_id = await two["session"].publish("temp", "22.0")
    await wait_for(lambda: any(e["name"] == "temp" for e in seen))
    assert [e["id"] for e in seen if e["name"] == "temp"] == [event_id]
    # a cloud publish through node b reaches the subscribed device on node a
    await two["session"].subscribe("cmd")
    r = await b.client.post(f"/v1/products/{p['slug']}/events", headers=bearer(ada),
                            data={"name": "cmd/go", "data": "now"})
    assert r.status_code == 200, r.text
    await wait_for(lambda: any(n == "cmd/go" for n, _d in two["device"].delivered))
    assert a.runtime.hub.sessions[DEV] is two["session"]


async def test_control_signals_reach_the_holding_node(two: dict[str, Any]) -> None:
    b, ada, p = two["b"], two["ada"], two["p"]
    # deny through node b: the session on node a closes
    r = await b.client.request("DELETE", f"/v1/products/{p['slug']}/devices/{DEV}",
                               headers=bearer(ada), json={"deny": True})
    assert r.status_code == 204, r.text
    await wait_for(lambda: two["session"].closed)
    assert two["device"].disconnected


async def test_a_ledger_written_through_one_node_reaches_a_device_on_another(
        two: dict[str, Any]) -> None:
    """The write commits on node b; node a's sync engine hears of it on the bus and sends
    the device the new document (docs/ledgers.md "Syncing with devices")."""
    b, ada, p = two["b"], two["ada"], two["p"]
    r = await b.client.post("/v1/ledgers", headers=bearer(ada), json={"ledger": {
        "name": "config", "scope": "Product", "direction": "CloudToDevice"}})
    assert r.status_code == 201, r.text
    two["session"].ledgers_wanted()  # the device subscribed to its ledgers on node a
    for n, value in enumerate((5, 10), start=1):
        r = await b.client.put(f"/v1/ledgers/config/instances/{p['id']}", headers=bearer(ada),
                               json={"instance": {"data": {"interval": value}}})
        assert r.status_code == 200, r.text
        await wait_for(lambda n=n: len(two["device"].ledgers) == n)
    assert two["device"].ledgers == [
        {"name": "config", "version": 1, "scope": "Product", "data": {"interval": 5}},
        {"name": "config", "version": 2, "scope": "Product", "data": {"interval": 10}}]


async def test_a_reconnect_to_another_node_takes_over(two: dict[str, Any]) -> None:
    a, b = two["a"], two["b"]
    again = ScriptedDevice(functions={"led": lambda arg: 1})
    new = await connect(b.app, DEV, again)
    await wait_for(lambda: two["session"].closed)
    assert two["session"].close_reason.startswith("Replaced")
    assert DEV not in a.runtime.hub.sessions and b.runtime.hub.sessions[DEV] is new

    async def on_b() -> bool:
        return (await online(a, DEV))[:2] == (True, b.id)

    await until(on_b)
    r = await a.client.post(f"/v1/devices/{DEV}/led", headers=bearer(two["ada"]), json={})
    assert r.status_code == 200 and r.json()["return_value"] == 1


async def test_a_starting_node_touches_no_device_held_by_another(two: dict[str, Any],
                                                                  cluster: Any) -> None:
    await cluster()  # a third node starts
    assert (await online(two["a"], DEV))[:2] == (True, two["a"].id)


async def test_a_dead_nodes_devices_go_offline_and_come_back_elsewhere(
        two: dict[str, Any]) -> None:
    a, b = two["a"], two["b"]
    # node a "dies": its heartbeats stop (its process would be gone)
    assert a.runtime.registry is not None and b.runtime.registry is not None
    for task in a.runtime.registry._tasks:
        task.cancel()
    async with b.runtime.sessionmaker() as db:
        await db.execute(update(Node).where(Node.id == a.id).values(
            heartbeat_at=func.now() - dt.timedelta(seconds=5)))  # older than dead_after_s
        await db.commit()
    await b.runtime.registry.reap()  # (its background reaper may have been first)
    state = await online(b, DEV)
    assert state == (False, a.id, DEAD_REASON)
    async with b.runtime.sessionmaker() as db:
        dead = await db.get(Node, a.id)
        assert dead is not None and dead.stopped_at is not None
        assert dead.stop_reason == "missed heartbeats"

        async def offline_event() -> bool:
            async with b.runtime.sessionmaker() as db2:
                return bool((await db2.execute(select(func.count()).select_from(Event).where(
                    Event.device_id == DEV, Event.name == "spark/status",
                    Event.data == "offline"))).scalar())

    await until(offline_event)
    assert await b.runtime.registry.reap() == 0  # nothing left
    # the device reconnects to node b
    await connect(b.app, DEV, ScriptedDevice())

    async def on_b() -> bool:
        return (await online(b, DEV))[:2] == (True, b.id)

    await until(on_b)


async def test_a_node_declared_dead_while_alive_drops_its_sessions(two: dict[str, Any]) -> None:
    a = two["a"]
    async with a.runtime.sessionmaker() as db:
        await db.execute(update(Node).where(Node.id == a.id).values(
            stopped_at=dt.datetime.now(dt.UTC), stop_reason="missed heartbeats"))
        await db.commit()
    assert a.runtime.registry is not None
    await a.runtime.registry.heartbeat()
    assert two["session"].closed and two["device"].disconnected
    async with a.runtime.sessionmaker() as db:
        node = await db.get(Node, a.id)
        assert node is not None and node.stopped_at is None


async def test_devices_left_online_by_a_single_node_run_are_reaped(cluster: Any) -> None:
    a = await cluster()
    ada, p = await owner_and_product(a.client)
    await import_device(a.client, ada, p["id"], DEV2)
    async with a.runtime.sessionmaker() as db:
        await db.execute(update(Device).where(Device.id == DEV2).values(online=True,
                                                                        node_id=None))
        await db.commit()
    assert a.runtime.registry is not None
    await a.runtime.registry.reap()
    assert await online(a, DEV2) == (False, None, ORPHAN_REASON)


async def test_a_bus_url_on_sqlite_is_refused(settings: Settings, tmp_path: Any) -> None:
    s = settings.model_copy(update={"bus_url": "nats://127.0.0.1:4222",
                                    "database_url": f"sqlite+aiosqlite:///{tmp_path}/x.db"})
    rt = Runtime(s, mail_backend=LogBackend())
    with pytest.raises(RuntimeError, match="needs PostgreSQL"):
        await rt.start(create_app(s, runtime=rt), background=False)


async def test_leases_one_holder_handover_and_expiry(cluster: Any) -> None:
    a = await cluster()
    sm = a.runtime.sessionmaker
    one, two_ = Leases(sm, "node-one", 2.0), Leases(sm, "node-two", 2.0)
    assert await one.acquire("job") and one.held("job")
    assert not await two_.acquire("job") and not two_.held("job")
    assert await one.acquire("job")  # renewal
    await one.stop()  # hands it back
    assert not one.held("job")
    assert await two_.acquire("job")
    # the holder stops renewing (dies): the lease expires and another takes it
    await asyncio.sleep(2.2)
    assert not two_.held("job")  # it stopped believing before the row expired
    assert await one.acquire("job")
    async with sm() as db:
        row = await db.get(Lease, "job")
        assert row is not None and row.holder == "node-one"
    local = Leases(None, "x", 1.0, local=True)
    assert local.held("anything") and await local.acquire("anything")


async def test_singleton_work_runs_on_one_node(cluster: Any) -> None:
    a, b = await cluster(), await cluster()
    for n in (a, b):
        assert n.runtime.leases is not None
        await n.runtime.leases.acquire("metering")
    leaders = [n for n in (a, b) if n.runtime.metering.leads()]
    assert len(leaders) == 1


def _serve(*args: str, tmp: Any) -> Any:
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CORRAL_")}
    return subprocess.run([sys.executable, "-m", "corral.cli.main", "serve", "--data-dir",
                           str(tmp), *args], capture_output=True, text=True, timeout=60, env=env)


def test_serve_workers_refuses_sqlite_and_a_missing_bus(tmp_path: Any) -> None:
    r = _serve("--workers", "2", tmp=tmp_path)
    assert r.returncode == 2
    assert "--workers 2" in r.stdout + r.stderr and "PostgreSQL" in r.stdout + r.stderr
    r = _serve("--workers", "2", "--database-url",
               "postgresql+asyncpg://postgres@127.0.0.1:5432/x", tmp=tmp_path)
    assert r.returncode == 2 and "--bus-url" in r.stdout + r.stderr
    r = _serve("--bus-url", "nats://127.0.0.1:4222", tmp=tmp_path)
    assert r.returncode == 2 and "PostgreSQL" in r.stdout + r.stderr
    assert not (tmp_path / "corral.db").exists()  # refused before anything was created
