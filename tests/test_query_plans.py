"""The partial indexes of online devices are used by the queries meant to use them.

SQLite uses a partial index only when the query states the index's WHERE term exactly; an
index declared ``WHERE online`` was never used by ``online = 1`` / ``online IS 1``, so the
console's "online now" count scanned every device of the product (bench B15: 266 ms at a
million devices). Checked on both databases from the planner's own words, on a product of
2,000 devices with 1 % online (PostgreSQL weighs statistics: on an empty table every index
costs the same).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, text

from corral.console import counts
from corral.db.engine import refresh_statistics
from corral.devices.models import Device
from corral.devices.service import DeviceQuery, _filters
from devicekit import eventually
from helpers import owner_and_product


async def _product_of_2000(app: Any, client: httpx.AsyncClient) -> int:
    _token, product = await owner_and_product(client)
    pid = int(product["id"])
    rows = [{"id": f"{i:024x}", "product_id": pid, "platform_id": 12,
             "online": i % 100 == 0, "node_id": "n1" if i % 100 == 0 else None}
            for i in range(2000)]
    async with app.state.sessionmaker() as db:
        await db.execute(insert(Device), rows)
        await db.commit()
    # the statistics a running server keeps (SQLite: its sampled ANALYZE pass; PostgreSQL:
    # autovacuum's, which a test cannot wait for)
    if not await refresh_statistics(app.state.runtime.engine):
        async with app.state.sessionmaker() as db:
            await db.execute(text("ANALYZE"))
            await db.commit()
    return pid


async def _plan(app: Any, stmt: Any) -> str:
    async with app.state.sessionmaker() as db:
        dialect = db.get_bind().dialect
        sql = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        if dialect.name == "sqlite":
            rows = (await db.execute(text(f"EXPLAIN QUERY PLAN {sql}"))).all()
            return "\n".join(str(r[-1]) for r in rows)
        rows = (await db.execute(text(f"EXPLAIN {sql}"))).all()
        return "\n".join(str(r[0]) for r in rows)


class _Product:
    def __init__(self, pid: int) -> None:
        self.id = pid


@pytest.mark.parametrize("name, stmt", [
    ("console's online count",
     lambda pid: select(Device.id).where(*counts.PRODUCT_FACTS["online"](pid)).limit(10_001)),
    ("device list, online=true",
     lambda pid: select(Device.id).where(*_filters(_Product(pid), DeviceQuery(online=True),
                                                   "any"))),
])
async def test_a_products_online_devices_come_from_the_partial_index(
        app: Any, client: httpx.AsyncClient, name: str, stmt: Any) -> None:
    pid = await _product_of_2000(app, client)
    plan = await _plan(app, stmt(pid))
    assert "ix_devices_product_online" in plan, f"{name}:\n{plan}"


async def test_a_nodes_online_devices_come_from_the_partial_index(
        app: Any, client: httpx.AsyncClient) -> None:
    await _product_of_2000(app, client)
    plan = await _plan(app, select(Device.id).where(Device.node_id == "n1", Device.online))
    assert "ix_devices_node_online" in plan, plan


async def test_a_sqlite_server_keeps_the_planners_statistics(
        settings: Any, database_url: str, app: Any, client: httpx.AsyncClient) -> None:
    """Without statistics SQLite guesses every table's size; the plans above assume them.
    A server on SQLite analyzes (sampled) at start and every `sqlite_analyze_s`."""
    if not database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's autovacuum keeps its statistics")
    from corral.mail.backends import LogBackend
    from corral.web.app import Runtime, create_app

    _token, product = await owner_and_product(client)
    async with app.state.sessionmaker() as db:
        await db.execute(insert(Device), [{"id": f"{i:024x}", "product_id": product["id"],
                                           "platform_id": 12} for i in range(50)])
        await db.commit()
        await db.execute(text("DROP TABLE IF EXISTS sqlite_stat1"))
        await db.commit()
    await app.state.runtime.stop()  # the fixture's runtime runs no background work
    runtime = Runtime(settings, mail_backend=LogBackend())
    await runtime.start(create_app(settings, runtime=runtime), migrate_db=False)
    try:
        async def analyzed() -> bool:
            async with runtime.sessionmaker() as db:
                have = (await db.execute(text(
                    "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"))).scalar()
                if not have:
                    return False
                return bool((await db.execute(text(
                    "SELECT count(*) FROM sqlite_stat1 WHERE tbl = 'devices'"))).scalar())

        await eventually(analyzed, within=15)
    finally:
        await runtime.stop()
