"""The usage ledger on both databases: writer batches append deltas, the fold adds them to
the counters exactly once (new and existing rows, only the counters a batch uses, tenancy
moves, rollbacks, concurrent writers and folds on PostgreSQL), and readers see counters plus
unfolded deltas."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from sqlalchemy import func, select, text

from corral.metering import ledger, usage
from corral.metering.ledger import Usage
from corral.metering.models import UsageCounter, UsageDelta

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


async def fold(app: Any) -> int:
    async with app.state.sessionmaker() as db:
        n = await ledger.fold_pending(db)
        await db.commit()
    return n


async def deltas(app: Any) -> int:
    """Pending rows: deltas, and publish batches on PostgreSQL."""
    async with app.state.sessionmaker() as db:
        n = int((await db.execute(select(func.count()).select_from(UsageDelta))).scalar_one())
        if is_pg(app):
            n += int((await db.execute(text(
                "SELECT count(*) FROM usage_publish_batches"))).scalar_one())
        return n


async def write_one_batch(app: Any, events: list[Any]) -> None:
    """``events`` (``NewEvent``) through a fresh event writer, committed as ONE batch."""
    from corral.events.writer import EventWriter

    writer = EventWriter(app.state.sessionmaker, max_delay=0.05)
    writer.start()
    try:
        await asyncio.gather(*[writer.write_nowait(e) for e in events])
    finally:
        await writer.stop()
    assert writer.batches_committed == 1


async def publish(app: Any, items: list[Usage]) -> None:
    """``items`` (publishes) as counted events through the event writer, in one batch: on
    PostgreSQL one ``usage_publish_batches`` row, on SQLite one delta per event."""
    from corral.events.writer import NewEvent

    assert all(u.kind == "publish" for u in items)
    await write_one_batch(app, [NewEvent(
        name="t", data="x" * u.payload_bytes, device_id=u.device_id, product_id=u.product_id,
        org_id=u.org_id, owner_user_id=u.owner_user_id, published_at=u.at, counted=True)
        for u in items])


async def stage(app: Any, via: str, items: list[Usage]) -> None:
    if via == "ledger":
        await apply(app, items)
    else:
        await publish(app, items)


async def rows(app: Any) -> dict[tuple[str, dt.date], UsageCounter]:
    """The counter rows after a fold."""
    await fold(app)
    assert await deltas(app) == 0
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


@pytest.mark.parametrize("order", [(8, 9, 7), (9, 7, 8)])
async def test_one_fold_of_many_batches_takes_the_latest_batchs_tenancy(app, order):
    """Deltas of several batches folded at once: the counter row gets the tenancy of the
    batch committed last, whatever the product ids' order."""
    for product in order:
        await apply(app, [pub(A, product=product), pub(B, product=5)])
    got = await rows(app)
    a = got[(A, dt.date(2026, 1, 1))]
    assert (a.product_id, a.events_published) == (order[-1], 3)
    assert got[(B, dt.date(2026, 1, 1))].product_id == 5


async def test_tenancy_changed_behind_the_ledger_is_corrected_by_the_next_fold(app):
    """The counter row's tenancy changes behind this process's back (an operator, another
    node's older code): the next fold writes the tenancy of the device's latest delta."""
    await apply(app, [pub(A, product=7, org=3)])
    await fold(app)
    async with app.state.sessionmaker() as db:
        await db.execute(text("UPDATE usage_counters SET product_id = 99, org_id = 98"))
        await db.commit()
    await apply(app, [pub(A, product=7, org=3)])
    a = (await rows(app))[(A, dt.date(2026, 1, 1))]
    assert (a.product_id, a.org_id, a.events_published) == (7, 3, 2)


@pytest.mark.parametrize("odd", ["", "dev,ice"])
async def test_any_device_id_is_carried(app, odd):
    """An empty id (a location without a device) or one with a comma."""
    for _ in range(2):
        await apply(app, [pub(odd, 10), pub(A, 20), pub(odd, 1, at=FEB)])
    got = await rows(app)
    assert got[(odd, dt.date(2026, 1, 1))].events_published == 2
    assert got[(odd, dt.date(2026, 1, 1))].payload_bytes == 20
    assert got[(odd, dt.date(2026, 2, 1))].events_published == 2
    assert got[(A, dt.date(2026, 1, 1))].payload_bytes == 40


