"""The usage ledger's batch upsert on both databases: new and existing rows in one batch,
only the counters a batch uses, tenancy moves, the text/array encodings of the PostgreSQL
statement, rollbacks, and (PostgreSQL) two writers adding to the same rows at once."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select, text

from corral.metering import ledger
from corral.metering.ledger import Usage
from corral.metering.models import UsageCounter

A = "0123456789abcdef0000cc01"
B = "0123456789abcdef0000cc02"
C = "0123456789abcdef0000cc03"
JAN = dt.datetime(2026, 1, 31, 23, 59, tzinfo=dt.UTC)
FEB = dt.datetime(2026, 2, 1, 0, 1, tzinfo=dt.UTC)


def pub(device: str, size: int = 10, *, at: dt.datetime = JAN, product: int | None = 7,
        org: int | None = 3, owner: int | None = None) -> Usage:
    return Usage(device, "publish", product_id=product, org_id=org, owner_user_id=owner,
                 payload_bytes=size, at=at)


async def apply(app: Any, items: list[Usage]) -> int:
    async with app.state.sessionmaker() as db:
        n = await ledger.apply(db, items)
        await db.commit()
    return n


async def rows(app: Any) -> dict[tuple[str, dt.date], UsageCounter]:
    async with app.state.sessionmaker() as db:
        got = (await db.execute(select(UsageCounter))).scalars().all()
    return {(r.device_id, r.period): r for r in got}


def is_pg(app: Any) -> bool:
    return str(app.state.settings.database_url).startswith("postgresql")


async def test_new_and_existing_rows_in_one_batch_are_exact(app):
    assert await apply(app, [pub(A, 100), pub(A, 1300)]) == 1
    # A exists now, B is new, and A's second month is new too: one batch, three rows
    n = await apply(app, [pub(A, 0), pub(B, 2048), pub(A, 5, at=FEB),
                          Usage(B, "function", product_id=7, org_id=3, at=JAN)])
    assert n == 3
    got = await rows(app)
    a = got[(A, dt.date(2026, 1, 1))]
    assert (a.events_published, a.data_operations, a.data_operations_kb, a.payload_bytes) == (
        3, 3, 1 + 2 + 1, 1400)
    assert (a.function_calls, a.events_delivered, a.cellular_bytes) == (0, 0, 0)
    b = got[(B, dt.date(2026, 1, 1))]
    assert (b.events_published, b.function_calls, b.data_operations, b.data_operations_kb,
            b.payload_bytes) == (1, 1, 2, 3, 2048)
    a2 = got[(A, dt.date(2026, 2, 1))]
    assert (a2.events_published, a2.data_operations, a2.payload_bytes) == (1, 1, 5)
    assert (a.product_id, a.org_id, a.owner_user_id) == (7, 3, None)


async def test_a_batch_of_other_counters_leaves_the_rest_alone(app):
    await apply(app, [pub(A, 10)])
    await apply(app, [Usage(A, "cellular", product_id=7, org_id=3, payload_bytes=5000, at=JAN)])
    await apply(app, [Usage(A, "discarded", product_id=7, org_id=3, payload_bytes=9, at=JAN),
                      Usage(A, "location", product_id=7, org_id=3, at=JAN)])
    a = (await rows(app))[(A, dt.date(2026, 1, 1))]
    assert (a.events_published, a.cellular_bytes, a.events_discarded, a.location_points) == (
        1, 5000, 1, 1)
    assert (a.data_operations, a.data_operations_kb, a.payload_bytes) == (2, 2, 10)


async def test_tenancy_follows_the_device_and_null_tenancy_is_kept(app):
    await apply(app, [pub(A, product=None, org=None, owner=42)])  # one row, NULLs in text
    a = (await rows(app))[(A, dt.date(2026, 1, 1))]
    assert (a.product_id, a.org_id, a.owner_user_id) == (None, None, 42)
    await apply(app, [pub(A, product=8, org=4, owner=None), pub(B)])
    got = await rows(app)
    assert (got[(A, dt.date(2026, 1, 1))].product_id, got[(A, dt.date(2026, 1, 1))].org_id,
            got[(A, dt.date(2026, 1, 1))].owner_user_id) == (8, 4, None)
    assert got[(A, dt.date(2026, 1, 1))].events_published == 2
    # moved back: the latest tenancy of the batch wins
    await apply(app, [pub(A, product=8, org=4), pub(A, product=None, org=None, owner=42)])
    a = (await rows(app))[(A, dt.date(2026, 1, 1))]
    assert (a.product_id, a.org_id, a.owner_user_id, a.events_published) == (None, None, 42, 4)


async def test_tenancy_written_by_another_node_is_corrected(app):
    """The row's tenancy changes behind this process's back (another writer node); the next
    batch still writes this node's tenancy (no per-process cache decides it on PostgreSQL)."""
    await apply(app, [pub(A, product=7, org=3)])
    async with app.state.sessionmaker() as db:
        await db.execute(text("UPDATE usage_counters SET product_id = 99, org_id = 98"))
        await db.commit()
    await apply(app, [pub(A, product=7, org=3)])
    a = (await rows(app))[(A, dt.date(2026, 1, 1))]
    if is_pg(app):
        assert (a.product_id, a.org_id) == (7, 3)
    assert a.events_published == 2


