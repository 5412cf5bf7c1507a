"""The fleet's vitals aggregates come from rollups written where the reports are stored:
the API's median equals a direct computation over every stored report within the bins'
resolution, and its worst exactly, unfiltered, per group, per Device OS version and per
firmware version, over hours and over days, and across a restart; a replayed report is not
counted twice."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import statistics
from typing import Any

import pytest
from sqlalchemy import select

from corral.events.writer import StoredEvent
from corral.fleet import report, vitals, vitals_rollups
from corral.fleet.models import DeviceVitals, FleetVitalsDay, FleetVitalsHour
from corral.fleet.tasks import fleet_retention
from corral.kit import clock
from corral.sessions.link import Hello, Refused
from helpers import add_device, bearer, console_session, owner_and_product, restarted
from test_sessions_core import ScriptedLink

# device: (product firmware, Device OS, groups)
FLEET = {"0123456789abcdef0123dd01": (3, "6.2.0", ["beta"]),
         "0123456789abcdef0123dd02": (3, "5.9.0", ["beta"]),
         "0123456789abcdef0123dd03": (5, "6.2.0", []),
         "0123456789abcdef0123dd04": (5, "6.2.0", ["beta"])}
FILTERS: list[dict[str, Any]] = [{}, {"device_group": "beta"}, {"device_os_version": "6.2.0"},
                                 {"product_fw": 5}, {"device_group": "beta", "product_fw": 3}]


def doc(rnd: random.Random) -> dict[str, Any]:
    return {"device": {"network": {"signal": {"rssi": rnd.randint(-110, -40)}},
                       "cloud": {"coap": {"round_trip": rnd.choice(
                           [rnd.randint(20, 2_000), round(rnd.uniform(20, 900), 1)])}},
                       "system": {"memory": {"used": rnd.randint(20_000, 150_000),
                                             "total": 160_000}}}}


@pytest.fixture
async def fleet(app: Any, client: Any, manual_clock: Any) -> dict[str, Any]:
    """Each device reports three times (two minutes apart, in two hours) with random
    vitals; one report has no vitals at all, one no signal."""
    manual_clock.set(manual_clock.now().replace(minute=58, second=10))
    tok, prod = await owner_and_product(client)
    hub = app.state.runtime.hub
    rnd = random.Random(20)
    sessions = []
    for did, (_fw, _os, groups) in FLEET.items():
        await add_device(app, did, prod["id"])
        r = await client.put(f"/v1/products/{prod['slug']}/devices/{did}",
                             headers=bearer(tok), json={"groups": groups})
        assert r.status_code == 200, r.text
    for did, (fw, os_version, _groups) in FLEET.items():
        sessions.append(await hub.open(Hello(did, firmware_version=fw,
                                             system_version=os_version), ScriptedLink()))
    for step in range(3):
        for i, s in enumerate(sessions):
            d = doc(rnd)
            if (i, step) == (1, 1):
                d = {"service": {"device": {"status": "ok"}}}
            if (i, step) == (2, 2):
                del d["device"]["network"]
            await s.vitals(json.dumps(d))
        manual_clock.set(manual_clock.now() + dt.timedelta(minutes=2))
    await app.state.runtime.vitals.drain()
    for s in sessions:
        await s.close("test over")
    return {"token": tok, "product": prod}


async def direct(app: Any, product_id: int, f: dict[str, Any]) -> dict[str, Any]:
    """Count, median and worst of each vital over the stored reports of the devices the
    filter selects (their firmware, Device OS and groups as set up above)."""
    ids = {d for d, (fw, os_version, groups) in FLEET.items()
           if ("device_group" not in f or f["device_group"] in groups)
           and ("device_os_version" not in f or f["device_os_version"] == os_version)
           and ("product_fw" not in f or f["product_fw"] == fw)}
    assert ids
    async with app.state.sessionmaker() as db:
        payloads = (await db.execute(select(DeviceVitals.payload).where(
            DeviceVitals.product_id == product_id, DeviceVitals.device_id.in_(ids))
        )).scalars().all()
    out: dict[str, Any] = {"reports": len(payloads)}
    for key, path in vitals_rollups.VITAL_PATHS.items():
        values = [v for p in payloads if (v := report.number(p, path)) is not None]
        out[key] = {"count": len(values), "median": statistics.median(values),
                    "worst": min(values) if key == "rssi" else max(values)}
    return out


def close_enough(key: str, got: float, want: float) -> bool:
    """Within the bins' resolution (corral.fleet.vitals_rollups): 0.5 dBm; 1 % of v + 1."""
    if key == "rssi":
        return abs(got - want) <= 0.5
    return abs(got - want) <= 0.01 * (want + 1)


def check(h: dict[str, Any], want: dict[str, Any]) -> None:
    v = h["vitals"]
    assert v["reports"] == want["reports"]
    for key in vitals_rollups.VITAL_PATHS:
        assert v[key]["count"] == want[key]["count"]
        assert v[key]["worst"] == want[key]["worst"]  # exact
        assert close_enough(key, v[key]["median"], want[key]["median"]), (key, v, want)


WINDOWS = {"the last hour": {"start_date": "-60", "end_date": "+2"},
           "two days, hourly": {"start_date": "-2878", "end_date": "+2"},
           "30 days, daily": {"start_date": "-43200", "end_date": "+2"}}


