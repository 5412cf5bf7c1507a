"""Fleet metrics from rollups: the API's numbers equal a direct count of the stored facts
(events per minute, online now, firmware distribution, connects and disconnects), also after
the server restarts; Particle's metrics shapes; bad parameters get clear errors."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from corral.devices.models import Device
from corral.events.models import Event
from corral.events.writer import StoredEvent
from corral.fleet.models import FleetMinute
from corral.fleet.rollups import COUNTERS, FleetTally, minute_of
from corral.kit import clock
from corral.sessions.link import Hello
from helpers import add_device, bearer, new_user, owner_and_product, restarted, settle_fleet
from test_sessions_core import ScriptedLink

DEVS = ["0123456789abcdef0123aa01", "0123456789abcdef0123aa02", "0123456789abcdef0123aa03"]


@pytest.fixture
async def fleet(app: Any, client: Any) -> dict[str, Any]:
    tok, prod = await owner_and_product(client)
    for did in DEVS:
        await add_device(app, did, prod["id"])
    return {"token": tok, "product": prod}


async def direct_events_per_minute(app: Any, product_id: int) -> Counter[dt.datetime]:
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(Event.published_at).where(
            Event.product_id == product_id, Event.source == "device",
            ~Event.name.like("spark%"), ~Event.name.like("particle%")))).scalars().all()
    return Counter(minute_of(clock.aware(t)) for t in rows)  # type: ignore[arg-type]


async def api_events_per_minute(client: Any, tok: str, product: dict[str, Any]
                                ) -> Counter[dt.datetime]:
    now = clock.now()
    r = await client.get(f"/v1/products/{product['id']}/metrics/events", headers=bearer(tok),
                         params={"bucket_size": 60,
                                 "start_date": clock.iso(now - dt.timedelta(minutes=10)),
                                 "end_date": clock.iso(now + dt.timedelta(minutes=2))})
    assert r.status_code == 200, r.text
    return Counter({dt.datetime.fromisoformat(b["time"].replace("Z", "+00:00")): b["received"]
                    for b in r.json()["events"] if b["received"]})


async def run_fleet(app: Any, manual_clock: Any) -> None:
    """Three devices connect (firmware 3, 3 and 5), publish across two minutes, one goes
    offline; a function call succeeds, one fails."""
    hub = app.state.runtime.hub
    links = [ScriptedLink() for _ in DEVS]
    links[0].functions["ok"] = lambda arg: 1
    sessions = [await hub.open(Hello(d, firmware_version=fw), link)
                for d, fw, link in zip(DEVS, (3, 3, 5), links, strict=True)]
    for s in sessions:
        await s.describe(functions=["ok"])
        await s.publish("temp", "1")
    await sessions[0].publish("temp", "2")
    await sessions[0].system_event("spark/flash/status", "started")  # not counted
    manual_clock.set(manual_clock.now() + dt.timedelta(minutes=1))
    for s in sessions[:2]:
        s.bucket.tokens = 4.0
        await s.publish("hum", "3")
    await sessions[2].close("test: gone")
    return sessions


@pytest.mark.parametrize("sampled", [False, True], ids=["counted", "sampled"])
@pytest.mark.parametrize("second", [30, 0], ids=["mid-minute", "on-the-minute"])
async def test_events_online_and_firmware_equal_a_direct_count_across_a_restart(
        app, client, fleet, settings, manual_clock, second, sampled, monkeypatch):
    """``sampled``: the product's devices are read from the once-a-minute sample (as a
    product of 20,000 devices or more is), equal to a direct count once it ran."""
    from corral.fleet import metrics
    from corral.fleet.rollups import sample_online

    if sampled:
        monkeypatch.setattr(metrics, "EXACT_BELOW", 1)
    # on the minute, the online sample opens a bucket that starts exactly "now": the default
    # window (the last day) used to end there and leave it out (online_max 0, a CI flake)
    manual_clock.set(manual_clock.now().replace(second=second))
    tok, prod = fleet["token"], fleet["product"]
    await run_fleet(app, manual_clock)
    await settle_fleet(app)
    want = await direct_events_per_minute(app, prod["id"])
    assert sum(want.values()) == 6 and len(want) == 2
    assert await api_events_per_minute(client, tok, prod) == want

    r = await client.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok))
    assert r.status_code == 200, r.text
    h = r.json()
    async with app.state.sessionmaker() as db:
        online = (await db.execute(select(func.count()).select_from(Device).where(
            Device.product_id == prod["id"], Device.online.is_(True)))).scalar_one()
        fw = dict((await db.execute(select(Device.firmware_version, func.count()).where(
            Device.product_id == prod["id"]).group_by(Device.firmware_version))).all())
    as_of = clock.iso(clock.now()) if sampled else None
    assert h["devices"] == {"total": 3, "online": online, "online_max": 2,
                            "as_of": as_of} and online == 2
    assert {f["version"]: f["devices"] for f in h["firmware"]} == fw == {3: 2, 5: 1}
    assert h["connections"] == {"connects": 3, "disconnects": 1,
                                "reasons": [{"reason": "test: gone", "count": 1}]}
    assert h["events"]["received"] == 6
    assert h["top"]["disconnects"] == [{"device_id": DEVS[2], "disconnects": 1}]

    r = await client.get(f"/v1/products/{prod['slug']}/metrics/events", headers=bearer(tok),
                         params={"bucket_size": 3600, "product_fw": 5})
    assert sum(b["received"] for b in r.json()["events"]) == 1
    r = await client.get(f"/v1/products/{prod['id']}/metrics/online", headers=bearer(tok),
                         params={"bucket_size": 60})
    assert max(b["count"] for b in r.json()["online"]) == 2

    # a restart: the counts were flushed when the server stopped; a new server reads them
    async with restarted(app, settings) as c2:
        assert await api_events_per_minute(c2, tok, prod) == want
        if sampled:  # the restarted server's minute singleton samples first
            async with app.state.sessionmaker() as db:
                await sample_online(db)
                await db.commit()
        r = await c2.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok))
        # the restart marked every device offline; the history stays
        assert r.json()["devices"]["online"] == 0
        assert r.json()["events"]["received"] == 6


async def test_calls_are_counted_by_outcome(app, client, fleet, manual_clock, settings):
    """Success, failure (the device failed), timeout (it did not answer in time) and
    offline are separate outcomes in fleet health; Particle's series count a timeout as a
    failure."""
    tok, prod = fleet["token"], fleet["product"]
    hub = app.state.runtime.hub
    link = ScriptedLink()
    link.functions["ok"] = lambda arg: 7

    def broken(arg: str) -> int:
        from corral.sessions.link import DeviceError

        raise DeviceError("nope")

    async def hang(arg: str) -> int:
        await asyncio.sleep(30)
        return 1

    link.functions["bad"] = broken
    link.functions["slow"] = hang
    link.variables["v"] = 1
    s = await hub.open(Hello(DEVS[0], firmware_version=2), link)
    await s.describe(functions=["ok", "bad", "slow"], variables={"v": "int32"})
    settings.device_call_timeout_s = 0.2
    for path, method, status in ((f"/v1/devices/{DEVS[0]}/ok", "post", 200),
                                 (f"/v1/devices/{DEVS[0]}/bad", "post", 400),
                                 (f"/v1/devices/{DEVS[0]}/slow", "post", 408),
                                 (f"/v1/devices/{DEVS[0]}/v", "get", 200),
                                 (f"/v1/devices/{DEVS[1]}/ok", "post", 404)):  # offline
        r = await getattr(client, method)(path, headers=bearer(tok))
        assert r.status_code == status, (path, r.text)
    await app.state.runtime.fleet.flush()
    r = await client.get(f"/v1/products/{prod['id']}/metrics/functions", headers=bearer(tok),
                         params={"bucket_size": 3600})
    got = Counter()
    for b in r.json()["functions"]:
        assert set(b) <= {"time", "success", "failure", "offline"}  # Particle's shape
        got.update({k: v for k, v in b.items() if k != "time"})
    assert got == {"success": 1, "failure": 2, "offline": 1}
    r = await client.get(f"/v1/products/{prod['id']}/metrics/variables", headers=bearer(tok))
    assert sum(b.get("success", 0) for b in r.json()["variables"]) == 1
    r = await client.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok))
    h = r.json()
    assert h["functions"] == {"success": 1, "failure": 1, "timeout": 1, "offline": 1}
    assert h["variables"] == {"success": 1, "failure": 0, "timeout": 0, "offline": 0}
    assert h["error_rate"] == round(2 / 5, 4)
    assert h["timeout_rate"] == round(1 / 5, 4)
    assert h["offline_rate"] == round(1 / 5, 4)
    assert h["top"]["errors"] == [{"device_id": DEVS[0], "errors": 2}]
    r = await client.get(f"/v1/orgs/{prod['org_id']}/fleet/health", headers=bearer(tok))
    [row] = r.json()["products"]
    assert (row["calls"], row["failed_calls"], row["timed_out_calls"],
            row["timeout_rate"]) == (5, 2, 1, round(1 / 5, 4))


async def test_data_operations_equal_metering(app, client, fleet, manual_clock):
    """The data operations series (and the health total) equal what metering stored for
    the product's devices: counted publishes, function calls and variable reads; the
    cloud's and the device's system events, failed calls and offline answers are none."""
    from corral.metering.usage import U

    tok, prod = fleet["token"], fleet["product"]
    link = ScriptedLink()
    link.functions["ok"] = lambda arg: 7
    link.variables["v"] = 1
    s = await app.state.runtime.hub.open(Hello(DEVS[0], firmware_version=2), link)
    await s.describe(functions=["ok"], variables={"v": "int32"})
    for name in ("temp", "hum", "temp"):
        await s.publish(name, "1")
    manual_clock.set(manual_clock.now() + dt.timedelta(minutes=1))
    s.bucket.tokens = 4.0
    await s.publish("temp", "2")
    for path, method in ((f"/v1/devices/{DEVS[0]}/ok", "post"),
                         (f"/v1/devices/{DEVS[0]}/v", "get"),
                         (f"/v1/devices/{DEVS[0]}/nope", "post"),  # unknown: none
                         (f"/v1/devices/{DEVS[1]}/ok", "post")):  # offline: none
        await getattr(client, method)(path, headers=bearer(tok))
    await settle_fleet(app)
    async with app.state.sessionmaker() as db:
        want = (await db.execute(select(func.sum(U.data_operations)).where(
            U.product_id == prod["id"]))).scalar_one()
    assert want == 6
    now = clock.now()
    r = await client.get(f"/v1/products/{prod['slug']}/metrics/data_operations",
                         headers=bearer(tok),
                         params={"bucket_size": 60,
                                 "start_date": clock.iso(now - dt.timedelta(minutes=5)),
                                 "end_date": clock.iso(now + dt.timedelta(minutes=1))})
    assert r.status_code == 200, r.text
    series = r.json()["data_operations"]
    assert sum(b["count"] for b in series) == want
    assert [b["count"] for b in series if b["count"]] == [3, 3]  # 3 publishes; 1 + 2 calls
    r = await client.get(f"/v1/products/{prod['slug']}/fleet/health", headers=bearer(tok))
    assert r.json()["data_operations"] == want
    r = await client.get(f"/v1/products/{prod['slug']}/metrics/data_operations",
                         headers=bearer(tok), params={"product_fw": 3})
    assert sum(b["count"] for b in r.json()["data_operations"]) == 0
    await s.close("done")


@pytest.mark.parametrize("params", [
    {"start_date": "nope"}, {"bucket_size": "10"}, {"bucket_size": "x"},
    {"start_date": "2026-01-02T00:00:00Z", "end_date": "2026-01-01T00:00:00Z"},
    {"product_fw": "v3"}, {"device_group": "Beta!"}, {"device_os_version": "6.2.0 x"},
])
async def test_bad_metrics_parameters(client, fleet, params):
    r = await client.get(f"/v1/products/{fleet['product']['id']}/metrics/online",
                         headers=bearer(fleet["token"]), params=params)
    assert r.status_code == 400, r.text
    assert r.json()["ok"] is False and r.json()["error"] == "bad_request"


async def test_other_tenants_get_no_metrics(client, fleet):
    eve = await new_user(client, "eve@example.com")
    for path in ("metrics/events", "fleet/health", "fleet_locations"):
        r = await client.get(f"/v1/products/{fleet['product']['id']}/{path}",
                             headers=bearer(eve))
        assert r.status_code == 404, r.text


async def test_fleet_locations_are_each_devices_last_point(app, client):
    tok, prod = await owner_and_product(client, settings={"location": {"opt_in": True}})
    for did in DEVS[:2]:
        await add_device(app, did, prod["id"])
    hub = app.state.runtime.hub
    for did, points in ((DEVS[0], ['{"lat": 1, "lon": 2}', '{"lat": 3, "lon": 4}']),
                        (DEVS[1], ['{"lat": 5, "lon": 6}'])):
        s = await hub.open(Hello(did), ScriptedLink())
        for p in points:
            await s.publish("loc", p)
        await s.close("done")
    await app.state.runtime.locations.drain()
    r = await client.get(f"/v1/products/{prod['id']}/fleet_locations", headers=bearer(tok))
    assert r.status_code == 200, r.text
    got = {x["device_id"]: x["geometry"]["coordinates"] for x in r.json()["locations"]}
    assert got == {DEVS[0]: [4.0, 3.0], DEVS[1]: [6.0, 5.0]}


async def test_a_failed_flush_keeps_the_counts(app, fleet, manual_clock):
    rt = app.state.runtime
    tally = FleetTally(rt.sessionmaker)
    tally.call(DEVS[0], fleet["product"]["id"], "function", "success")
    real = tally.sessionmaker
    tally.sessionmaker = None  # type: ignore[assignment]
    with pytest.raises(TypeError):
        await tally.flush()
    tally.sessionmaker = real
    await tally.flush()
    async with rt.sessionmaker() as db:
        assert (await db.execute(select(func.sum(FleetMinute.fn_success)))).scalar_one() == 1


async def test_an_organizations_fleet_health_sums_its_products(app, client, fleet,
                                                               manual_clock):
    from helpers import make_org

    tok = fleet["token"]
    org = await make_org(client, tok)
    r = await client.post(f"/v1/orgs/{org['slug']}/products", headers=bearer(tok),
                          json={"product": {"name": "Org Widget", "platform_id": 12}})
    assert r.status_code in (200, 201), r.text
    prod = r.json()["product"]
    await add_device(app, "0123456789abcdef0123ab99", prod["id"])
    s = await app.state.runtime.hub.open(Hello("0123456789abcdef0123ab99"), ScriptedLink())
    await s.publish("temp", "1")
    await app.state.runtime.writer.stop()
    app.state.runtime.writer.start()
    await app.state.runtime.fleet.flush()
    r = await client.get(f"/v1/orgs/{org['slug']}/fleet/health", headers=bearer(tok))
    assert r.status_code == 200, r.text
    body = r.json()
    [row] = body["products"]
    assert (row["slug"], row["devices"], row["online"], row["events"]) == (
        prod["slug"], 1, 1, 1)
    assert body["total"]["events"] == 1 and body["total"]["connects"] == 1
    eve = await new_user(client, "eve@example.com")
    r = await client.get(f"/v1/orgs/{org['slug']}/fleet/health", headers=bearer(eve))
    assert r.status_code == 404
    await s.close("done")


async def test_troubled_devices_equal_a_direct_sum(app: Any, client: Any, fleet: Any) -> None:
    """The most troubled devices (one pass over the per-device days) are the direct sums of
    the stored rows in the range, most first, ties by device ID, at most ``limit`` each, and
    devices with none left out; days before the range do not count."""
    from corral.fleet import metrics
    from corral.fleet.models import FleetDeviceDay
    from corral.fleet.rollups import add_counts, day_of

    pid = fleet["product"]["id"]
    today = day_of(clock.now())
    ids = [f"0123456789abcdef0123bb{i:02x}" for i in range(14)]
    days: dict[tuple[str, dt.datetime, int], list[int]] = {}
    for i, did in enumerate(ids):
        for k in range(4):  # k == 3: before the range
            days[(did, today - dt.timedelta(days=k), pid)] = [(i * 5 + k) % 4, (i * 3 + k) % 3]
    days[(ids[0], today, pid + 1000)] = [50, 50]  # another product's row: not counted
    async with app.state.sessionmaker() as db:
        await add_counts(db, {}, days)
        await db.commit()
        w = metrics.Window(today - dt.timedelta(days=2), clock.now(), 3600)
        got = await metrics.troubled_devices(db, pid, w, limit=5)
        rows = (await db.execute(select(FleetDeviceDay).where(
            FleetDeviceDay.product_id == pid, FleetDeviceDay.day >= w.start))).scalars().all()
    for key in ("disconnects", "errors"):
        sums: Counter[str] = Counter()
        for r in rows:
            sums[r.device_id] += getattr(r, key)
        want = sorted(((-n, d) for d, n in sums.items() if n > 0))[:5]
        assert got[key] == [{"device_id": d, key: -n} for n, d in want], key


@pytest.mark.parametrize("firmware", [None, 3], ids=["unfiltered", "by-firmware"])
async def test_troubled_devices_read_the_covering_index(app: Any, database_url: str,
                                                        firmware: int | None) -> None:
    """SQLite answers the per-device sums of the days without lists (all of them here)
    from the covering index alone (the table is never read), in one materialized pass for
    both lists, after reading which days have lists; a filter is probed per row by primary
    key (the filter's devices are never all read)."""
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite's plan (PostgreSQL picks by statistics)")
    from sqlalchemy import text

    from corral.fleet import metrics

    captured: list[Any] = []
    async with app.state.sessionmaker() as db:
        execute = db.execute

        async def spy(stmt: Any, *a: Any, **kw: Any) -> Any:
            captured.append(stmt)
            return await execute(stmt, *a, **kw)

        db.execute = spy  # type: ignore[method-assign]
        now = clock.now()
        await metrics.troubled_devices(db, 1, metrics.Window(now - dt.timedelta(days=30),
                                                             now, 3600, firmware=firmware))
        assert len(captured) == 2
        sql = captured[-1].compile(dialect=(await db.connection()).dialect,
                                   compile_kwargs={"literal_binds": True})
        plan = " | ".join(str(r[-1]) for r in (await execute(text(
            f"EXPLAIN QUERY PLAN {sql}"))).all())
    assert "COVERING INDEX ix_fleet_device_days_product_day" in plan, plan
    assert plan.count("SEARCH fleet_device_days") == 1 and "MATERIALIZE sums" in plan, plan
    if firmware:
        assert "SEARCH devices USING INDEX sqlite_autoindex_devices_1 (id=?)" in plan \
            or "SEARCH devices USING PRIMARY KEY" in plan, plan
        assert "SCAN devices" not in plan, plan


async def test_a_call_is_counted_before_its_caller_has_the_answer(app, client, fleet):
    """On a bus whose publish yields (a networked one), the caller used to get its answer
    before the session counted the call: a caller that then read the metrics (this file's
    call test, once on PostgreSQL) missed it."""
    import asyncio

    rt = app.state.runtime
    bus = rt.hub.bus
    publish = bus.publish

    async def slow_publish(subject: str, payload: Any, *a: Any, **kw: Any) -> Any:
        out = await publish(subject, payload, *a, **kw)
        await asyncio.sleep(0.05)
        return out

    bus.publish = slow_publish
    link = ScriptedLink()
    link.functions["ok"] = lambda arg: 1
    s = await rt.hub.open(Hello(DEVS[0]), link)
    await s.describe(functions=["ok"])
    try:
        r = await client.post(f"/v1/devices/{DEVS[0]}/ok", headers=bearer(fleet["token"]))
        assert r.status_code == 200, r.text
        i = COUNTERS.index("fn_success")
        assert sum(row[i] for row in rt.fleet.counts.values()) == 1
    finally:
        bus.publish = publish
        await s.close("done")


def test_the_tally_counts_each_device_event_once_under_its_minute_and_firmware() -> None:
    """The after-commit hook counts per (device, product, firmware, minute) and folds at
    flush: a batch spanning two minutes, naive and aware times, the firmware carried by the
    event or (when not) looked up, system events and events of no product left out."""
    t = FleetTally(async_sessionmaker(), firmware_of={"b": 9}.get)
    m0 = dt.datetime(2026, 12, 5, 10, 0, 59, 999_999, tzinfo=dt.UTC)
    m1 = m0 + dt.timedelta(microseconds=1)

    def ev(i: int, device: str, at: dt.datetime, *, name: str = "temp", fw: int | None = 3,
           product: int | None = 1, counted: bool = False) -> StoredEvent:
        return StoredEvent(id=i, published_at=at, name=name, data=None, ttl=60,
                           source="device", device_id=device, product_id=product, org_id=None,
                           owner_user_id=None, customer_id=None, private=True,
                           counted=counted, firmware_version=fw)

    t([ev(1, "a", m0, counted=True), ev(2, "a", m1), ev(3, "a", m1.replace(tzinfo=None)),
       ev(4, "b", m0, fw=None), ev(5, "a", m0, name="spark/device/x"),
       ev(6, "a", m0, name="Particle/x"), ev(7, "a", m0, product=None)])
    t([ev(8, "a", m0)])
    t._fold()
    e, ops = COUNTERS.index("events"), COUNTERS.index("data_ops")
    minute = m0.replace(second=0, microsecond=0)
    got = {k: (row[e], row[ops]) for k, row in t.counts.items()}
    assert got == {(1, minute, 3): (2, 1), (1, minute + dt.timedelta(minutes=1), 3): (2, 0),
                   (1, minute, 9): (1, 0)}
    assert sum(row[e] for row in t.per_device.values()) == 5
    assert t.pending == {} and t.pending_ops == {}
