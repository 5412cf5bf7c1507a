"""Event queries (tenancy, prefix, time range, paging), the Particle JSON shape, retention."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from corral.events.service import delete_older_than, event_json, query_events
from corral.events.writer import EventWriter, NewEvent

DEV_A, DEV_B = "a" * 24, "b" * 24


@pytest.fixture
async def sm(app):
    return app.state.sessionmaker


async def store(sm, rows: list[NewEvent]) -> list[int]:
    w = EventWriter(sm)
    w.start()
    try:
        return list(await asyncio.wait_for(asyncio.gather(*(w.write(r) for r in rows)), 30))
    finally:
        await w.stop()


async def names(sm, **kw) -> list[str]:
    async with sm() as db:
        return [e.name for e in await query_events(db, **kw)]


async def test_filters_and_order(sm, manual_clock):
    rows = []
    for name, dev, prod, org, owner in [
        ("t1", DEV_A, 1, None, None), ("t2", DEV_B, 1, 9, None),
        ("t3", DEV_B, 2, 9, None), ("t4", None, None, None, 5),
    ]:
        rows.append(NewEvent(name=name, device_id=dev, product_id=prod, org_id=org,
                             owner_user_id=owner))
        manual_clock.advance(1)
    await store(sm, rows)
    assert await names(sm, product_id=1) == ["t2", "t1"]  # newest first
    assert await names(sm, device_id=DEV_B) == ["t3", "t2"]
    assert await names(sm, org_id=9) == ["t3", "t2"]
    assert await names(sm, owner_user_id=5) == ["t4"]
    assert await names(sm, product_id=1, device_id=DEV_B) == ["t2"]
    assert await names(sm, product_id=3) == []
    async with sm() as db:
        with pytest.raises(ValueError):
            await query_events(db, name_prefix="t")


async def test_name_prefix_is_literal_and_case_sensitive(sm, manual_clock):
    await store(sm, [NewEvent(name=n, product_id=1) for n in
                     ["a_b", "axb", "a%c", "abc", "A_b", "a_bc", "a\\x"]])
    assert sorted(await names(sm, product_id=1, name_prefix="a_")) == ["a_b", "a_bc"]
    assert await names(sm, product_id=1, name_prefix="a%") == ["a%c"]
    assert await names(sm, product_id=1, name_prefix="A") == ["A_b"]
    assert await names(sm, product_id=1, name_prefix="a\\") == ["a\\x"]
    assert len(await names(sm, product_id=1, name_prefix="a")) == 6


async def test_time_range_and_paging(sm, manual_clock):
    t0 = manual_clock.now()
    rows = []
    for i in range(10):
        rows.append(NewEvent(name=f"e{i}", product_id=1))
        manual_clock.advance(60)
    await store(sm, rows)
    since, until = t0 + dt.timedelta(minutes=2), t0 + dt.timedelta(minutes=5)
    assert await names(sm, product_id=1, since=since, until=until) == ["e4", "e3", "e2"]
    async with sm() as db:
        page1 = await query_events(db, product_id=1, limit=4)
        page2 = await query_events(db, product_id=1, limit=4, before_id=page1[-1].id)
        page3 = await query_events(db, product_id=1, limit=4, before_id=page2[-1].id)
    assert [e.name for e in page1 + page2 + page3] == [f"e{i}" for i in range(9, -1, -1)]
    assert page1[0].published_at == t0 + dt.timedelta(minutes=9)


async def test_event_json(sm, manual_clock):
    manual_clock.set(dt.datetime(2015, 7, 18, 0, 12, 18, 174000, tzinfo=dt.UTC))
    await store(sm, [NewEvent(name="temperature", data="25.34", device_id=DEV_A, product_id=1),
                     NewEvent(name="note", data=None, source="cloud", product_id=1)])
    async with sm() as db:
        note, temp = await query_events(db, product_id=1)
    assert event_json(temp) == {"data": "25.34", "ttl": 60,
                                "published_at": "2015-07-18T00:12:18.174Z",
                                "coreid": DEV_A, "name": "temperature"}
    assert event_json(note)["coreid"] == "api" and event_json(note)["data"] is None


async def test_retention_deletes_only_old_rows(sm, manual_clock):
    t0 = manual_clock.now()
    old = [NewEvent(name="old", product_id=1, published_at=t0) for _ in range(25)]
    new = [NewEvent(name="new", product_id=1,
                    published_at=t0 + dt.timedelta(days=31)) for _ in range(5)]
    await store(sm, old + new)
    async with sm() as db:
        deleted = await delete_older_than(db, t0 + dt.timedelta(days=30), batch=7)
    assert deleted == 25
    assert await names(sm, product_id=1) == ["new"] * 5
    async with sm() as db:
        assert await delete_older_than(db, t0 + dt.timedelta(days=30)) == 0
