"""B3: product device listing at scale — p50/p99 of one page with 1,000,000 devices.

    .venv/bin/python bench/bench_inventory.py [--devices 1000000] [--requests 200]
        [--database fleet.db | --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/corral_bench_inv]
        [--keep] [--shapes 'groups=beta;quarantined=true']

(PostgreSQL: an empty database, e.g. ``dropdb --if-exists corral_bench_inv; createdb
corral_bench_inv``; the default is a fresh SQLite file. ``--database FILE`` keeps the SQLite
fleet there and reuses it when the file exists (as bench_console.py, whose fleet it shares);
``--keep`` reuses the fleet a PostgreSQL database already holds instead of seeding again.)

Seeds a product with N devices straight into a fresh SQLite database (migrated by corral's own
Alembic migrations; bulk core inserts, ~10 % of devices in a group, varied names, firmware
versions and last_heard), starts corral on it, and times `GET /v1/products/{p}/devices`
for the query shapes the console and the CLI use. Each shape: `--requests` sequential
requests (bounded), random page in the first 400 pages.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _server import (
    corral_server,
    fleet_database,
    insert_rows,
    new_fleet,
    percentile,
    seeding,
    signup_and_login,
)
from sqlalchemy import insert, select

from corral.db.engine import make_engine
from corral.devices.models import Device, DeviceGroup, DeviceGroupMember
from corral.products.models import Product

USER, PASSWORD = "bench@example.com", "bench-password"  # signup_and_login's defaults
SHAPES = [
    ("default (lastConnection desc)", {}),
    ("sortAttr=deviceId asc", {"sortAttr": "deviceId", "sortDir": "asc"}),
    ("sortAttr=firmwareVersion desc", {"sortAttr": "firmwareVersion", "sortDir": "desc"}),
    ("deviceId prefix", {"deviceId": "{prefix}"}),
    ("deviceName partial", {"deviceName": "sensor-12"}),
    ("deviceName partial, rare", {"deviceName": "or-12345"}),
    ("serialNumber partial", {"serialNumber": "0004242"}),
    ("groups=beta", {"groups": "beta"}),
    ("quarantined=true", {"quarantined": "true"}),
    ("online=true", {"online": "true"}),
    ("firmwareVersion=7", {"firmwareVersion": "7"}),
]


async def seed(url: str, slug: str, n: int) -> None:
    engine = make_engine(url)
    rnd = random.Random(7)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    async with engine.begin() as conn:
        await seeding(conn)
        pid = (await conn.execute(select(Product.id).where(Product.slug == slug))).scalar_one()
        gid = (await conn.execute(insert(DeviceGroup).values(
            product_id=pid, name="beta", created_at=now, updated_at=now).returning(DeviceGroup.id))
        ).scalar_one()
        batch: list[dict] = []
        members: list[dict] = []
        for i in range(n):
            did = f"{rnd.getrandbits(96):024x}"
            batch.append({"id": did, "product_id": pid, "name": f"sensor-{i}", "platform_id": 12,
                          "online": i % 50 == 0,
                          "firmware_version": rnd.randint(1, 20), "quarantined": i % 1000 == 0,
                          "last_heard": now - dt.timedelta(seconds=rnd.randint(0, 10**7)),
                          "created_at": now, "updated_at": now, "tags": [],
                          "serial_number": f"SN{i:09d}"})
            if i % 10 == 0:
                members.append({"device_id": did, "group_id": gid})
            if len(batch) == 20_000:
                await insert_rows(conn, Device, batch)
                batch.clear()
        if batch:
            await insert_rows(conn, Device, batch)
        for k in range(0, len(members), 20_000):
            await conn.execute(insert(DeviceGroupMember), members[k:k + 20_000])
    await settle(engine)
    await engine.dispose()


async def settle(engine: Any) -> None:
    """Statistics for the planner, and on PostgreSQL the visibility map too (``VACUUM``, as
    autovacuum does for a fleet that has been there a while): without it an index-only scan
    of a freshly seeded table still reads every row it passes (a deep page of 10,000 rows)."""
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("VACUUM ANALYZE")
        else:
            await conn.exec_driver_sql("ANALYZE")
            await conn.commit()


def seeded_product(tmp: Path, url: str, devices: int, keep: bool) -> str:
    """The slug of the product to list: an existing fleet's when ``keep`` finds one in the
    database, else a new product seeded with ``devices`` devices."""
    if keep:
        async def existing() -> str | None:
            engine = make_engine(url)
            try:
                async with engine.connect() as conn:
                    return (await conn.execute(select(Product.slug).order_by(Product.id)
                                               .limit(1))).scalar()
            finally:
                await engine.dispose()

        with corral_server(tmp, database_url=url):
            pass  # the start migrates it
        slug = asyncio.run(existing())
        if slug is not None:
            print(f"reusing the fleet of product {slug}")
            return slug
    return new_fleet(tmp, url, devices, seed, user=USER, password=PASSWORD)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--database", type=Path, default=None,
                    help="a SQLite file to keep the seeded fleet in (reused when it exists)")
    ap.add_argument("--keep", action="store_true",
                    help="reuse the fleet already in --database-url instead of seeding")
    ap.add_argument("--shapes", default="", help="';'-separated labels (default: all)")
    args = ap.parse_args()
    wanted = [s for s in args.shapes.split(";") if s]
    shapes = [(label, p) for label, p in SHAPES if not wanted or label in wanted]
    with tempfile.TemporaryDirectory() as tmp:
        if args.database is not None:
            url = f"sqlite+aiosqlite:///{args.database}"
            slug = fleet_database(Path(tmp), args.database, args.devices, seed,
                                  user=USER, password=PASSWORD)
        else:
            url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'corral.db'}"
            slug = seeded_product(Path(tmp), url, args.devices, args.keep)
        with corral_server(Path(tmp), database_url=url) as base:
            token = signup_and_login(base)
            rnd = random.Random(1)
            print(f"{'query':34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
            with httpx.Client(base_url=base, timeout=60,
                              headers={"Authorization": f"Bearer {token}"}) as c:
                for label, params in shapes:
                    lat = []
                    for _ in range(args.requests):
                        q = {k: (f"{rnd.getrandbits(12):03x}" if v == "{prefix}" else v)
                             for k, v in params.items()}
                        q.update({"page": str(rnd.randint(1, 400)), "per_page": "25"})
                        t = time.perf_counter()
                        r = c.get(f"/v1/products/{slug}/devices", params=q)
                        lat.append(time.perf_counter() - t)
                        r.raise_for_status()
                    print(f"{label:34} {percentile(lat, 50) * 1e3:8.1f} "
                          f"{percentile(lat, 99) * 1e3:8.1f} {max(lat) * 1e3:8.1f}")


if __name__ == "__main__":
    main()
