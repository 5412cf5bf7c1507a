"""B19: dynamic groups at 1,000,000 devices — p50/p99 of evaluating a group (its device count,
`GET /v1/products/{p}/groups/{name}`) and of a page of its members
(`GET /v1/products/{p}/devices?group={name}`) for query shapes from selective to broad
(issue 21: p99 under 200 ms).

    .venv/bin/python bench/bench_dyngroups.py [--devices 1000000] [--requests 100]
        [--database fleet.db]   (keep the seeded fleet there; reused when it exists)

Seeds one product straight into a fresh SQLite database migrated by corral's own migrations
(bulk core inserts): platforms (argon, boron, p2), Device OS versions, firmware 1-20,
~2 % online, last heard spread over ~4 months (1 % never), 0-2 of 20 tags each (kept in
``device_tags`` as corral does), 5 % in the cohort ``early``, 0.1 % quarantined. Then it starts
corral on it, creates one dynamic group per shape through the API, checks each group's count
against a direct SQL count of the same rule, and times sequential, bounded requests over
127.0.0.1 (the loopback round trip included). Pages are random among the first 40.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sqlite3
import tempfile
import time
from pathlib import Path

import httpx
from _server import corral_server, fleet_database, insert_rows, report, seeding, signup_and_login
from sqlalchemy import insert, select, text

from corral.db.engine import make_engine
from corral.devices.cohort_models import Cohort, CohortMember
from corral.devices.models import Device, DeviceTag
from corral.products.models import Product

USER, PASSWORD = "bench@example.com", "bench-password"
TAGS = [f"t{i}" for i in range(20)]
OS = ["6.2.0", "6.1.1", "5.8.0", "4.2.0"]
PLATFORMS = [12, 13, 32]
# (group name, query, the same rule in SQL over devices d for the check)
SHAPES = [
    ("tag", "tag = t3",
     "d.id IN (SELECT device_id FROM device_tags WHERE tag = 't3')"),
    ("argon-new-fw", "platform = argon and firmware >= 18",
     "d.platform_id = 12 AND d.firmware_version >= 18"),
    ("boron-recent", "platform = boron and last_heard < 7d",
     "d.platform_id = 13 AND d.last_heard >= :week"),
    ("cohort-clean", "cohort = early and not quarantined",
     "d.id IN (SELECT device_id FROM cohort_members) AND d.quarantined = 0"),
    ("serial-prefix", 'serial ^= "SN00012"', "d.serial_number LIKE 'SN00012%'"),
    ("stale", "last_heard > 30d or last_heard = null",
     "(d.last_heard < :month OR d.last_heard IS NULL)"),
    ("mixed", 'tag in [t1, t2] or (os ^= "6." and firmware < 5)',
     "(d.id IN (SELECT device_id FROM device_tags WHERE tag IN ('t1', 't2')) OR "
     "(d.system_firmware_version LIKE '6.%' AND d.firmware_version < 5))"),
    ("boron-not-tagged", "platform = boron and not tag = t7",
     "d.platform_id = 13 AND d.id NOT IN (SELECT device_id FROM device_tags WHERE tag = 't7')"),
]


async def seed(url: str, slug: str, n: int) -> None:
    engine = make_engine(url)
    rnd = random.Random(17)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    async with engine.begin() as conn:
        await seeding(conn)
        pid = (await conn.execute(select(Product.id).where(Product.slug == slug))).scalar_one()
        cid = (await conn.execute(insert(Cohort).values(
            product_id=pid, name="early", created_at=now, updated_at=now)
            .returning(Cohort.id))).scalar_one()
        devices: list[dict[str, object]] = []
        tags: list[dict[str, object]] = []
        cohort: list[dict[str, object]] = []

        async def flush() -> None:
            for table, rows in ((Device, devices), (DeviceTag, tags), (CohortMember, cohort)):
                if rows:
                    await insert_rows(conn, table, rows)
                    rows.clear()

        for i in range(n):
            did = f"{rnd.getrandbits(96):024x}"
            mine = rnd.sample(TAGS, rnd.choice((0, 1, 1, 2)))
            devices.append({
                "id": did, "product_id": pid, "name": f"sensor-{i}",
                "platform_id": rnd.choice(PLATFORMS), "online": i % 50 == 0,
                "firmware_version": rnd.randint(1, 20), "quarantined": i % 1000 == 0,
                "system_firmware_version": rnd.choice(OS),
                "last_heard": None if i % 100 == 7 else
                now - dt.timedelta(seconds=rnd.randint(0, 10**7)),
                "created_at": now, "updated_at": now, "tags": mine,
                "serial_number": f"SN{i:09d}"})
            tags += [{"device_id": did, "tag": t} for t in mine]
            if i % 20 == 3:
                cohort.append({"device_id": did, "cohort_id": cid})
            if len(devices) == 20_000:
                await flush()
        await flush()
    async with engine.begin() as conn:
        await conn.execute(text("ANALYZE"))
    await engine.dispose()


def expected_counts(db_file: Path) -> dict[str, int]:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    out = {}
    with sqlite3.connect(db_file) as conn:
        for name, _q, rule in SHAPES:
            out[name] = conn.execute(
                f"SELECT count(*) FROM devices d WHERE {rule}",  # the bench's own constants
                {"week": (now - dt.timedelta(days=7)).isoformat(sep=" "),
                 "month": (now - dt.timedelta(days=30)).isoformat(sep=" ")}).fetchone()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--database", type=Path, default=None,
                    help="a SQLite file to keep the seeded fleet in; when it exists, it is "
                         "reused (migrated by the server's start) instead of seeding again")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db_file = args.database or Path(tmp) / "corral.db"
        url = f"sqlite+aiosqlite:///{db_file}"
        slug = fleet_database(Path(tmp), db_file, args.devices, seed, user=USER,
                              password=PASSWORD, analyze=True)
        rnd = random.Random(1)
        with corral_server(Path(tmp), database_url=url) as base:
            token = signup_and_login(base, USER, PASSWORD)
            with httpx.Client(base_url=base, timeout=120,
                              headers={"Authorization": f"Bearer {token}"}) as c:
                groups = f"/v1/products/{slug}/groups"
                for name, query, _rule in SHAPES:
                    r = c.get(f"{groups}/{name}")
                    if r.status_code == 404:
                        r = c.post(groups, json={"name": name, "query": query})
                    elif r.json()["group"]["query"] != query:
                        r = c.put(f"{groups}/{name}", json={"query": query})
                    assert r.status_code in (200, 201), r.text
                want = expected_counts(db_file)
                print(f"{'request':40} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
                for name, query, _rule in SHAPES:
                    lat, counts = [], set()
                    for _ in range(args.requests):
                        t = time.perf_counter()
                        r = c.get(f"{groups}/{name}")
                        lat.append(time.perf_counter() - t)
                        r.raise_for_status()
                        g = r.json()["group"]
                        counts.add((g["device_count"], g.get("device_count_is_estimate", False)))
                    # a time-relative rule may move by a device or two during the run; a
                    # sampled estimate (a broad query of a large product) within 25 %
                    assert all(abs(n - want[name]) <= (want[name] // 4 if estimate else
                                                      max(2, want[name] // 1000))
                               for n, estimate in counts), (name, counts, want[name])
                    shown = ", ".join(f"{'~' if e else ''}{n}" for n, e in sorted(counts))
                    report(f"count  {name} ({want[name]}; {shown})", lat, 40)
                    lat = []
                    for _ in range(args.requests):
                        q = {"group": name, "per_page": "25", "page": str(rnd.randint(1, 40))}
                        t = time.perf_counter()
                        r = c.get(f"/v1/products/{slug}/devices", params=q)
                        lat.append(time.perf_counter() - t)
                        r.raise_for_status()
                    report(f"page   {name}", lat, 40)
                    print(f"        query: {query}")


if __name__ == "__main__":
    main()
