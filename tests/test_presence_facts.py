"""Presence and billing facts: online, last_heard, first_online_at (set once)."""

from __future__ import annotations

import datetime as dt

from corral.devices import service
from corral.devices.models import Device
from corral.kit import clock
from helpers import bearer, load, owner_and_product, seed

ID = "0123456789abcdef01234567"


async def test_first_online_is_set_once(app, client, manual_clock):
    tok, p = await owner_and_product(client)
    await seed(app, {"id": ID, "product_id": p["id"]})
    first = manual_clock.now()
    async with app.state.sessionmaker() as db:
        assert await service.mark_online(db, ID.upper(), at=clock.now(), ip="203.0.113.7")
        await db.commit()
    d = await load(app, ID)
    assert d.online and d.first_online_at == first and d.last_heard == first
    assert d.last_handshake_at == first and d.last_ip_address == "203.0.113.7"

    manual_clock.advance(hours=5)
    async with app.state.sessionmaker() as db:
        assert await service.mark_offline(db, ID, at=clock.now())
        await db.commit()
    d = await load(app, ID)
    assert not d.online and d.last_heard == first + dt.timedelta(hours=5)

    manual_clock.advance(days=40)
    later = clock.now()
    async with app.state.sessionmaker() as db:
        await service.mark_online(db, ID, at=later)
        await db.commit()
    d = await load(app, ID)
    assert d.first_online_at == first  # never moves after the first time
    assert d.last_handshake_at == later and d.online
    assert d.last_ip_address == "203.0.113.7"  # no ip given: the last one stays

    r = await client.get(f"/v1/products/{p['slug']}/devices/{ID}", headers=bearer(tok))
    body = r.json()
    assert body["first_online_at"] == clock.iso(first) and body["online"] is True
    assert body["last_heard"] == clock.iso(later)
    r = await client.get(f"/v1/products/{p['slug']}/devices", headers=bearer(tok),
                         params={"online": "true"})
    assert [x["id"] for x in r.json()["devices"]] == [ID]


async def test_mark_online_updates_a_loaded_device(app, client, manual_clock):
    """The session's copy of the row is refreshed, not left stale."""
    tok, p = await owner_and_product(client)
    await seed(app, {"id": ID, "product_id": p["id"]})
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, ID)
        assert d.first_online_at is None
        await service.mark_online(db, ID, at=clock.now())
        assert d.online is True and d.first_online_at == manual_clock.now()
        await db.commit()


async def test_touch_and_unknown_devices(app, client, manual_clock):
    tok, p = await owner_and_product(client)
    ids = [f"{i:024x}" for i in range(1, 6001)]
    await seed(app, *[{"id": i, "product_id": p["id"]} for i in ids])
    async with app.state.sessionmaker() as db:
        await service.touch(db, [*ids, "f" * 24], at=clock.now())
        assert not await service.mark_online(db, "f" * 24, at=clock.now())
        assert not await service.mark_offline(db, "f" * 24, at=clock.now())
        await db.commit()
    for i in (ids[0], ids[-1]):
        d = await load(app, i)
        assert d.last_heard == manual_clock.now() and d.first_online_at is None
        assert not d.online
    assert await load(app, "f" * 24) is None


async def test_presence_changes_lock_device_rows_in_id_order(app, client):
    """A writer batch whose changes arrive as B, A must not deadlock with a transaction that
    holds A and then wants B (the order touch_each takes rows in). On SQLite the database
    lock serializes them anyway; on PostgreSQL this is the row-lock order."""
    import asyncio

    from sqlalchemy import update

    from corral.devices import presence

    _tok, prod = await owner_and_product(client)
    a, b = "0000000000000000000000aa", "0000000000000000000000bb"
    await seed(app, {"id": a, "product_id": prod["id"], "platform_id": 12},
               {"id": b, "product_id": prod["id"], "platform_id": 12})
    if app.state.runtime.engine.dialect.name != "postgresql":
        return  # one writer at a time: nothing to interleave
    now = clock.now()
    async with app.state.sessionmaker() as other:
        await other.execute(update(Device).where(Device.id == a).values(notes="held"))
        batch_done = asyncio.Event()

        async def batch() -> None:
            async with app.state.sessionmaker() as db:
                await presence.apply(db, [presence.Online(b, now), presence.Online(a, now)])
                await db.commit()
            batch_done.set()

        task = asyncio.create_task(batch())
        await asyncio.sleep(0.3)  # the batch now waits for A (and must not hold B)
        assert not batch_done.is_set()
        await asyncio.wait_for(other.execute(
            update(Device).where(Device.id == b).values(notes="held too")), 5)
        await other.commit()
        await asyncio.wait_for(task, 10)
    da, db_ = await load(app, a), await load(app, b)
    assert da is not None and db_ is not None
    assert da.online and db_.online and db_.notes == "held too"


async def test_a_describe_without_functions_keeps_the_stored_ones(app, client):
    """Device OS sends ``particle/device/updates/enabled`` at every connect: that describe
    carries no functions or variables (None), which must keep what the device described
    before, not store a JSON ``null`` over it (the device page then showed none)."""
    from corral.devices import presence

    tok, prod = await owner_and_product(client)
    await seed(app, {"id": ID, "product_id": prod["id"], "platform_id": 12})
    async with app.state.sessionmaker() as db:
        await presence.apply(db, [presence.Described(ID, functions=["echo"],
                                                     variables={"counter": "int32"})])
        await db.commit()
    async with app.state.sessionmaker() as db:
        await presence.apply(db, [presence.Described(ID, updates_enabled=False),
                                  presence.Described(ID, firmware_version=3)])
        await db.commit()
    d = await load(app, ID)
    assert d is not None
    assert d.functions == ["echo"] and d.variables == {"counter": "int32"}
    assert d.firmware_updates_enabled is False and d.firmware_version == 3
    r = await client.get(f"/v1/products/{prod['slug']}/devices/{ID}", headers=bearer(tok))
    assert r.json()["functions"] == ["echo"] and r.json()["variables"] == {"counter": "int32"}