def window(name: str) -> dict[str, str]:
    now = clock.now()
    return {k: clock.iso(now + dt.timedelta(minutes=int(v))) for k, v in WINDOWS[name].items()}


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: "&".join(
    f"{k}={v}" for k, v in f.items()) or "unfiltered")
@pytest.mark.parametrize("span", list(WINDOWS))
async def test_median_and_worst_equal_a_direct_computation(app, client, fleet, f, span):
    tok, prod = fleet["token"], fleet["product"]
    want = await direct(app, prod["id"], f)
    r = await client.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok),
                         params={**f, **window(span)})
    assert r.status_code == 200, r.text
    check(r.json(), want)


async def test_the_same_after_a_restart_and_a_replay(app, client, fleet, settings):
    tok, prod = fleet["token"], fleet["product"]
    want = await direct(app, prod["id"], {})
    assert want["reports"] == 12 and want["rssi"]["count"] == 10
    # a replayed report (the same event stored again) is not counted twice
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(DeviceVitals))).scalars().all()
    replay = [StoredEvent(id=v.event_id, published_at=clock.aware(v.at),
                                 name=vitals.EVENT, data=json.dumps(v.payload), ttl=60,
                                 source="device", device_id=v.device_id,
                                 product_id=v.product_id, org_id=None, owner_user_id=None,
                                 customer_id=None, private=True) for v in rows]
    async with app.state.sessionmaker() as db:
        assert await vitals.store(db, replay) == 0
        await db.commit()
    async with restarted(app, settings) as c2:
        for span in WINDOWS:
            r = await c2.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok),
                             params=window(span))
            assert r.status_code == 200, r.text
            check(r.json(), want)


def test_median_of_bins() -> None:
    values = [-71.0, -70.0, -70.0, -55.0, -90.0]
    bins = {}
    for v in values:
        b = vitals_rollups.bin_of("rssi", v)
        n, lo, hi = bins.get(b, (0, v, v))
        bins[b] = (n + 1, min(lo, v), max(hi, v))
    assert vitals_rollups.median_of((b, *x) for b, x in bins.items()) == -70.0
    assert vitals_rollups.median_of([]) is None
    assert vitals_rollups.median_of([(5, 2, 10.0, 11.0)]) == 10.5  # two in one bin
    rnd = random.Random(1)
    big = [rnd.uniform(0, 1e6) for _ in range(501)]
    bins = {}
    for v in big:
        b = vitals_rollups.bin_of("memory_used", v)
        n, lo, hi = bins.get(b, (0, v, v))
        bins[b] = (n + 1, min(lo, v), max(hi, v))
    got = vitals_rollups.median_of((b, *x) for b, x in bins.items())
    assert got is not None and math.isclose(got, statistics.median(big), rel_tol=0.01)


async def test_non_finite_values_are_refused_and_retention_drops_the_rollups(
        app, client, fleet, settings, manual_clock):
    """NaN, Infinity and numbers beyond a float's range are not JSON a PostgreSQL column
    takes: such a report is refused (``invalid``) and nothing is counted."""
    tok, prod = fleet["token"], fleet["product"]
    session = await app.state.runtime.hub.open(Hello(next(iter(FLEET))), ScriptedLink())
    for bad in ('{"device": {"network": {"signal": {"rssi": -Infinity}}}}',
                '{"device": {"cloud": {"coap": {"round_trip": NaN}}}}',
                '{"device": {"system": {"memory": {"used": 1e999}}}}'):
        with pytest.raises(Refused) as err:
            await session.vitals(bad)
        assert err.value.code == "invalid"
        with pytest.raises(vitals.BadVitals):
            vitals.parse(bad)
    await app.state.runtime.vitals.drain()
    await session.close("test over")
    r = await client.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok),
                         params=window("the last hour"))
    assert r.json()["vitals"]["reports"] == 12
    manual_clock.set(manual_clock.now() + dt.timedelta(
        days=settings.fleet_hour_retention_days + 1))
    deleted = await fleet_retention(app.state.sessionmaker, settings)
    assert deleted["fleet_vitals_hours"] > 0 and deleted["fleet_vitals_days"] > 0
    async with app.state.sessionmaker() as db:
        for table in (FleetVitalsHour, FleetVitalsDay):
            assert (await db.execute(select(table))).first() is None


async def test_the_console_page_shows_the_rollups_vitals(app, client, fleet):
    """Every report of the range, not a sample: the API says so, and the console's Fleet
    health page shows the vitals table (it answered 500 once the rollups held a report:
    the template asked for ``sampled``, which only a dynamic group's answer had)."""
    tok, prod = fleet["token"], fleet["product"]
    r = await client.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok),
                         params=window("two days, hourly"))
    assert r.status_code == 200, r.text
    assert r.json()["vitals"]["sampled"] is False and r.json()["vitals"]["reports"] == 12
    console = await console_session(app, "ada@example.com")  # the fixture's owner, signed in
    page = await client.get(f"/console/products/{prod['slug']}/fleet?range=day",
                            headers={"Cookie": f"corral_session={console}"})
    assert page.status_code == 200, page.text
    assert "Vitals over 12 reports" in page.text
    assert "From all 12 reports in the range" in page.text
