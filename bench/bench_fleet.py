"""B16: fleet health (issue 20) — the fleet-health and metrics requests of a product with
1,000,000 devices and 30 days of rollups (goal: p99 under 200 ms), and what the rollups add
to ingest (goal: under 5 %).

    .venv/bin/python bench/bench_fleet.py health [--devices 1000000] [--days 30] [--requests 200]
        [--database fleet.db]   (keep the seeded fleet there; reused when it exists)
    .venv/bin/python bench/bench_fleet.py parts --database fleet.db [--runs 10]
    .venv/bin/python bench/bench_fleet.py tally [--devices 200] [--batches 500]
    .venv/bin/python bench/bench_fleet.py ingest [--devices 500] [--seconds 5] [--rounds 3] \
        [--database-url postgresql+asyncpg://...]

``health``: a fresh SQLite database migrated by corral, B3's generator for the devices
(bench_inventory.seed), then the rollups a fleet of that size leaves after ``--days`` days
(per minute for the retention, per hour for every day, 20 firmware versions, per-device days
for 1 % of the devices, 5,000 vitals reports, vitals rollups with every histogram bin of
the usual ranges filled every hour and day), inserted directly, with the per-device days
marked out of date as the flushes that write them mark them. Then the fleet-minute
singleton's work runs once (the device counts' sample, every closed day's "most troubled"
lists), as the server would at its start. corral serves it and the routes are timed with
sequential requests over 127.0.0.1 (each answer checked).

``parts``: the summary's parts in-process on a fleet ``health --database`` kept (median
process CPU of ``--runs`` calls each; 30 days and the last day), and the minute sample.

``ingest``: as B10 (bench_metering.py): in-process device sessions on the real hub, event
writer and database, each publishing as fast as its own commit allows; rounds alternate
(off, on, on, off, ...: the tables grow and rounds slow down, and this order spreads that
drift over both) **off** (no fleet hook) and **on** (the FleetTally after-commit hook and its flush every
5 s, as ``corral serve`` runs it). Both rounds have a no-op after-commit hook, standing for
the others ``corral serve`` always has, so the committed events' list is built in both.
Metering is off in both, so the difference is the rollups' own cost. Medians of the rounds.

``tally``: the after-commit work alone, without a database: ``--batches`` batches of one
event per device are turned into committed events (``StoredEvent.of``) and counted by a
FleetTally, then folded as a flush does; process CPU µs per event for each step.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _server import corral_server, percentile, signup_and_login
from bench_inventory import seed
from bench_metering import Link, publish_flat_out, setup
from sqlalchemy import func, literal, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from corral.bus.inprocess import InProcessBus
from corral.db.engine import make_engine, make_sessionmaker
from corral.events.writer import EventWriter, NewEvent, StoredEvent
from corral.fleet.models import ALL_VERSIONS, FleetMinute
from corral.fleet.rollups import COUNTERS, FleetTally
from corral.fleet.vitals_rollups import bin_of
from corral.sessions.core import SessionHub
from corral.sessions.link import Hello, OpenGate
from corral.settings import Settings

USER, PASSWORD = "bench@example.com", "bench-password"
FIRMWARE = range(1, 21)


def sqlite_time(at: dt.datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


def seed_rollups(db_file: Path, product_id: int, devices: int, days: int,
                 minute_days: int) -> dict[str, int]:
    """The rollups ``devices`` devices leave after ``days`` days (see the module doc)."""
    rnd = random.Random(3)
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0, tzinfo=None)
    cols = ["product_id", "bucket", "firmware_version", "online", *COUNTERS]
    marks = ", ".join("?" * len(cols))
    per_fw = max(1, devices // len(FIRMWARE))
    out = {}
    with sqlite3.connect(db_file) as conn:
        for table, step, span in (("fleet_minutes", 60, minute_days * 86_400),
                                  ("fleet_hours", 3600, days * 86_400)):
            rows = []
            for k in range(span // step):
                bucket = sqlite_time(now - dt.timedelta(seconds=k * step))
                for fw in FIRMWARE:
                    online = int(per_fw * rnd.uniform(0.6, 0.9))
                    scale = step // 60
                    rows.append((product_id, bucket, fw, online,  # then COUNTERS' order
                                 online * scale // 30, rnd.randint(0, 20) * scale,
                                 rnd.randint(0, 20) * scale, rnd.randint(0, 50) * scale,
                                 rnd.randint(0, 3) * scale, rnd.randint(0, 2) * scale,
                                 rnd.randint(0, 50) * scale, rnd.randint(0, 3) * scale,
                                 rnd.randint(0, 2) * scale, rnd.randint(0, 1) * scale,
                                 rnd.randint(0, 1) * scale, online * scale // 30))
            conn.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", rows)
            out[table] = len(rows)
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM devices WHERE product_id = ? LIMIT ?",
            (product_id, max(1, devices // 100)))]
        day0 = now.replace(hour=0, minute=0)
        rows = [(d, sqlite_time(day0 - dt.timedelta(days=k)), product_id,
                 rnd.randint(0, 9), rnd.randint(0, 5)) for d in ids for k in range(days)]
        conn.executemany("INSERT INTO fleet_device_days (device_id, day, product_id, "
                         "disconnects, errors) VALUES (?, ?, ?, ?, ?)", rows)
        out["fleet_device_days"] = len(rows)
        # as the flushes that wrote those rows leave them: every day's lists out of date
        conn.executemany("INSERT INTO fleet_troubled_days (product_id, day, version, "
                         "computed_version, rest_disconnects, rest_errors) "
                         "VALUES (?, ?, 1, 0, 0, 0)",
                         sorted({(product_id, r[1]) for r in rows}))
        payload = ('{"device":{"network":{"signal":{"rssi":%d}},"cloud":{"coap":'
                   '{"round_trip":%d}},"system":{"memory":{"used":%d,"total":160000}}}}')
        rows = [(rnd.choice(ids), product_id, -1 - i, sqlite_time(
            now - dt.timedelta(seconds=rnd.randint(0, days * 86_400))),
            payload % (-rnd.randint(40, 110), rnd.randint(30, 900),
                       rnd.randint(20_000, 150_000))) for i in range(5000)]
        conn.executemany("INSERT INTO device_vitals (device_id, product_id, event_id, at, "
                         "payload) VALUES (?, ?, ?, ?, ?)", rows)
        out["device_vitals"] = len(rows)
        # the vitals rollups of such a fleet reporting hourly: every bin of the three
        # vitals' usual ranges holds values every hour, for each version and for all
        bins = {"rssi": sorted({bin_of("rssi", v) for v in range(-110, -39)}),
                "round_trip": sorted({bin_of("round_trip", v) for v in range(30, 901)}),
                "memory_used": sorted({bin_of("memory_used", v)
                                       for v in range(20_000, 150_001, 50)})}
        for table, step, n in (("fleet_vitals_hours", dt.timedelta(hours=1), days * 24),
                               ("fleet_vitals_days", dt.timedelta(days=1), days)):
            rows = []
            top = now.replace(minute=0, hour=0 if step.days else now.hour)
            for k in range(n):
                bucket = sqlite_time(top - k * step)
                for fw in (ALL_VERSIONS, *FIRMWARE):
                    reports = per_fw * len(FIRMWARE) if fw == ALL_VERSIONS else per_fw
                    rows.append((product_id, "", bucket, fw, "reports", 0, reports, 0, 0))
                    for vital, vbins in bins.items():
                        rows += [(product_id, "", bucket, fw, vital, b, rnd.randint(1, 40),
                                  float(b), float(b)) for b in vbins]
            conn.executemany(f"INSERT INTO {table} (product_id, segment, bucket, "
                             "firmware_version, vital, bin, count, low, high) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            out[table] = len(rows)
    return out


async def minute_work(url: str) -> None:
    """What the fleet-minute singleton of ``corral serve`` does before the requests are
    timed (it also runs at the server's start): the sample of the devices online and of
    the device counts, and the closed days' "most troubled" lists (all of them)."""
    from corral.fleet import tops
    from corral.fleet.rollups import sample_online
    from corral.kit import clock

    engine = make_engine(url)
    sm = make_sessionmaker(engine)
    t0 = time.process_time()
    async with sm() as db:
        await sample_online(db)
        await db.commit()
        sampled = time.process_time() - t0
        made = 0
        while n := await tops.make_lists(db, now=clock.now()):
            made += n
    await engine.dispose()
    print(f"minute singleton: sample {sampled * 1e3:.0f} ms CPU; {made} day lists made in "
          f"{(time.process_time() - t0 - sampled) * 1e3:.0f} ms CPU")


def health(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db_file = a.database or Path(tmp) / "corral.db"
        url = f"sqlite+aiosqlite:///{db_file}"
        reuse = db_file.exists()
        with corral_server(Path(tmp), database_url=url) as base:  # (migrates a kept fleet)
            token = signup_and_login(base, USER, PASSWORD)
            auth = {"Authorization": f"Bearer {token}"}
            if reuse:
                r = httpx.get(f"{base}/v1/user/products", headers=auth, timeout=30)
            else:
                r = httpx.post(f"{base}/v1/user/products", json={"product": {"name": "Fleet"}},
                               headers=auth, timeout=30)
            r.raise_for_status()
            product = r.json()["products"][0] if reuse else r.json()["product"]
        if reuse:  # its rollups end when it was seeded: keep runs within a day of that
            print(f"reusing the fleet in {db_file}")
        else:
            t = time.perf_counter()
            asyncio.run(seed(url, product["slug"], a.devices))
            made = seed_rollups(db_file, product["id"], a.devices, a.days,
                                Settings().fleet_minute_retention_days)
            print(f"seeded {a.devices:,} devices and {made} in {time.perf_counter() - t:.1f} s")
        asyncio.run(minute_work(url))
        now = dt.datetime.now(dt.UTC)
        month = {"start_date": (now - dt.timedelta(days=a.days)).isoformat(),
                 "end_date": now.isoformat()}
        routes = [
            ("fleet health, 30 days", "fleet/health", month, "firmware"),
            ("fleet health, last day", "fleet/health", {}, "firmware"),
            ("metrics/events, 30 d by hour", "metrics/events", {**month, "bucket_size": 3600},
             "events"),
            ("metrics/online, 1 d by minute", "metrics/online", {"bucket_size": 60}, "online"),
            ("metrics/functions, 30 d by day", "metrics/functions",
             {**month, "bucket_size": 86_400}, "functions"),
        ]
        with corral_server(Path(tmp), database_url=url) as base, \
                httpx.Client(base_url=base, timeout=60,
                             headers={"Authorization": f"Bearer {token}"}) as c:
            # the server's start runs the fleet-minute singleton (the sample: ~1.7 s of CPU
            # at 1M on SQLite) and the other singletons' first passes: time the steady state
            # (the sample's next runs, once a minute, stay in the timed requests)
            started = dt.datetime.now(dt.UTC).isoformat()
            for _ in range(240):
                as_of = c.get(f"/v1/products/{product['id']}/fleet/health").json()[
                    "devices"]["as_of"]
                if as_of is None or as_of.replace("Z", "+00:00") >= started:
                    break
                time.sleep(0.5)
            time.sleep(2)
            print(f"\n{'request':34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
            for label, path, params, key in routes:
                lat = []
                for _ in range(a.requests):
                    t0 = time.perf_counter()
                    r = c.get(f"/v1/products/{product['id']}/{path}", params=params)
                    lat.append(time.perf_counter() - t0)
                    assert r.status_code == 200 and key in r.json(), r.text[:300]
                print(f"{label:34} {percentile(lat, 50) * 1e3:8.1f} "
                      f"{percentile(lat, 99) * 1e3:8.1f} {max(lat) * 1e3:8.1f}")
            h = c.get(f"/v1/products/{product['id']}/fleet/health", params=month).json()
            print(f"\n(the answer: {h['devices']}, {len(h['firmware'])} firmware versions, "
                  f"{h['events']['received']:,} events, {h['vitals']['reports']} vitals)")


async def parts(db_file: Path, runs: int, days: int) -> None:
    """The fleet-health summary's parts, in-process on a seeded fleet (``health
    --database``): median process CPU ms of ``runs`` calls each, for 30 days and the last
    day; then the minute singleton's work (the sample, the day lists)."""
    from corral.firmware.updates import outcomes_by_release
    from corral.fleet import health as fleet_health
    from corral.fleet import metrics, tops
    from corral.fleet.rollups import sample_online
    from corral.kit import clock
    from corral.products.models import Product

    sm = make_sessionmaker(make_engine(f"sqlite+aiosqlite:///{db_file}"))
    async with sm() as db:
        pid = (await db.execute(select(func.min(Product.id)))).scalar_one()
        group_id = await _tenth_group(db, pid)
    now = clock.now()
    windows = {f"{days} d": metrics.Window(now - dt.timedelta(days=days), now, 3600),
               "1 d": metrics.Window(now - dt.timedelta(days=1), now, 900),
               # filtered by firmware version (1/20 of the fleet): the exact per-device pass
               f"{days} d fw 1": metrics.Window(now - dt.timedelta(days=days), now, 3600,
                                                 firmware=1),
               # filtered by a static group of a tenth of the fleet (no segment rollups are
               # seeded for it: its totals are empty; its device counts and troubled lists
               # are the parts that read per device)
               f"{days} d group": metrics.Window(now - dt.timedelta(days=days), now, 3600,
                                                  group_id=group_id)}
    print(f"{'part':28} " + " ".join(f"{k + ' CPU ms':>16}" for k in windows))
    steps: dict[str, Any] = {
        "device counts": lambda db, w: metrics.device_counts(db, pid, w),
        "totals": lambda db, w: metrics.totals(db, pid, w),
        "troubled": lambda db, w: metrics.troubled_devices(db, pid, w),
        "vitals": lambda db, w: metrics.vitals_aggregates(db, pid, w),
        "disconnect reasons": lambda db, w: metrics.disconnect_reasons(db, pid, w),
        "updates": lambda db, w: outcomes_by_release(db, pid, since=w.start,
                                                     devices=metrics.devices_of(pid, w)),
        "the whole summary": lambda db, w: fleet_health.product_health(db, pid, w),
    }
    async with sm() as db:
        for label, step in steps.items():
            cells = []
            for w in windows.values():
                cpu = []
                for _ in range(runs):
                    t0 = time.process_time()
                    await step(db, w)
                    cpu.append(time.process_time() - t0)
                cells.append(f"{statistics.median(cpu) * 1e3:16.1f}")
            print(f"{label:28} " + " ".join(cells))
        t0 = time.process_time()
        await sample_online(db)
        await db.commit()
        print(f"\nthe minute sample (online and device counts): "
              f"{(time.process_time() - t0) * 1e3:.1f} ms CPU")
        t0 = time.process_time()
        made = await tops.make_lists(db, now=now)
        print(f"day lists made: {made} in {(time.process_time() - t0) * 1e3:.1f} ms CPU")


async def _tenth_group(db: Any, product_id: int) -> int:
    """The product's static group ``tenth`` (every tenth device by ID), made once."""
    from corral.devices.models import Device, DeviceGroup, DeviceGroupMember
    from corral.kit import clock

    gid = (await db.execute(select(DeviceGroup.id).where(
        DeviceGroup.product_id == product_id, DeviceGroup.name == "tenth"))).scalar()
    if gid is not None:
        return int(gid)
    now = clock.now()
    group = DeviceGroup(product_id=product_id, name="tenth", created_at=now, updated_at=now)
    db.add(group)
    await db.flush()
    ranked = select(Device.id, func.row_number().over(order_by=Device.id).label("n")).where(
        Device.product_id == product_id).subquery()
    await db.execute(DeviceGroupMember.__table__.insert().from_select(
        ["group_id", "device_id"],
        select(literal(group.id), ranked.c.id).where(ranked.c.n % 10 == 0)))
    await db.commit()
    return int(group.id)


@dataclasses.dataclass
class Round:
    rate: float  # events/s
    cpu_us: float  # process CPU µs per event
    count: int  # events published
    hook_us: float = 0.0  # the tally hook's own CPU (this thread's) per event it was given
    flush_ms: list[float] = dataclasses.field(default_factory=list)  # wall, per flush


async def ingest_round(sm: Any, settings: Settings, ids: list[str], fleet: bool,
                       seconds: float) -> Round:
    bus = InProcessBus()
    writer = EventWriter(sm)
    writer.start()
    hub = SessionHub(settings, sm, bus, writer, gate=OpenGate(), reset_presence=False)
    # `corral serve` always has after-commit hooks (bus fan-out, locations, vitals), so the
    # writer builds the committed events' list in both rounds: "off" registers a no-op
    writer.after_commit.append(lambda _events: None)
    tally = None
    hook = [0.0, 0]  # thread CPU seconds in the tally hook, events given to it
    flushes: list[float] = []
    if fleet:
        def firmware_of(device_id: str) -> int | None:
            s = hub.sessions.get(device_id)
            return s.firmware_version if s is not None else None

        tally = FleetTally(sm, firmware_of=firmware_of)

        def timed(events: list[StoredEvent]) -> None:
            c = time.thread_time()
            tally(events)
            hook[0] += time.thread_time() - c
            hook[1] += len(events)

        flush = tally.flush

        async def timed_flush() -> None:
            t = time.perf_counter()
            await flush()
            flushes.append((time.perf_counter() - t) * 1e3)

        tally.flush = timed_flush  # type: ignore[method-assign]
        writer.after_commit.append(timed)
        tally.start()
    sessions = [await hub.open(Hello(d, firmware_version=i % 20 + 1), Link())
                for i, d in enumerate(ids)]
    before = await rolled_up(sm, sessions[0].facts.product_id) if fleet else 0
    rate, cpu_us, count = await publish_flat_out(sessions, seconds, metered=False)
    await writer.stop()
    if tally is not None:
        await tally.stop()
        counted = await rolled_up(sm, sessions[0].facts.product_id) - before
        if counted != count:  # the rollups must count every stored publish, once
            raise SystemExit(f"rollups counted {counted} events of {count} published")
    await bus.close()
    return Round(rate, cpu_us, count, hook[0] / max(1, hook[1]) * 1e6, flushes)


async def rolled_up(sm: Any, product_id: int | None) -> int:
    async with sm() as db:
        return int((await db.execute(select(func.coalesce(func.sum(FleetMinute.events), 0))
                                     .where(FleetMinute.product_id == product_id))).scalar_one())


async def ingest_run(url: str, n: int, seconds: float, rounds: int) -> None:
    engine, _org, ids = await setup(url, n)
    sm = make_sessionmaker(engine)
    settings = Settings(database_url=url)
    rounds_of: dict[bool, list[Round]] = {False: [], True: []}
    # off, on, on, off, off, on, ...: the events table grows round by round and each round
    # is slower than the one before it, so a fixed order would charge that drift to "on"
    for i in range(rounds):
        for fleet in ((False, True) if i % 2 == 0 else (True, False)):
            rounds_of[fleet].append(await ingest_round(sm, settings, ids, fleet, seconds))
    await engine.dispose()
    rates = {k: [r.rate for r in v] for k, v in rounds_of.items()}
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    coff = statistics.median(r.cpu_us for r in rounds_of[False])
    con = statistics.median(r.cpu_us for r in rounds_of[True])
    db_name = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{n} devices in-process, {rounds} rounds of {seconds:g} s each, {db_name}, "
          f"load average at the end {load}\n")
    print("| fleet rollups | events/s (median) | CPU µs/event (median) | rounds (events/s) |")
    print("|---|---:|---:|---|")
    for label, key, c in (("off", False, coff), ("on", True, con)):
        print(f"| {label} | {statistics.median(rates[key]):,.0f} | {c:.1f} | "
              f"{', '.join(f'{r:,.0f}' for r in rates[key])} |")
    print(f"\nthroughput overhead {100 * (off - on) / off:.1f} %, CPU per event "
          f"{100 * (con - coff) / coff:+.1f} % (goal: under 5 %)")
    paired = statistics.median(b.cpu_us / a.cpu_us - 1 for a, b in
                               zip(rounds_of[False], rounds_of[True], strict=True))
    print(f"CPU per event, on against the off round beside it: {100 * paired:+.1f} % (median "
          f"of {rounds} pairs)")
    hook_us = statistics.median(r.hook_us for r in rounds_of[True])
    flush_ms = [f for r in rounds_of[True] for f in r.flush_ms]
    events = sum(r.count for r in rounds_of[True])
    print(f"the tally hook itself: {hook_us:.2f} µs of CPU per event (median of the on "
          f"rounds, {100 * hook_us / coff:.1f} % of the off rounds' CPU per event); "
          f"{len(flush_ms)} flushes for {events:,} events, median "
          f"{statistics.median(flush_ms) if flush_ms else 0:.1f} ms wall each")


def tally(devices: int, batches: int) -> None:
    firmware = {f"{i:024x}": i % 20 + 1 for i in range(devices)}
    t = FleetTally(async_sessionmaker(), firmware_of=firmware.get)  # (never flushed)
    start = dt.datetime(2026, 12, 5, 10, tzinfo=dt.UTC)
    rows = [[NewEvent(name="bench", data="x", device_id=d, product_id=1, counted=i % 2 == 0,
                      published_at=start + dt.timedelta(milliseconds=50 * b),
                      firmware_version=fw)
             for i, (d, fw) in enumerate(firmware.items())] for b in range(batches)]
    c0 = time.process_time()
    stored = [[StoredEvent.of(i, r) for i, r in enumerate(batch)] for batch in rows]
    c1 = time.process_time()
    for batch in stored:
        t(batch)
    c2 = time.process_time()
    t._fold()
    c3 = time.process_time()
    n = devices * batches
    counted = sum(row[COUNTERS.index("events")] for row in t.counts.values())
    assert counted == n, (counted, n)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{n:,} events ({devices} devices x {batches} batches), load average {load}")
    print(f"StoredEvent.of {(c1 - c0) / n * 1e6:.2f} µs/event, FleetTally hook "
          f"{(c2 - c1) / n * 1e6:.2f} µs/event, fold {(c3 - c2) / n * 1e6:.3f} µs/event")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    h = sub.add_parser("health")
    h.add_argument("--devices", type=int, default=1_000_000)
    h.add_argument("--days", type=int, default=30)
    h.add_argument("--requests", type=int, default=200)
    h.add_argument("--database", type=Path, default=None,
                   help="a SQLite file to keep the seeded fleet in; reused when it exists")
    pp = sub.add_parser("parts")
    pp.add_argument("--database", type=Path, required=True, help="a fleet seeded by health")
    pp.add_argument("--runs", type=int, default=10)
    pp.add_argument("--days", type=int, default=30)
    t = sub.add_parser("tally")
    t.add_argument("--devices", type=int, default=200)
    t.add_argument("--batches", type=int, default=500)
    i = sub.add_parser("ingest")
    i.add_argument("--devices", type=int, default=500)
    i.add_argument("--seconds", type=float, default=5)
    i.add_argument("--rounds", type=int, default=3)
    i.add_argument("--database-url", default=None)
    a = ap.parse_args()
    if a.what == "health":
        health(a)
    elif a.what == "parts":
        asyncio.run(parts(a.database, a.runs, a.days))
    elif a.what == "tally":
        tally(a.devices, a.batches)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            url = a.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
            asyncio.run(ingest_run(url, a.devices, a.seconds, a.rounds))


if __name__ == "__main__":
    main()
