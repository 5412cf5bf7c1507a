"""The event group-commit writer: ack only after commit, batching, failures, drain, backpressure."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.events.models import Event
from corral.events.writer import EventWriter, NewEvent, StoredEvent, WriterStopped

WAIT = 30  # seconds: a bound on every wait, never expected to be reached


def ev(i: int = 0, **kw) -> NewEvent:
    return NewEvent(name=kw.pop("name", f"temp/{i}"), data=str(i), device_id="a" * 24,
                    product_id=1, **kw)


@pytest.fixture
async def sm(app):
    return app.state.sessionmaker


@pytest.fixture
async def writer(sm):
    w = EventWriter(sm)
    w.start()
    yield w
    await w.stop()


async def count(sm) -> int:
    async with sm() as db:
        return (await db.execute(select(func.count()).select_from(Event))).scalar_one()


async def test_write_returns_only_after_commit(sm, writer, manual_clock):
    seen: list[bool] = []

    async def one(i: int) -> None:
        event_id = await asyncio.wait_for(writer.write(ev(i)), WAIT)
        async with sm() as db:  # another session: the row must already be committed
            row = (await db.execute(select(Event).where(Event.id == event_id))).scalar_one_or_none()
        seen.append(row is not None and row.data == str(i))

    await asyncio.gather(*(one(i) for i in range(50)))
    assert seen == [True] * 50
    async with sm() as db:
        row = (await db.execute(select(Event).limit(1))).scalar_one()
    assert row.published_at == manual_clock.now()


async def test_future_not_resolved_before_commit(sm, monkeypatch):
    gate = asyncio.Event()
    real_commit = AsyncSession.commit

    async def held_commit(self):
        await gate.wait()
        return await real_commit(self)

    monkeypatch.setattr(AsyncSession, "commit", held_commit)
    w = EventWriter(sm)
    w.start()
    try:
        fut = w.write_nowait(ev(1))
        await asyncio.sleep(0.05)
        assert not fut.done()  # inserted but not committed: no ack yet
        gate.set()
        assert isinstance(await asyncio.wait_for(fut, WAIT), int)
    finally:
        gate.set()
        await w.stop()


async def test_ten_thousand_concurrent_writes_distinct_ids_and_batched(sm, writer):
    rows = [ev(i) for i in range(10_000)]
    ids = await asyncio.wait_for(asyncio.gather(*(writer.write(r) for r in rows)), WAIT)
    assert len(set(ids)) == 10_000
    async with sm() as db:
        stored = {i: d for i, d in (await db.execute(select(Event.id, Event.data))).all()}
    assert {i: stored[i] for i in ids} == {i: r.data for i, r in zip(ids, rows, strict=True)}
    assert writer.rows_committed == 10_000
    assert 5 <= writer.batches_committed <= 200  # far fewer transactions than rows
    assert writer.batches_failed == 0


async def test_failing_batch_fails_only_its_futures(sm, writer, monkeypatch):
    real = EventWriter._insert
    calls = {"n": 0}

    async def flaky(self, db, rows):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk on fire")
        return await real(self, db, rows)

    monkeypatch.setattr(EventWriter, "_insert", flaky)
    first = [writer.write_nowait(ev(i)) for i in range(10)]
    results = await asyncio.wait_for(asyncio.gather(*first, return_exceptions=True), WAIT)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await count(sm) == 0  # nothing acknowledged, nothing stored
    later = await asyncio.wait_for(asyncio.gather(*(writer.write(ev(i)) for i in range(5))), WAIT)
    assert len(set(later)) == 5
    assert await count(sm) == 5
    assert writer.batches_failed == 1 and writer.running


async def test_stop_drains_queue(sm):
    w = EventWriter(sm, max_delay=10)  # the worker would wait a long time for more rows
    w.start()
    futs = [w.write_nowait(ev(i)) for i in range(1234)]
    await asyncio.wait_for(w.stop(), WAIT)
    assert all(f.done() and not f.exception() for f in futs)
    assert await count(sm) == 1234
    with pytest.raises(WriterStopped):
        w.write_nowait(ev(0))


async def test_backpressure(sm):
    w = EventWriter(sm, max_pending=3, max_batch=2)
    # not started: nothing drains, so the queue fills
    futs = [w.write_nowait(ev(i)) for i in range(3)]
    with pytest.raises(asyncio.QueueFull):
        w.write_nowait(ev(3))
    blocked = asyncio.ensure_future(w.write(ev(4)))
    await asyncio.sleep(0.05)
    assert not blocked.done() and w.pending == 3  # waiting for room
    w.start()
    assert isinstance(await asyncio.wait_for(blocked, WAIT), int)
    await asyncio.wait_for(asyncio.gather(*futs), WAIT)
    await w.stop()
    assert await count(sm) == 4


async def test_after_commit_hook_gets_stored_events(sm, writer, manual_clock):
    got: list[list[StoredEvent]] = []
    writer.after_commit.append(lambda evs: got.append(evs))
    writer.after_commit.insert(0, lambda evs: 1 / 0)  # a failing hook is logged, not fatal
    event_id = await asyncio.wait_for(writer.write(ev(7, name="door")), WAIT)
    assert [e for batch in got for e in batch] == [StoredEvent(
        id=event_id, published_at=manual_clock.now(), name="door", data="7", ttl=60,
        source="device", device_id="a" * 24, product_id=1, org_id=None, owner_user_id=None,
        customer_id=None, private=True,
    )]


async def test_a_waited_for_count_commits_without_the_delay(sm):
    """A call's usage (``count(now=True)``) does not wait ``max_delay`` for more rows: it
    commits at once, with what was already queued, and is counted exactly once."""
    from corral.metering.ledger import Usage
    from corral.metering.models import UsageDelta

    w = EventWriter(sm, max_delay=10)  # a plain row would wait 10 s for company
    w.start()
    try:
        queued = w.write_nowait(ev(1))
        await asyncio.wait_for(w.count(Usage("a" * 24, "function", product_id=1), now=True), 5)
        assert queued.done() and queued.result() > 0  # it went in the same batch
        assert w.batches_committed == 1
        later = w.write_nowait(ev(2))  # the hurry is over: the next row waits again
        await asyncio.sleep(0.2)
        assert not later.done()
    finally:
        await asyncio.wait_for(w.stop(), WAIT)
    assert later.done() and await count(sm) == 2
    async with sm() as db:
        calls = (await db.execute(select(func.sum(UsageDelta.function_calls)))).scalar_one()
    assert calls == 1


async def test_a_usage_batch_commits_in_its_insert_s_trip(sm, monkeypatch):
    """SQLite: a batch whose last statement is its usage rows sends the COMMIT with them (a
    call's count alone: one job on the database thread, no session, was two jobs); the count
    is committed (another session sees it) when ``count`` returns, once; a batch with a
    presence change after the usage still commits on its own."""
    import aiosqlite

    from corral.devices import presence
    from corral.metering.ledger import Usage
    from corral.metering.models import UsageDelta

    async with sm() as db:
        if (await db.connection()).dialect.name != "sqlite":
            return  # PostgreSQL sends the batch as before (its own test: the call's requests)
    jobs: list[str] = []
    queue_job = aiosqlite.Connection._execute

    async def counted(self, fn, *args, **kwargs):
        jobs.append(getattr(fn, "__name__", repr(fn)))
        return await queue_job(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    w = EventWriter(sm)
    w.start()
    try:
        await asyncio.wait_for(w.count(Usage("a" * 24, "function", product_id=1), now=True),
                               WAIT)
        assert jobs == ["_run_and_commit"]
        async with sm() as db:
            calls = (await db.execute(select(func.sum(UsageDelta.function_calls)))).scalar_one()
        assert calls == 1
        jobs.clear()  # an event with its usage: the usage's trip carries the COMMIT
        await asyncio.wait_for(w.write(ev(1), Usage("a" * 24, "publish", product_id=1)), WAIT)
        assert jobs[-1] == "_run_and_commit" and "commit" not in jobs
        assert await count(sm) == 1
        jobs.clear()
        change = presence.Described("a" * 24, functions=["led"])
        await asyncio.wait_for(w.write(None, Usage("a" * 24, "variable", product_id=1),
                                       change=change), WAIT)
        assert jobs[-1] == "commit" and "_run_and_commit" not in jobs
    finally:
        await asyncio.wait_for(w.stop(), WAIT)


async def test_only_a_batch_with_an_outbox_row_wakes_the_integrations(app, monkeypatch):
    """A call's usage count or a presence event adds no integration outbox row, so its
    commit does not wake the integrations worker (which would query the outbox for nothing);
    a device event that may trigger an integration does."""
    from corral.metering.ledger import Usage

    rt = app.state.runtime
    woken: list[int] = []
    monkeypatch.setattr(rt.integrations, "wake", lambda *_: woken.append(1))
    await asyncio.wait_for(rt.writer.count(Usage("a" * 24, "function", product_id=1),
                                           now=True), WAIT)
    await asyncio.wait_for(rt.writer.write(ev(name="spark/status")), WAIT)
    assert woken == []
    await asyncio.wait_for(rt.writer.write(ev(name="temp")), WAIT)
    assert woken == [1]
