"""Where a device-list page's time goes, in-process, on a kept SQLite fleet (B15, B17).

    .venv/bin/python bench/bench_list_pages.py --database fleet.db [--shapes tag,fw7]
        [--pages 1,10,19] [--per-page 25] [--no-count | --console] [--statements 3]
    .venv/bin/python bench/bench_list_pages.py --database-url postgresql+asyncpg://...

Opens the fleet that ``bench_console.py --database`` or ``bench_dyngroups.py --database``
kept (its first product) and calls the device list's service directly (no HTTP, no
middleware) for each shape and page, timing each call's wall and process CPU (SQLite runs in
the driver's thread of this process, so the CPU is the whole page's; on PostgreSQL it is
the client's side only) and every statement it
sends. Prints, per shape, the medians over the pages and the slowest statements of the last
call. CPU time holds up on a busy machine where wall time does not.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, select

from corral.console.counts import CAP
from corral.db.engine import make_engine, make_sessionmaker
from corral.devices import service
from corral.devices.models import DeviceGroup
from corral.products.models import Product

# the console's list shapes (bench_console.py) and the dynamic groups of bench_dyngroups.py
SHAPES: dict[str, dict[str, Any]] = {
    "default": {},
    "sort-name": {"sort_attr": "deviceName", "sort_dir": "asc"},
    "search-id": {"search": "a1f"},
    "search-name": {"search": "sensor-12"},
    "name-substring": {"device_name": "sor-12"},
    "group-beta": {"groups": ["beta"]},
    "fw7": {"firmware_version": 7},
    "quarantined": {"quarantined": True},
    # and the other shapes of /v1 (bench_inventory.py)
    "sort-id": {"sort_attr": "deviceId", "sort_dir": "asc"},
    "sort-fw": {"sort_attr": "firmwareVersion", "sort_dir": "desc"},
    "id-prefix": {"device_id": "a1f"},
    "name-rare": {"device_name": "or-12345"},
    "serial-substring": {"serial_number": "0004242"},
    "online": {"online": True},
}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--database", type=Path, default=None)
    ap.add_argument("--database-url", default=None,
                    help="instead of --database: e.g. bench_inventory.py's PostgreSQL fleet")
    ap.add_argument("--shapes", default="", help="comma-separated; default: every shape "
                    "above and every dynamic group of the product (as dyn:<name>)")
    ap.add_argument("--pages", default="1,10,19")
    ap.add_argument("--per-page", type=int, default=25)
    ap.add_argument("--no-count", action="store_true", help="no total (as the console)")
    ap.add_argument("--console", action="store_true", help="as the console's list page: no "
                    "total, then the bounded count (console.counts.CAP) the page shows")
    ap.add_argument("--statements", type=int, default=3)
    args = ap.parse_args()
    if (args.database is None) == (args.database_url is None):
        ap.error("give --database or --database-url")
    engine = make_engine(args.database_url or f"sqlite+aiosqlite:///{args.database}")
    sessions = make_sessionmaker(engine)
    log: list[tuple[float, str]] = []
    started: list[float] = []

    def before(*_a: Any) -> None:
        started.append(time.perf_counter())

    def after(_c: Any, _cu: Any, sql: str, *_a: Any) -> None:
        log.append((time.perf_counter() - started.pop(), " ".join(sql.split())))

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    event.listen(engine.sync_engine, "after_cursor_execute", after)
    async with sessions() as db:
        product = (await db.execute(select(Product).order_by(Product.id))).scalars().first()
        assert product is not None, "no product in that database"
        dynamic = list((await db.execute(select(DeviceGroup.name).where(
            DeviceGroup.product_id == product.id, DeviceGroup.query.is_not(None))
            .order_by(DeviceGroup.name))).scalars())
    shapes = {**SHAPES, **{f"dyn:{n}": {"groups": [n]} for n in dynamic}}
    wanted = [s for s in args.shapes.split(",") if s] or list(shapes)
    pages = [int(p) for p in args.pages.split(",")]
    print(f"{'shape':28} {'wall ms':>8} {'cpu ms':>8} {'statements':>10}")
    for name in wanted:
        walls, cpus = [], []
        for page in pages:
            log.clear()
            q = service.DeviceQuery(page=page, per_page=args.per_page,
                                    count=not (args.no_count or args.console), **shapes[name])
            async with sessions() as db:
                w, c = time.perf_counter(), time.process_time()
                listed = await service.list_product_devices(db, product, q)
                if args.console and getattr(listed, "counted", None) is None:  # as the console
                    await service.count_product_devices(db, product, q, cap=CAP)
                walls.append((time.perf_counter() - w) * 1e3)
                cpus.append((time.process_time() - c) * 1e3)
        print(f"{name:28} {median(walls):8.1f} {median(cpus):8.1f} {len(log):10}")
        for seconds, sql in sorted(log, reverse=True)[:args.statements]:
            print(f"    {seconds * 1e3:7.1f} ms  {sql[:140]}")
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