@pytest.mark.parametrize("odd", ["", "dev,ice"])
async def test_device_ids_the_text_encoding_cannot_carry(app, odd):
    """An empty id (a location without a device) or one with a comma goes as arrays."""
    for _ in range(2):
        await apply(app, [pub(odd, 10), pub(A, 20), pub(odd, 1, at=FEB)])
    got = await rows(app)
    assert got[(odd, dt.date(2026, 1, 1))].events_published == 2
    assert got[(odd, dt.date(2026, 1, 1))].payload_bytes == 20
    assert got[(odd, dt.date(2026, 2, 1))].events_published == 2
    assert got[(A, dt.date(2026, 1, 1))].payload_bytes == 40


async def test_a_rolled_back_batch_counts_nothing(app):
    await apply(app, [pub(A)])
    async with app.state.sessionmaker() as db:
        await ledger.apply(db, [pub(A), pub(B), pub(A, product=8)])
        await db.rollback()
    got = await rows(app)
    assert set(got) == {(A, dt.date(2026, 1, 1))}
    assert got[(A, dt.date(2026, 1, 1))].events_published == 1
    assert got[(A, dt.date(2026, 1, 1))].product_id == 7
    await apply(app, [pub(A, product=8)])  # the rolled-back move taught nothing
    got = await rows(app)
    assert (got[(A, dt.date(2026, 1, 1))].product_id,
            got[(A, dt.date(2026, 1, 1))].events_published) == (8, 2)


async def _wait_for_lock_wait(app: Any) -> None:
    async with app.state.sessionmaker() as db:
        for _ in range(500):  # bounded: at most ~5 s
            waiting = (await db.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"))).scalar_one()
            if waiting:
                return
            await db.rollback()
            await asyncio.sleep(0.01)
    raise AssertionError("the second writer never waited for the first")


@pytest.mark.parametrize("existing", [False, True])
async def test_two_writers_on_the_same_rows_add_exactly(app, existing):
    """PostgreSQL, two nodes: the second writer's batch touches rows the first one has
    inserted (or updated) and not committed yet. It waits, then adds to them: nothing lost
    (a row invisible to its UPDATE goes to the INSERT ... ON CONFLICT part), nothing
    doubled."""
    if not is_pg(app):
        pytest.skip("SQLite has one writer at a time")
    if existing:
        await apply(app, [pub(A, 1), pub(B, 1)])
    first = app.state.sessionmaker()
    await ledger.apply(first, [pub(A, 10), pub(B, 10)])

    async def second() -> None:
        async with app.state.sessionmaker() as db:
            await ledger.apply(db, [pub(A, 100), pub(B, 100, product=8), pub(C, 100)])
            await db.commit()

    task = asyncio.create_task(second())
    try:
        await _wait_for_lock_wait(app)
        assert not task.done()
        await first.commit()
    finally:
        await first.close()
    await asyncio.wait_for(task, 10)
    got = await rows(app)
    base = 1 if existing else 0
    for device, n, size in ((A, 2 + base, 110 + base), (B, 2 + base, 110 + base),
                            (C, 1, 100)):
        r = got[(device, dt.date(2026, 1, 1))]
        assert (r.events_published, r.payload_bytes) == (n, size), device
    assert got[(B, dt.date(2026, 1, 1))].product_id == 8


async def test_writer_batch_is_one_transaction_on_postgresql(app):
    """The events' COPY, the usage upsert and the commit are one transaction: a batch whose
    usage cannot be stored (an id beyond PostgreSQL's integer) leaves no event behind."""
    if not is_pg(app):
        pytest.skip("the failure needs PostgreSQL's integer range")
    from corral.events.models import Event
    from corral.events.writer import EventWriter, NewEvent

    writer = EventWriter(app.state.sessionmaker, max_delay=0)
    writer.start()
    try:
        with pytest.raises(Exception, match="out of range"):
            await writer.write(NewEvent(name="h7d/atomic", device_id=A),
                               pub(A, product=2**40))
        assert await writer.write(NewEvent(name="h7d/fine", device_id=A), pub(A)) > 0
    finally:
        await writer.stop()
    async with app.state.sessionmaker() as db:
        names = (await db.execute(select(Event.name).where(Event.device_id == A))).scalars()
        assert list(names) == ["h7d/fine"]
    a = (await rows(app))[(A, dt.date(2026, 1, 1))]
    assert a.events_published == 1


async def test_a_row_deleted_behind_the_writer_is_recreated_exactly(app):
    """SQLite updates rows it knows exist with a plain UPDATE; a row deleted since (an
    operator, a test truncating) is inserted again with the batch's deltas, and rows that
    do exist are not counted twice."""
    await apply(app, [pub(A, 10), pub(B, 10)])
    async with app.state.sessionmaker() as db:
        await db.execute(text("DELETE FROM usage_counters WHERE device_id = :d"), {"d": A})
        await db.commit()
    await apply(app, [pub(A, 5), pub(B, 5), pub(C, 5)])
    got = await rows(app)
    assert {k[0]: (r.events_published, r.payload_bytes, r.product_id)
            for k, r in got.items()} == {A: (1, 5, 7), B: (2, 15, 7), C: (1, 5, 7)}