async def test_a_rolled_back_batch_counts_nothing(app):
    """Also when the ledger's write is the transaction's first statement (a usage-only
    batch: on PostgreSQL the COPY must not commit on its own)."""
    await apply(app, [pub(A)])
    async with app.state.sessionmaker() as db:
        await ledger.apply(db, [pub(A), pub(B), pub(A, product=8)])
        await db.rollback()
    assert await deltas(app) == 1
    got = await rows(app)
    assert set(got) == {(A, dt.date(2026, 1, 1))}
    assert got[(A, dt.date(2026, 1, 1))].events_published == 1
    assert got[(A, dt.date(2026, 1, 1))].product_id == 7
    await apply(app, [pub(A, product=8)])
    got = await rows(app)
    assert (got[(A, dt.date(2026, 1, 1))].product_id,
            got[(A, dt.date(2026, 1, 1))].events_published) == (8, 2)


async def test_a_rolled_back_copy_counts_nothing_after_the_sessions_reads(app):
    """More rows than one INSERT takes: on PostgreSQL the COPY on the bare connection, after
    reads that began no transaction (corral.db.pg_driver), must still roll back with it."""
    many = [pub(f"0123456789abcdef0000d{i:03x}") for i in range(ledger.PG_INSERT_MAX + 2)]
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(func.count()).select_from(UsageDelta))
                ).scalar_one() == 0
        assert await ledger.apply(db, many) == len(many)
        await db.rollback()
    assert await deltas(app) == 0
    assert await apply(app, many) == len(many)
    assert await deltas(app) == len(many)


async def test_a_rolled_back_fold_keeps_the_deltas(app):
    await apply(app, [pub(A, 10)])
    async with app.state.sessionmaker() as db:
        assert await ledger.fold_pending(db) == 1
        await db.rollback()
    assert await deltas(app) == 1
    assert (await rows(app))[(A, dt.date(2026, 1, 1))].payload_bytes == 10


async def test_readers_add_the_unfolded_deltas(app):
    """usage.* sums counters and deltas: the same answer before a fold, after it and in
    between; a device that moved shows its unfolded deltas where they were made."""
    scope = usage.Scope(3)
    jan, feb = dt.date(2026, 1, 1), dt.date(2026, 2, 1)

    async def read() -> tuple[dict[str, int], dict[Any, dict[str, int]], list[Any]]:
        async with app.state.sessionmaker() as db:
            return (await usage.totals(db, scope, jan, feb),
                    await usage.by_product(db, scope, jan, feb),
                    await usage.by_device(db, scope, jan, feb))

    await apply(app, [pub(A, 10), pub(B, 20)])
    await fold(app)
    await apply(app, [pub(A, 30), Usage(A, "function", product_id=7, org_id=3, at=JAN)])
    before = await read()
    assert before[0]["data_operations"] == 4 and before[0]["payload_bytes"] == 60
    assert [(d["device_id"], d["data_operations"]) for d in before[2]] == [(A, 3), (B, 1)]
    await fold(app)
    assert await read() == before
    async with app.state.sessionmaker() as db:
        monthly = await usage.monthly_by_org(db, jan, {})
    assert monthly[3][jan]["data_operations"] == 4
    await apply(app, [pub(A, 5, product=8)])  # A moved to product 8 (same organization)
    totals, products, _ = await read()
    assert totals["data_operations"] == 5
    assert {p: r["data_operations"] for p, r in products.items()} == {7: 4, 8: 1}
    await fold(app)
    totals, products, _ = await read()
    assert totals["data_operations"] == 5
    assert {p: r["data_operations"] for p, r in products.items()} == {8: 4, 7: 1}


async def test_writers_never_wait_for_each_other_and_a_fold_takes_only_committed_deltas(app):
    """PostgreSQL, several nodes: two open writer transactions on the same devices append
    without waiting for each other; a fold meanwhile sees neither; after both commit every
    delta is added exactly once."""
    if not is_pg(app):
        pytest.skip("SQLite has one writer at a time")
    await apply(app, [pub(A, 1), pub(B, 1)])
    await fold(app)
    first, second = app.state.sessionmaker(), app.state.sessionmaker()
    try:
        await ledger.apply(first, [pub(A, 10), pub(B, 10)])
        async with asyncio.timeout(5):  # would block if appends locked anything shared
            await ledger.apply(second, [pub(A, 100), pub(B, 100, product=8), pub(C, 100)])
            assert await fold(app) == 0
        await first.commit()
        await second.commit()
    finally:
        await first.close()
        await second.close()
    got = await rows(app)
    for device, n, size in ((A, 3, 111), (B, 3, 111), (C, 1, 100)):
        r = got[(device, dt.date(2026, 1, 1))]
        assert (r.events_published, r.payload_bytes) == (n, size), device
    assert got[(B, dt.date(2026, 1, 1))].product_id == 8


