"""A large static group's device list is read from the group's own membership index.

Memberships carry copies of their device's sort keys (last heard, firmware version, name),
kept by the database's triggers (migration 0041), so a page of a group holding a large share
of a product is one index range of that group instead of a walk along the product's sort
index probing every device's memberships (bench B3). Every page must be the one the direct
query gives (devices of the product in the group, ORDER BY the sort, id tie-break), for every
sort, also after devices connect and disconnect (last heard), report another firmware, are
renamed, join or leave the group or the product.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, text, update

from corral.devices import presence, service
from corral.devices.models import Device, DeviceGroup, DeviceGroupMember
from corral.devices.service import SORT_ATTRS, DeviceQuery
from corral.products.models import Product
from helpers import bearer, owner_and_product

N = 240
SORTS = [(attr, d) for attr in ("lastConnection", "deviceId", "firmwareVersion", "deviceName")
         for d in ("desc", "asc")]
BASE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _device(i: int, pid: int) -> dict[str, Any]:
    """Keys with ties and gaps: 1 in 9 never heard, 1 in 11 without firmware, 1 in 13
    unnamed; the others share values in small sets (ties broken by id)."""
    return {"id": f"{i:024x}", "product_id": pid, "platform_id": 12,
            "name": None if i % 13 == 0 else f"n-{(i * 7) % 31:02d}",
            "firmware_version": None if i % 11 == 0 else i % 5 + 1,
            "quarantined": i % 5 == 0,
            "last_heard": None if i % 9 == 0 else BASE + dt.timedelta(minutes=(i * 37) % 50)}


async def _fleet(app: Any, client: httpx.AsyncClient) -> tuple[str, int]:
    token, product = await owner_and_product(client)
    pid = int(product["id"])
    async with app.state.sessionmaker() as db:
        db.add_all([Device(**_device(i, pid)) for i in range(N)])
        beta = DeviceGroup(product_id=pid, name="beta")
        alpha = DeviceGroup(product_id=pid, name="alpha")
        db.add_all([beta, alpha])
        await db.flush()
        # added after the devices, as an import or the API does: the copies come from them
        db.add_all([DeviceGroupMember(device_id=f"{i:024x}", group_id=beta.id)
                    for i in range(N) if i % 2 == 0])
        db.add_all([DeviceGroupMember(device_id=f"{i:024x}", group_id=alpha.id)
                    for i in range(N) if i % 3 == 0])
        await db.commit()
    return token, pid


async def _direct(app: Any, pid: int, groups: list[str], attr: str, direction: str,
                  quarantined: bool | None) -> list[str]:
    """Every matching device in list order, by the direct query over the devices."""
    col = SORT_ATTRS[attr]
    member = (select(DeviceGroupMember.device_id)
              .join(DeviceGroup, DeviceGroup.id == DeviceGroupMember.group_id)
              .where(DeviceGroup.product_id == pid, DeviceGroup.name.in_(groups)))
    conds = [Device.product_id == pid, Device.id.in_(member)]
    if quarantined is not None:
        conds.append(Device.quarantined.is_(quarantined))
    if direction == "desc":  # a missing key sorts as the smallest
        order = [col.is_(None), col.desc(), Device.id.desc()]
    else:
        order = [col.is_not(None), col.asc(), Device.id.asc()]
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(Device.id).where(*conds).order_by(*order)))
                    .scalars())


async def _listed(app: Any, pid: int, groups: list[str], attr: str, direction: str,
                  quarantined: bool | None, per_page: int) -> list[str]:
    got: list[str] = []
    for page in range(1, 50):
        async with app.state.sessionmaker() as db:
            product = await db.get(Product, pid)
            assert product is not None
            result = await service.list_product_devices(db, product, DeviceQuery(
                groups=groups, quarantined=quarantined, sort_attr=attr, sort_dir=direction,
                page=page, per_page=per_page, count=page % 2 == 1))
        got += [d.id for d in result.devices]
        if not result.has_more:
            return got
    raise AssertionError("more than 49 pages")


async def _check_every_sort(app: Any, pid: int, used: list[int]) -> None:
    """Every page of beta alone (the membership index), of beta or alpha and of beta's
    quarantined devices (the other plans) equals the direct query's slice."""
    for attr, direction in SORTS:
        for groups, quarantined in ((["beta"], None), (["beta", "alpha"], None),
                                    (["beta"], True)):
            want = await _direct(app, pid, groups, attr, direction, quarantined)
            before = len(used)
            got = await _listed(app, pid, groups, attr, direction, quarantined, per_page=17)
            assert got == want, (attr, direction, groups, quarantined)
            # beta alone is read from its memberships (one slice per page at least)
            assert (len(used) > before) == (groups == ["beta"] and quarantined is None)


