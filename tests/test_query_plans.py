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
    await _analyze(app)
    return pid


async def _analyze(app: Any) -> None:
    """The statistics a running server keeps (SQLite: its sampled ANALYZE pass; PostgreSQL:
    autovacuum's, which a test cannot wait for)."""
    if not await refresh_statistics(app.state.runtime.engine):
        async with app.state.sessionmaker() as db:
            await db.execute(text("ANALYZE"))
            await db.commit()


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


async def _searchable_product(app: Any, client: httpx.AsyncClient, n: int = 2000) -> int:
    """A product of ``n`` devices: two thirds named ``sensor-<i>``, the rest ``gate-<i>``;
    every seventh never heard, the others heard at distinct, shuffled times."""
    import datetime as dt

    _token, product = await owner_and_product(client)
    pid = int(product["id"])
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = [{"id": f"{i:024x}", "product_id": pid, "platform_id": 12,
             "name": f"{'sensor' if i % 3 else 'gate'}-{i}",
             "serial_number": f"SN{i:06d}",
             "last_heard": None if i % 7 == 0 else base + dt.timedelta(
                 seconds=(i * 7919) % n)} for i in range(n)]
    async with app.state.sessionmaker() as db:
        await db.execute(insert(Device), rows)
        await db.commit()
    await _analyze(app)
    return pid


async def test_a_search_matching_many_devices_walks_the_last_heard_index(
        app: Any, client: httpx.AsyncClient) -> None:
    """The console's search box matching many devices (bench B15: 11,111 of a million)
    pages along ix_devices_product_last_heard, testing each device, instead of collecting
    and sorting every match."""
    from corral.devices.service import _search_per_row

    pid = await _searchable_product(app, client)
    async with app.state.sessionmaker() as db:
        dialect = db.get_bind().dialect.name
    tie = Device.id
    stmt = (select(Device.id).where(Device.product_id == pid,
                                    _search_per_row("sensor-1", dialect),
                                    Device.last_heard.is_not(None))
            .order_by(Device.last_heard.desc(), tie.desc()).limit(26))
    plan = await _plan(app, stmt)
    assert "ix_devices_product_last_heard" in plan, plan
    # no sort of the matches, not even of equal last_heard values (the index ends with the
    # id, the listing's tiebreak)
    assert "TEMP B-TREE" not in plan and "MULTI-INDEX" not in plan, plan
    assert "Bitmap" not in plan and "\n  ->  Sort" not in plan, plan


@pytest.mark.parametrize("sort", ["lastConnection:desc", "lastConnection:asc",
                                  "deviceName:asc", "deviceId:desc"])
async def test_a_walked_search_lists_what_the_collected_one_does(
        app: Any, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
        sort: str) -> None:
    """Walking the sort index gives the same pages, in the same order, as collecting and
    sorting the matches (and as sorting them here), on every page."""
    from corral.devices import service
    from corral.products.models import Product

    pid = await _searchable_product(app, client, n=600)
    attr, direction = sort.split(":")
    col = {"lastConnection": "last_heard", "deviceName": "name", "deviceId": "id"}[attr]
    async with app.state.sessionmaker() as db:
        product = await db.get(Product, pid)
        rows = (await db.execute(select(Device.id, Device.name, Device.last_heard).where(
            Device.product_id == pid, Device.name.startswith("sensor")))).all()
    assert len(rows) > 100

    def key(r: Any) -> Any:  # a missing value sorts as the smallest; ties by id
        v = {"id": r.id, "name": r.name, "last_heard": r.last_heard}[col]
        return (v is not None, v if v is not None else 0, r.id)

    want = [r.id for r in sorted(rows, key=key, reverse=direction == "desc")]
    pages: dict[int, list[str]] = {}
    for walk_above in (50, 10**9):  # walked, collected
        monkeypatch.setattr(service, "SEARCH_WALK", walk_above)
        pages[walk_above] = await _every_page(app, product, lambda page: DeviceQuery(
            search="sensor", sort_attr=attr, sort_dir=direction, per_page=25, page=page,
            count=False))
    assert pages[50] == pages[10**9] == want