@pytest.mark.parametrize("via", ["ledger", "writer"])
async def test_two_folds_at_once_add_each_delta_once(app, via):
    """PostgreSQL: a second node's fold while one is in progress finds the fold lock taken
    and leaves the pending usage (deltas or publish batches) to it; nothing is added
    twice."""
    if not is_pg(app):
        pytest.skip("SQLite folds under its single write lock")
    await stage(app, via, [pub(A, 10), pub(B, 10)])
    first = app.state.sessionmaker()
    try:
        assert await ledger.fold_pending(first) == 2
        await stage(app, via, [pub(A, 5)])
        async with asyncio.timeout(5):
            assert await fold(app) == 0  # skipped, not blocked
        await first.commit()
    finally:
        await first.close()
    got = await rows(app)
    assert got[(A, dt.date(2026, 1, 1))].payload_bytes == 15
    assert got[(B, dt.date(2026, 1, 1))].payload_bytes == 10


@pytest.mark.parametrize("via", ["ledger", "writer"])
async def test_a_fold_that_lost_a_race_with_another_fails_and_adds_nothing(app, via):
    """PostgreSQL: a fold whose snapshot was taken before another node's fold committed
    (it got the lock just after) would see deltas (or publish batches) that fold deleted;
    REPEATABLE READ makes it fail with a serialization error instead of adding them a
    second time."""
    if not is_pg(app):
        pytest.skip("SQLite folds under its single write lock")
    await stage(app, via, [pub(A, 10), pub(B, 10)])
    late = app.state.sessionmaker()
    try:
        conn = await late.connection(execution_options=ledger.FOLD_ISOLATION)
        await conn.exec_driver_sql("SELECT 1")  # its snapshot is taken here
        assert await fold(app) == 2  # the other node's fold commits
        with pytest.raises(Exception) as failed:
            await ledger.fold_pending(late)
        assert ledger.is_fold_conflict(failed.value)
        await late.rollback()
    finally:
        await late.close()
    got = await rows(app)
    assert got[(A, dt.date(2026, 1, 1))].payload_bytes == 10
    assert got[(B, dt.date(2026, 1, 1))].payload_bytes == 10


async def test_a_fold_refuses_a_transaction_at_a_weaker_isolation(app):
    if not is_pg(app):
        pytest.skip("PostgreSQL's isolation levels")
    await apply(app, [pub(A, 10)])
    async with app.state.sessionmaker() as db:
        await db.execute(text("SELECT 1"))  # began at READ COMMITTED
        with pytest.raises(RuntimeError, match="REPEATABLE READ"):
            await ledger.fold_pending(db)
    assert await deltas(app) == 1


async def test_writer_batch_is_one_transaction_on_postgresql(app):
    """The events' ids, their COPY, the batch's usage and the commit are one transaction: a
    batch whose usage cannot be stored (an id beyond PostgreSQL's integer) leaves no event
    behind."""
    if not is_pg(app):
        pytest.skip("the failure needs PostgreSQL's integer range")
    from corral.events.models import Event
    from corral.events.writer import EventWriter, NewEvent

    writer = EventWriter(app.state.sessionmaker, max_delay=0)
    writer.start()
    try:
        with pytest.raises(Exception, match=r"out of range|int32|integer"):
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


def _event(device: str, data: str | None, *, at: dt.datetime = JAN, counted: bool = True,
           product: int | None = 7) -> Any:
    from corral.events.writer import NewEvent

    return NewEvent(name="t", data=data, device_id=device, product_id=product, org_id=3,
                    published_at=at, counted=counted)