@pytest.fixture
def group_slices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A group of more than 20 members counts as large here (FEW_MATCHES); records the
    pages read from a group's membership index."""
    monkeypatch.setattr(service, "FEW_MATCHES", 20)
    used: list[int] = []
    real = service._group_slice

    async def recording(*args: Any) -> list[str]:
        used.append(1)
        return await real(*args)

    monkeypatch.setattr(service, "_group_slice", recording)
    return used


async def test_a_large_groups_pages_are_the_direct_querys_through_every_change(
        app: Any, client: httpx.AsyncClient, group_slices: list[int]) -> None:
    token, pid = await _fleet(app, client)
    await _check_every_sort(app, pid, group_slices)

    # devices connect and disconnect through the presence batches (the connect path):
    # last heard moves, a firmware version is reported, a few land on equal times
    later = BASE + dt.timedelta(days=1)
    changes: list[presence.Change] = []
    for i in range(0, N, 4):
        at = later + dt.timedelta(seconds=i % 7)
        changes.append(presence.Online(f"{i:024x}", at, firmware_version=(i % 3) + 7
                                       if i % 8 == 0 else None))
        if i % 12 == 0:
            changes.append(presence.Offline(f"{i:024x}", at + dt.timedelta(minutes=5), at,
                                            reason="gone"))
    changes.append(presence.Described(f"{6:024x}", firmware_version=42))
    async with app.state.sessionmaker() as db:
        await presence.apply(db, changes)
        await db.commit()
    await _check_every_sort(app, pid, group_slices)

    # renamed (also unnamed), firmware cleared, last heard cleared: any writer of the row
    async with app.state.sessionmaker() as db:
        await db.execute(update(Device).where(Device.id == f"{8:024x}").values(name="aaa"))
        await db.execute(update(Device).where(Device.id == f"{10:024x}").values(name=None))
        await db.execute(update(Device).where(Device.id == f"{12:024x}")
                         .values(firmware_version=None, last_heard=None))
        await db.commit()
    r = await client.put(f"/v1/products/{pid}/devices/{14:024x}", headers=bearer(token),
                         json={"name": "zzz"})
    assert r.status_code == 200, r.text
    await _check_every_sort(app, pid, group_slices)

    # memberships change: one device joins (after being heard), one leaves, many join at
    # once, one leaves the product (and with it its groups), a new device arrives in beta
    for did, groups in ((f"{1:024x}", ["beta"]), (f"{2:024x}", ["alpha"])):
        r = await client.put(f"/v1/products/{pid}/devices/{did}", headers=bearer(token),
                             json={"groups": groups})
        assert r.status_code == 200, r.text
    r = await client.put(f"/v1/products/{pid}/devices", headers=bearer(token), json={
        "action": "groups", "devices": [f"{i:024x}" for i in range(3, N, 10)],
        "metadata": {"add": ["beta"], "remove": []}})
    assert r.status_code == 200, r.text
    r = await client.delete(f"/v1/products/{pid}/devices/{4:024x}", headers=bearer(token))
    assert r.status_code == 204, r.text
    async with app.state.sessionmaker() as db:
        db.add(Device(**{**_device(N + 1, pid), "name": "new"}))
        await db.flush()
        beta_id = (await db.execute(select(DeviceGroup.id).where(
            DeviceGroup.product_id == pid, DeviceGroup.name == "beta"))).scalar_one()
        db.add(DeviceGroupMember(device_id=f"{N + 1:024x}", group_id=beta_id))
        await db.commit()
    await _check_every_sort(app, pid, group_slices)

    # and the copies are their devices' values, row for row
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(
            DeviceGroupMember.device_last_heard, Device.last_heard,
            DeviceGroupMember.device_firmware_version, Device.firmware_version,
            DeviceGroupMember.device_name, Device.name)
            .join(Device, Device.id == DeviceGroupMember.device_id))).all()
    assert rows and all(r[0] == r[1] and r[2] == r[3] and r[4] == r[5] for r in rows)


