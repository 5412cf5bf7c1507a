"""B16: fleet health (issue 20) — the fleet-health and metrics requests of a product with
1,000,000 devices and 30 days of rollups (goal: p99 under 200 ms), and what the rollups add
to ingest (goal: under 5 %).

    .venv/bin/python bench/bench_fleet.py health [--devices 1000000] [--days 30] [--requests 200]
        [--database fleet.db]   (keep the seeded fleet there; reused when it exists)
    .venv/bin/python bench/bench_fleet.py ingest [--devices 500] [--seconds 5] [--rounds 3] \
        [--database-url postgresql+asyncpg://...]

``health``: a fresh SQLite database migrated by corral, B3's generator for the devices
(bench_inventory.seed), then the rollups a fleet of that size leaves after ``--days`` days
(per minute for the retention, per hour for every day, 20 firmware versions, per-device days
for 1 % of the devices, 5,000 vitals reports), inserted directly. corral serves it and the
routes are timed with sequential requests over 127.0.0.1 (each answer checked).

``ingest``: as B10 (bench_metering.py): in-process device sessions on the real hub, event
writer and database, each publishing as fast as its own commit allows; rounds alternate
**off** (no fleet hook) and **on** (the FleetTally after-commit hook with its firmware
lookup and its flush every 5 s, as ``corral serve`` runs it). Metering is off in both, so
the difference is the rollups' own cost. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
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
from sqlalchemy import func, select

from corral.bus.inprocess import InProcessBus
from corral.db.engine import make_sessionmaker
from corral.events.writer import EventWriter
from corral.fleet.models import FleetMinute
from corral.fleet.rollups import COUNTERS, FleetTally
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
                    rows.append((product_id, bucket, fw, online,
                                 online * scale // 30, rnd.randint(0, 20) * scale,
                                 rnd.randint(0, 20) * scale, rnd.randint(0, 50) * scale,
                                 rnd.randint(0, 3) * scale, rnd.randint(0, 2) * scale,
                                 rnd.randint(0, 50) * scale, rnd.randint(0, 3) * scale,
                                 rnd.randint(0, 2) * scale))
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
        payload = ('{"device":{"network":{"signal":{"rssi":%d}},"cloud":{"coap":'
                   '{"round_trip":%d}},"system":{"memory":{"used":%d,"total":160000}}}}')
        rows = [(rnd.choice(ids), product_id, -1 - i, sqlite_time(
            now - dt.timedelta(seconds=rnd.randint(0, days * 86_400))),
            payload % (-rnd.randint(40, 110), rnd.randint(30, 900),
                       rnd.randint(20_000, 150_000))) for i in range(5000)]
        conn.executemany("INSERT INTO device_vitals (device_id, product_id, event_id, at, "
                         "payload) VALUES (?, ?, ?, ?, ?)", rows)
        out["device_vitals"] = len(rows)
    return out


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


async def ingest_round(sm: Any, settings: Settings, ids: list[str], fleet: bool,
                       seconds: float) -> tuple[float, float, int]:
    bus = InProcessBus()
    writer = EventWriter(sm)
    writer.start()
    hub = SessionHub(settings, sm, bus, writer, gate=OpenGate(), reset_presence=False)
    tally = None
    if fleet:
        def firmware_of(device_id: str) -> int | None:
            s = hub.sessions.get(device_id)
            return s.firmware_version if s is not None else None

        tally = FleetTally(sm, firmware_of=firmware_of)
        writer.after_commit.append(tally)
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
    return rate, cpu_us, count


async def rolled_up(sm: Any, product_id: int | None) -> int:
    async with sm() as db:
        return int((await db.execute(select(func.coalesce(func.sum(FleetMinute.events), 0))
                                     .where(FleetMinute.product_id == product_id))).scalar_one())


async def ingest_run(url: str, n: int, seconds: float, rounds: int) -> None:
    engine, _org, ids = await setup(url, n)
    sm = make_sessionmaker(engine)
    settings = Settings(database_url=url)
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for fleet in (False, True):
            rate, cpu_us, _made = await ingest_round(sm, settings, ids, fleet, seconds)
            rates[fleet].append(rate)
            cpu[fleet].append(cpu_us)
    await engine.dispose()
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    coff, con = statistics.median(cpu[False]), statistics.median(cpu[True])
    db_name = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    print(f"\n{n} devices in-process, {rounds} rounds of {seconds:g} s each, {db_name}\n")
    print("| fleet rollups | events/s (median) | CPU µs/event (median) | rounds (events/s) |")
    print("|---|---:|---:|---|")
    for label, key, c in (("off", False, coff), ("on", True, con)):
        print(f"| {label} | {statistics.median(rates[key]):,.0f} | {c:.1f} | "
              f"{', '.join(f'{r:,.0f}' for r in rates[key])} |")
    print(f"\nthroughput overhead {100 * (off - on) / off:.1f} %, CPU per event "
          f"{100 * (con - coff) / coff:+.1f} % (goal: under 5 %)")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    h = sub.add_parser("health")
    h.add_argument("--devices", type=int, default=1_000_000)
    h.add_argument("--days", type=int, default=30)
    h.add_argument("--requests", type=int, default=200)
    h.add_argument("--database", type=Path, default=None,
                   help="a SQLite file to keep the seeded fleet in; reused when it exists")
    i = sub.add_parser("ingest")
    i.add_argument("--devices", type=int, default=500)
    i.add_argument("--seconds", type=float, default=5)
    i.add_argument("--rounds", type=int, default=3)
    i.add_argument("--database-url", default=None)
    a = ap.parse_args()
    if a.what == "health":
        health(a)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            url = a.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
            asyncio.run(ingest_run(url, a.devices, a.seconds, a.rounds))


if __name__ == "__main__":
    main()