@pytest.mark.parametrize(("mixed", "b"), [(False, B), (True, B), (False, "dev,ice")])
async def test_counted_events_are_metered_from_their_rows_as_fold_counts_them(app, mixed, b):
    """The database's count of a batch's counted publishes (``apply_events``) equals
    :func:`ledger.fold` of the same publishes as ``Usage`` items: per-KB operations from the
    UTF-8 size (multi-byte text, 0/1024/1025 bytes, no data), the month of each event's
    time (either side of a month boundary), the latest tenancy. ``mixed``: uncounted rows between the
    counted ones (their ids are not one range). ``b``: a device id PostgreSQL's text encoding
    cannot carry (arrays instead)."""
    # device A (odd i) in January: product 7, then 8 (i=5), then 7 again (moved back)
    datas = [None, "", "x" * 1024, "x" * 1025, "é" * 600, "🙂" * 300, '{"t":21.5}', "last"]
    events = []
    for i, d in enumerate(datas):
        events.append(_event(A if i % 2 else b, d, at=FEB if i == 3 else JAN,
                             product=8 if i == 5 else 7))
        if mixed:
            events.append(_event(A, "not counted", counted=False))
    expected = ledger.fold([
        Usage(e.device_id, "publish", product_id=e.product_id, org_id=3, at=e.published_at,
              payload_bytes=len(e.data.encode()) if e.data else 0)
        for e in events if e.counted])
    await write_one_batch(app, events)
    got = await rows(app)
    assert set(got) == {(r["device_id"], r["period"]) for r in expected}
    for r in expected:
        row = got[(r["device_id"], r["period"])]
        for c in ("events_published", "data_operations", "data_operations_kb",
                  "payload_bytes", "product_id", "org_id", "owner_user_id"):
            assert getattr(row, c) == r[c], (r["device_id"], r["period"], c)


async def test_publish_batches_and_deltas_are_read_and_folded_in_the_order_written(app):
    """Publishes through the writer (PostgreSQL: one batch row each, unrolled by the view
    ``usage_pending``) and other usage as deltas, interleaved: readers see all of it before
    the fold, the fold adds each increment once, and the tenancy written last wins whichever
    kind it came with."""
    scope = usage.Scope(3)
    jan, feb = dt.date(2026, 1, 1), dt.date(2026, 2, 1)

    async def read() -> tuple[dict[str, int], dict[Any, int]]:
        async with app.state.sessionmaker() as db:
            products = await usage.by_product(db, scope, jan, feb)
            return (await usage.totals(db, scope, jan, feb),
                    {p: r["data_operations"] for p, r in products.items()})

    await publish(app, [pub(A, 1), pub(B, 2000), pub(A, 3, product=8), pub(A, 5)])
    await apply(app, [Usage(A, "function", product_id=8, org_id=3, at=JAN)])
    await publish(app, [pub(A, 1025, product=9), pub(A, 0, at=FEB)])
    if is_pg(app):
        async with app.state.sessionmaker() as db:
            assert (await db.execute(text(
                "SELECT count(*) FROM usage_publish_batches"))).scalar_one() == 2
        assert await deltas(app) == 3
    else:
        assert await deltas(app) == 7
    totals, products = await read()
    assert (totals["events_published"], totals["function_calls"], totals["data_operations"],
            totals["data_operations_kb"], totals["payload_bytes"]) == (5, 1, 6, 8, 3034)
    assert products == {7: 3, 8: 2, 9: 1}
    got = await rows(app)
    a = got[(A, jan)]
    assert (a.product_id, a.events_published, a.function_calls, a.data_operations_kb,
            a.payload_bytes) == (9, 4, 1, 1 + 1 + 1 + 1 + 2, 1034)
    assert got[(A, feb)].events_published == 1 and got[(B, jan)].data_operations_kb == 2
    assert await read() == (totals, {9: 5, 7: 1})
    # a delta after the batches: its tenancy is the latest now
    await publish(app, [pub(A, 1, product=7)])
    await apply(app, [Usage(A, "variable", product_id=8, org_id=3, at=JAN)])
    assert (await rows(app))[(A, jan)].product_id == 8


def test_a_batch_fits_the_order_key():
    from corral.events.writer import EventWriter

    with pytest.raises(ValueError, match="max_batch"):
        EventWriter(None, max_batch=ledger.BATCH_LIMIT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fewer than"):
        ledger.pg_publish_batch([None] * ledger.BATCH_LIMIT, first_param=1)