async def test_the_group_slice_reads_its_membership_index_in_order(
        app: Any, client: httpx.AsyncClient, group_slices: list[int]) -> None:
    """Each sort's slice is one range of the group's (group, key, device) index, in order:
    no sort of the group's members (the plan from the database's own words)."""
    _token, pid = await _fleet(app, client)
    statements: list[str] = []
    from sqlalchemy import event

    def seen(_c: Any, _cu: Any, sql: str, params: Any, *_a: Any) -> None:
        if "FROM device_group_members" in sql and "ORDER BY" in sql:
            statements.append(sql)

    engine = app.state.runtime.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        for attr, direction in SORTS:
            await _listed(app, pid, ["beta"], attr, direction, None, per_page=25)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(group_slices) >= len(SORTS)
    indexes = {"device_last_heard": "ix_device_group_members_heard",
               "device_firmware_version": "ix_device_group_members_fw",
               "device_name": "ix_device_group_members_name",
               "device_id": "ix_device_group_members_group_device"}
    async with app.state.sessionmaker() as db:
        gid = (await db.execute(select(DeviceGroup.id).where(
            DeviceGroup.product_id == pid, DeviceGroup.name == "beta"))).scalar_one()
        sqlite = db.get_bind().dialect.name == "sqlite"
        if not sqlite:  # a table of a few hundred rows is scanned and sorted anyway: ask
            # whether an index gives the order (at a million devices it is chosen: bench B3)
            for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
                await db.execute(text(f"SET LOCAL {setting} = off"))
        for attr, direction in SORTS:
            col = service.MEMBER_SORT_KEYS[attr]
            stmt = service._slice_statement(
                [DeviceGroupMember.group_id == gid, *(
                    [] if col is DeviceGroupMember.device_id else [col.is_not(None)])],
                [col.desc() if direction == "desc" else col.asc(),
                 *([] if col is DeviceGroupMember.device_id else [
                     DeviceGroupMember.device_id.desc() if direction == "desc"
                     else DeviceGroupMember.device_id.asc()])],
                100, 26, DeviceGroupMember.device_id)
            sql = str(stmt.compile(dialect=db.get_bind().dialect,
                                   compile_kwargs={"literal_binds": True}))
            plan = "\n".join(str(r[-1] if sqlite else r[0]) for r in (await db.execute(
                text(("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + sql))).all())
            assert indexes[col.key] in plan, (attr, plan)
            assert "TEMP B-TREE" not in plan and "Sort" not in plan, (attr, plan)
    # the listing issued those slices (one per page at least)
    assert any("device_last_heard" in s for s in statements)


async def test_removing_memberships_and_devices_keeps_no_stale_copy(
        app: Any, client: httpx.AsyncClient) -> None:
    """A membership removed and added again copies the device's current keys."""
    _token, pid = await _fleet(app, client)
    did = f"{2:024x}"
    async with app.state.sessionmaker() as db:
        gid = (await db.execute(select(DeviceGroupMember.group_id).where(
            DeviceGroupMember.device_id == did))).scalars().first()
        await db.execute(delete(DeviceGroupMember).where(DeviceGroupMember.device_id == did))
        await db.execute(update(Device).where(Device.id == did).values(
            name="renamed", firmware_version=99, last_heard=BASE + dt.timedelta(days=3)))
        db.add(DeviceGroupMember(device_id=did, group_id=gid))
        await db.commit()
        row = (await db.execute(select(
            DeviceGroupMember.device_name, DeviceGroupMember.device_firmware_version,
            DeviceGroupMember.device_last_heard).where(DeviceGroupMember.device_id == did)
        )).one()
    assert tuple(row) == ("renamed", 99, BASE + dt.timedelta(days=3))