async def _every_page(app: Any, product: Any, query: Any) -> list[str]:
    """The ids of every page of a listing, in order (``query(page)``: its DeviceQuery)."""
    from corral.devices import service

    got: list[str] = []
    for page in range(1, 100):
        async with app.state.sessionmaker() as db:
            result = await service.list_product_devices(db, product, query(page))
        got += [d.id for d in result.devices]
        if not result.has_more:
            return got
    raise AssertionError("more than 99 pages")


async def test_a_search_is_counted_range_by_range_up_to_the_cap(
        app: Any, client: httpx.AsyncClient) -> None:
    """The search box's capped count stops each prefix range at cap + 1 before uniting
    them (a union is collected whole otherwise): exact up to the cap, above it beyond."""
    from corral.devices.service import _count_search
    from corral.products.models import Product

    pid = await _searchable_product(app, client, n=600)
    async with app.state.sessionmaker() as db:
        product = await db.get(Product, pid)
        # names sensor-1, sensor-1x, sensor-1xx and serials SN0001xx match "sensor-1"/"SN0001"
        for text in ("sensor-1", "SN0001", "0000000000000000000001"):
            exact = len(set((await db.execute(select(Device.id).where(
                Device.product_id == pid,
                (Device.name.startswith(text)) | (Device.serial_number.startswith(text))
                | (Device.id.startswith(text))))).scalars()))
            assert exact > 5, text
            assert await _count_search(db, product, text, None) == exact
            assert await _count_search(db, product, text, exact) == exact
            assert await _count_search(db, product, text, exact + 100) == exact
            assert await _count_search(db, product, text, 5) > 5


@pytest.mark.parametrize("query", ['name ^= "sensor"', 'serial ^= "SN00010"',
                                   'name ^= "gate" or serial ^= "SN00002"'])
@pytest.mark.parametrize("sort", ["lastConnection:desc", "deviceId:asc", "deviceId:desc",
                                  "lastConnection:asc"])
async def test_a_bounded_walk_lists_what_the_other_plans_do(
        app: Any, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
        query: str, sort: str) -> None:
    """A filtered page first walks WALK_BOUND devices of the sort order: whether that finds
    the page (many matches) or not (few: planned by the match count), every page is the
    one the other plans give, in the same order as sorting the matches here."""
    from corral.devices import service
    from corral.devices.models import DeviceGroup
    from corral.products.models import Product

    pid = await _searchable_product(app, client, n=600)
    attr, direction = sort.split(":")
    col = {"lastConnection": "last_heard", "deviceId": "id"}[attr]
    async with app.state.sessionmaker() as db:
        db.add(DeviceGroup(product_id=pid, name="dyn", query=query))
        await db.commit()
        product = await db.get(Product, pid)
        prefixes = [part.split('"')[1] for part in query.split(" or ")]
        rows = [r for r in (await db.execute(select(
            Device.id, Device.name, Device.serial_number, Device.last_heard).where(
            Device.product_id == pid))).all()
            if any((r.name or "").startswith(p) or (r.serial_number or "").startswith(p)
                   for p in prefixes)]

    def key(r: Any) -> Any:  # a missing value sorts as the smallest; ties by id
        v = r.id if col == "id" else r.last_heard
        return (v is not None, v if v is not None else 0, r.id)

    want = [r.id for r in sorted(rows, key=key, reverse=direction == "desc")]
    found: list[bool] = []
    real = service._bounded_walk

    async def recording(*args: Any) -> Any:
        ids = await real(*args)
        found.append(ids is not None)
        return ids

    monkeypatch.setattr(service, "_bounded_walk", recording)
    pages: dict[int, list[str]] = {}
    for bound in (200, 10**9):  # walked when it can, never walked
        monkeypatch.setattr(service, "WALK_BOUND", bound)
        pages[bound] = await _every_page(app, product, lambda page: DeviceQuery(
            groups=["dyn"], sort_attr=attr, sort_dir=direction, per_page=10, page=page,
            count=page % 2 == 0))
    assert pages[200] == pages[10**9] == want
    # the first pages of 200 or 400 matches among 600 devices are found by walking, not
    # those of 10 matches (nor when ascending by last heard: the never heard come first)
    assert any(found) == (query.startswith("name") and sort != "lastConnection:asc"), found


