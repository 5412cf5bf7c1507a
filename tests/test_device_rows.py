"""Coalesced device reads on the connection path (:mod:`corral.sessions.lookup`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import column, event, select, table

from corral.devices.models import Device
from corral.sessions.lookup import DeviceRows
from helpers import add_device, owner_and_product

IDS = [f"00000000000000000000{i:04x}" for i in range(40)]


@pytest.fixture
async def fleet(client: Any, app: Any) -> list[str]:
    _tok, prod = await owner_and_product(client)
    for did in IDS:
        await add_device(app, did, prod["id"])
    return IDS


def engine_of(app: Any) -> Any:
    return app.state.runtime.engine


def count_selects(engine: Any) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM devices" in statement:
            seen.append(statement)

    return seen


async def test_concurrent_gets_share_queries_and_each_gets_its_own_row(app, fleet):
    rows = DeviceRows(engine_of(app), select(Device.id, Device.product_id))
    seen = count_selects(engine_of(app))
    unknown = "ffffffffffffffffffffffff"
    got = await asyncio.gather(*(rows.get(d.upper()) for d in [*fleet, unknown, fleet[0]]))
    assert [r.id for r in got[:-2]] == fleet  # upper-case ids are found, in order
    assert got[-2] is None  # an unknown device
    assert got[-1].id == fleet[0]  # the same device asked twice in one batch
    assert rows.gets == len(fleet) + 2
    # the first get runs alone; everything asked meanwhile shares the next query
    assert rows.queries == len(seen) <= 3


async def test_max_batch_splits_a_large_burst(app, fleet):
    rows = DeviceRows(engine_of(app), select(Device.id), max_batch=7)
    got = await asyncio.gather(*(rows.get(d) for d in fleet))
    assert [r.id for r in got] == fleet
    assert rows.queries >= len(fleet) // 7


async def test_a_read_sees_a_change_committed_before_it_was_asked(app, fleet):
    rows = DeviceRows(engine_of(app), select(Device.id, Device.denied))
    assert (await rows.get(fleet[0])).denied is False
    async with app.state.sessionmaker() as db:
        (await db.get(Device, fleet[0])).denied = True
        await db.commit()
    assert (await rows.get(fleet[0])).denied is True  # nothing is cached


async def test_a_failed_query_fails_its_waiters_and_later_gets_still_work(app, fleet):
    # a query the database rejects: the point is an exception from execute()
    broken = DeviceRows(engine_of(app), select(column("id")).select_from(table("no_such_table")))
    results = await asyncio.gather(*(broken.get(d) for d in fleet[:5]), return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results)
    good = DeviceRows(engine_of(app), select(Device.id))
    assert (await good.get(fleet[1])).id == fleet[1]


async def test_a_cancelled_waiter_does_not_disturb_the_others(app, fleet):
    rows = DeviceRows(engine_of(app), select(Device.id))
    first = asyncio.ensure_future(rows.get(fleet[0]))
    doomed = asyncio.ensure_future(rows.get(fleet[1]))
    others = [asyncio.ensure_future(rows.get(d)) for d in fleet[2:6]]
    await asyncio.sleep(0)
    doomed.cancel()
    assert (await first).id == fleet[0]
    assert [(await o).id for o in others] == fleet[2:6]
    assert doomed.cancelled()