async def test_a_bounded_walk_reads_the_sort_index_and_probes_memberships(
        app: Any, client: httpx.AsyncClient) -> None:
    """The bounded walk of a dynamic group naming a tag runs along
    ix_devices_product_last_heard from its edge, probing device_tags per device, with no
    sort and no gathering of the tag's devices."""
    import datetime as dt

    from corral.devices import dynquery
    from corral.devices.models import DeviceTag

    pid = await _searchable_product(app, client)
    async with app.state.sessionmaker() as db:
        dialect = db.get_bind().dialect.name
        if dialect != "sqlite":
            pytest.skip("PostgreSQL plans EXISTS as a semi-join by its statistics: on a "
                        "2,000-device table sorting the matches is its right choice")
        await db.execute(insert(DeviceTag), [{"device_id": f"{i:024x}", "tag": "north"}
                                             for i in range(0, 2000, 3)])
        await db.commit()
    await _analyze(app)
    query = dynquery.parse("tag = north and not quarantined")
    scope = dynquery.Scope(product_id=pid, groups={}, now=dt.datetime.now(dt.UTC),
                           per_device=True)
    tie = Device.id
    stmt = (select(Device.id).where(
        *_filters(_Product(pid), DeviceQuery(where=dynquery.compile_query(query, scope)),
                  dialect, large_groups=True, large_tags=True),
        Device.last_heard.is_not(None),
        Device.last_heard >= dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .order_by(Device.last_heard.desc(), tie.desc()).limit(26))
    plan = await _plan(app, stmt)
    assert "ix_devices_product_last_heard" in plan, plan
    assert "TEMP B-TREE FOR ORDER BY" not in plan and "\n  ->  Sort" not in plan, plan
    assert "LIST SUBQUERY" not in plan and "Hash" not in plan, plan


async def test_a_pages_dynamic_groups_are_tested_on_its_devices_rows_only(
        app: Any, client: httpx.AsyncClient) -> None:
    """The dynamic groups a page's devices match (their ``groups`` field) are tested on
    those devices' rows, reached by id: never along a range a group's query offers (a serial
    prefix, a platform and recent last heard), whose size grows with the fleet."""
    from sqlalchemy import event

    from corral.devices import groups as group_rules
    from corral.devices.models import DeviceGroup

    pid = await _searchable_product(app, client)
    async with app.state.sessionmaker() as db:
        db.add_all([DeviceGroup(product_id=pid, name="sn", query='serial ^= "SN00"'),
                    DeviceGroup(product_id=pid, name="recent",
                                query="platform = argon and last_heard > 1d"),
                    DeviceGroup(product_id=pid, name="named", query='name ^= "sensor"')])
        await db.commit()
    await _analyze(app)
    seen: list[tuple[str, Any]] = []

    def record(_c: Any, _cu: Any, sql: str, params: Any, *_a: Any) -> None:
        seen.append((sql, params))

    engine = app.state.runtime.engine.sync_engine
    ids = [f"{i:024x}" for i in range(0, 250, 10)]
    event.listen(engine, "before_cursor_execute", record)
    try:
        async with app.state.sessionmaker() as db:
            matches = await group_rules.dynamic_matches(db, pid, ids)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert {g.name for _d, g in matches} == {"sn", "recent", "named"}
    sql, params = seen[-1]
    assert "UNION ALL" in sql
    async with app.state.sessionmaker() as db:
        conn = await db.connection()
        explain = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "
        plan = "\n".join(str(r[-1]) for r in (await conn.exec_driver_sql(
            explain + sql, params)).all())
    for line in plan.splitlines():
        assert "ix_devices_product_serial" not in line and "Seq Scan on devices" not in line
        assert "ix_devices_product_platform" not in line and "SCAN devices" not in line, plan


def test_a_querys_implied_last_heard_range() -> None:
    """dynquery.heard_span: where the last_heard of a heard device matching a query lies,
    widened by SPAN_MARGIN; None when the query does not bound it."""
    import datetime as dt

    from corral.devices import dynquery

    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    m, day = dynquery.SPAN_MARGIN, dt.timedelta(days=1)

    def span(text: str) -> Any:
        return dynquery.heard_span(dynquery.parse(text), now)

    assert span("last_heard > 30d or last_heard = null") == (None, now - 30 * day + m)
    assert span("last_heard < 7d") == (now - 7 * day - m, None)
    assert span("last_heard > 30d and last_heard < 60d") == (now - 60 * day - m,
                                                              now - 30 * day + m)
    assert span('platform = boron and last_heard >= "2026-05-01T00:00:00Z"') == (
        dt.datetime(2026, 5, 1, tzinfo=dt.UTC) - m, None)
    assert span("last_heard = null") == dynquery.NO_SPAN
    for unbounded in ("platform = boron", "not last_heard < 7d",
                      "last_heard < 7d or platform = argon", "last_heard != null"):
        assert span(unbounded) is None, unbounded


@pytest.mark.parametrize("sort", ["lastConnection:desc", "lastConnection:asc"])
async def test_a_listing_starts_at_the_range_its_query_implies(
        app: Any, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
        sort: str) -> None:
    """A dynamic group bounding last_heard (``last_heard < T or last_heard = null``: the
    devices not heard since T) lists through the (product, last heard) index from that
    bound (bench B19's ``stale`` group read past every recently heard device), and every
    page is the one sorting its matches here gives."""
    import datetime as dt

    from corral.devices import service
    from corral.devices.models import DeviceGroup
    from corral.products.models import Product

    pid = await _searchable_product(app, client, n=600)
    cutoff = dt.datetime(2026, 1, 1, 0, 5, tzinfo=dt.UTC)
    query = 'last_heard < "2026-01-01T00:05:00Z" or last_heard = null'
    async with app.state.sessionmaker() as db:
        db.add(DeviceGroup(product_id=pid, name="stale", query=query))
        await db.commit()
        product = await db.get(Product, pid)
        rows = [r for r in (await db.execute(select(Device.id, Device.last_heard).where(
            Device.product_id == pid))).all() if r.last_heard is None or r.last_heard < cutoff]
    attr, direction = sort.split(":")
    want = [r.id for r in sorted(rows, key=lambda r: (
        r.last_heard is not None, r.last_heard or 0, r.id), reverse=direction == "desc")]
    ranges: list[list[Any]] = []
    real = service._heard_range

    def recording(q: Any, col: Any) -> Any:
        out = real(q, col)
        ranges.append(out)
        return out

    monkeypatch.setattr(service, "_heard_range", recording)
    monkeypatch.setattr(service, "FEW_MATCHES", 10)  # planned as a large listing
    monkeypatch.setattr(service, "WALK_BOUND", 10**9)  # not walked
    got = await _every_page(app, product, lambda page: DeviceQuery(
        groups=["stale"], sort_attr=attr, sort_dir=direction, per_page=25, page=page,
        count=page == 1))
    assert got == want and len(want) > 100
    assert ranges and all(len(r) == 1 for r in ranges), ranges  # the upper bound
    if app.state.settings.database_url.startswith("sqlite"):
        async with app.state.sessionmaker() as db:
            conds, _members = await service._conditions(db, product, await (
                service._with_dynamic_groups(db, product, DeviceQuery(groups=["stale"]))))
            q = await service._with_dynamic_groups(db, product, DeviceQuery(groups=["stale"]))
            stmt = select(Device.id).where(
                *conds, Device.last_heard.is_not(None),
                *real(q, Device.last_heard)).order_by(
                Device.last_heard.desc(), Device.id.desc()).limit(25)
            plan = " ".join(str(r[-1]) for r in (await db.execute(
                text("EXPLAIN QUERY PLAN " + str(stmt.compile(
                    compile_kwargs={"literal_binds": True}))))).all())
        assert "INDEX ix_devices_product_last_heard (product_id=? AND" in plan, plan
        assert "last_heard<?)" in plan, plan  # a range of the index, not a walk of it all


async def test_a_sort_by_firmware_version_reads_its_index_in_order(
        app: Any, client: httpx.AsyncClient) -> None:
    """The listing orders equal sort keys by device id, the last column of every sort index,
    so sorting by firmware version (a few values over a whole fleet) reads the index in
    order: no sort of each version's devices (SQLite: "TEMP B-TREE FOR RIGHT PART OF ORDER
    BY" when the tiebreak was its rowid; 11.7 ms a page at a million devices)."""
    from sqlalchemy import event

    from corral.devices import service
    from corral.products.models import Product

    pid = await _searchable_product(app, client)
    async with app.state.sessionmaker() as db:
        await db.execute(Device.__table__.update().where(Device.product_id == pid)
                         .values(firmware_version=Device.__table__.c.platform_id % 3 + 1))
        await db.commit()
    await _analyze(app)
    statements: list[tuple[str, Any]] = []

    def seen(_c: Any, _cu: Any, sql: str, params: Any, *_a: Any) -> None:
        if "ORDER BY devices.firmware_version DESC" in sql:
            statements.append((sql, params))

    engine = app.state.runtime.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        async with app.state.sessionmaker() as db:
            product = await db.get(Product, pid)
            page = await service.list_product_devices(db, product, DeviceQuery(
                sort_attr="firmwareVersion", sort_dir="desc", page=3, per_page=25))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(page.devices) == 25 and statements
    async with app.state.sessionmaker() as db:
        sqlite = db.get_bind().dialect.name == "sqlite"
        for sql, params in statements:
            explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
            plan = "\n".join(str(r[-1] if sqlite else r[0]) for r in (
                await (await db.connection()).exec_driver_sql(explain + sql, params)).all())
            assert "devices.id DESC" in sql, sql
            if sqlite:  # PostgreSQL may sort 2,000 rows by its statistics: its right choice
                assert "TEMP B-TREE" not in plan and "ix_devices_product_fw" in plan, plan


async def test_a_list_page_reads_each_thing_once(app: Any, client: httpx.AsyncClient) -> None:
    """A page's firmware targets come from the rows, memberships and cohorts the page read
    (the resolver reads only the releases), and a product without firmware has no releases
    to read beyond its firmware list."""
    from sqlalchemy import event

    from corral.devices import service
    from corral.products.models import Product

    pid = await _searchable_product(app, client, n=200)
    statements: list[str] = []

    def seen(_c: Any, _cu: Any, sql: str, *_a: Any) -> None:
        statements.append(" ".join(sql.split()))

    engine = app.state.runtime.engine.sync_engine
    async with app.state.sessionmaker() as db:
        product = await db.get(Product, pid)
        event.listen(engine, "before_cursor_execute", seen)
        try:
            page = await service.list_product_devices(db, product, DeviceQuery(
                page=2, per_page=25, count=False))
        finally:
            event.remove(engine, "before_cursor_execute", seen)
    assert len(page.devices) == 25 and all(t is None for t in page.targets.values())
    assert sum("FROM device_group_members" in s for s in statements) == 1, statements
    assert sum("FROM cohort_members" in s for s in statements) == 1, statements
    assert not [s for s in statements if "FROM rollouts" in s
                or "FROM firmware_group_releases" in s
                or s.startswith("SELECT devices.id, devices.development,")], statements
    assert len(statements) <= 8, statements
