"""Dynamic groups: the filter language (parse errors with positions, every field compiled and
checked against seeded devices over real HTTP), dynamic groups through the group routes, the
preview route, the device list's group filter, live membership, refused static operations."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from corral.auth.models import Customer
from corral.devices import dynquery, estimates
from corral.devices.cohort_models import Cohort, CohortMember
from corral.devices.models import Device, DeviceGroup, DeviceGroupMember, DeviceTag
from corral.kit import clock
from helpers import audit_actions, bearer, new_user, owner_and_product, user_id


def hexid(n: int) -> str:
    return f"{n:024x}"


A, B, C, D, E, F = (hexid(0xA0 + i) for i in range(6))


# --- the language, pure --------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    'tag = "north" and online and firmware >= 12',
    "(platform in [boron, 32] or serial ^= 'B5') and not quarantined",
    "last_heard > 30d or last_heard = null",
    "NOT online AND tags = x OR cohort != null",
    "os = 6.2.0 or os ^= \"5.\" or device_os in [\"6.1.0\"]",
    'last_heard < "2026-01-01T00:00:00Z" and id ^= e00f and name != "a \\"b\\""',
    "customer = a@b.example or owner = null or group not in [x, y] and development = false",
])
def test_language_accepts(text):
    assert dynquery.parse(text).text == text


@pytest.mark.parametrize(("text", "message", "line", "column"), [
    ("notes = 1", "unknown field 'notes'", 1, 1),
    ("online and", "the query ends too early", 1, 11),
    ('online and\n  firmware = "x"', "firmware is a whole number", 2, 14),
    ("tag < 3", "tag does not take <", 1, 5),
    ("tag in []", "the list is empty", 1, 8),
    ("firmware = 1 2", "unexpected '2'", 1, 14),
    ("a ^ b", "unexpected character '^'", 1, 3),
    ("platform = toaster", "unknown platform 'toaster'", 1, 12),
    ("tag", "tag needs a comparison", 1, 1),
    ("online in [true]", "online does not take in", 1, 1),
    ("last_heard = 7d", "compare an age with <", 1, 14),
    ("last_heard > yesterday", "last_heard takes an age", 1, 14),
    ("id = xyz", "id is hexadecimal", 1, 6),
    ("tag = null", "tag is never null", 1, 7),
    ("firmware > null", "null takes only = or !=", 1, 12),
    ("  ", "is empty", 1, 1),
    ("online = 1", "online is true or false", 1, 10),
    ("((online)", "the query ends too early", 1, 10),
])
def test_language_refuses_with_position(text, message, line, column):
    with pytest.raises(dynquery.QueryError) as e:
        dynquery.parse(text)
    assert message in e.value.message, e.value.message
    assert (e.value.extra["line"], e.value.extra["column"]) == (line, column), e.value.message
    assert e.value.code == "invalid_query" and e.value.status == 400


def test_language_limits():
    with pytest.raises(dynquery.QueryError):
        dynquery.parse("online or " * 300 + "online")
    with pytest.raises(dynquery.QueryError):
        dynquery.parse("tag in [" + ",".join(f"t{i}" for i in range(101)) + "]")
    with pytest.raises(dynquery.QueryError):
        dynquery.parse(["online"])


# --- the devices of a product ------------------------------------------------------------------

async def world(app, client):
    tok, p = await owner_and_product(client)
    other_tok, other = await owner_and_product(client, "bob@example.com", name="Gadget")
    await new_user(client, "carol@example.com")
    carol = await user_id(app, "carol@example.com")
    now = clock.now()
    async with app.state.sessionmaker() as db:
        cust = Customer(product_id=p["id"], email="kim@example.com")
        db.add(cust)
        await db.flush()
        rows = [
            Device(id=A, product_id=p["id"], platform_id=13, online=True, firmware_version=3,
                   system_firmware_version="6.2.0", serial_number="B5AAA1", name="pump-1",
                   last_heard=now - dt.timedelta(hours=1), tags=["north", "pump"],
                   owner_user_id=carol),
            Device(id=B, product_id=p["id"], platform_id=13, online=False, firmware_version=2,
                   system_firmware_version="5.8.0", serial_number="B5AAA2", name="pump-2",
                   last_heard=now - dt.timedelta(days=10), tags=["north"],
                   customer_id=cust.id),
            Device(id=C, product_id=p["id"], platform_id=32, online=True, firmware_version=None,
                   system_firmware_version=None, serial_number="P2X", name="valve",
                   last_heard=None, tags=[], development=True),
            Device(id=D, product_id=p["id"], platform_id=32, online=False, firmware_version=5,
                   system_firmware_version="6.1.1", serial_number=None, name=None,
                   last_heard=now - dt.timedelta(days=2), tags=["south"], quarantined=True,
                   cellular=True),
            # another tenant's device matches nothing here
            Device(id=E, product_id=other["id"], platform_id=13, online=True, tags=["north"],
                   firmware_version=3),
        ]
        db.add_all(rows)
        await db.flush()
        db.add_all([DeviceTag(device_id=d.id, tag=t) for d in rows for t in d.tags])
        cohort = Cohort(product_id=p["id"], name="early")
        db.add(cohort)
        static = DeviceGroup(product_id=p["id"], name="yard", color="#000000")
        db.add(static)
        await db.flush()
        db.add_all([CohortMember(device_id=A, cohort_id=cohort.id),
                    CohortMember(device_id=D, cohort_id=cohort.id),
                    DeviceGroupMember(device_id=B, group_id=static.id),
                    DeviceGroupMember(device_id=C, group_id=static.id)])
        await db.commit()
    return tok, p, other_tok, other


async def preview(client, tok, p, text, **extra):
    return await client.post(f"/v1/products/{p['slug']}/groups/preview", headers=bearer(tok),
                             json={"query": text, **extra})


CASES = [
    ('tag = "north"', {A, B}),
    ("tag != north", {C, D}),
    ("tags in [pump, south]", {A, D}),
    ("tag not in [north]", {C, D}),
    ("cohort = early", {A, D}),
    ("cohort = null", {B, C}),
    ("cohort != early", {B, C}),
    ("group = yard", {B, C}),
    ("not group = yard", {A, D}),
    ("firmware = 3", {A}),
    ("firmware >= 3", {A, D}),
    ("firmware < 3", {B}),
    ("firmware != 3", {B, C, D}),
    ("firmware = null", {C}),
    ("firmware in [2, 5, null]", {B, C, D}),
    ("not firmware > 2", {B, C}),
    ("os = 6.2.0", {A}),
    ('os ^= "6."', {A, D}),
    ("os != 6.2.0", {B, C, D}),
    ("platform = boron", {A, B}),
    ("platform in [32]", {C, D}),
    ("platform != p2", {A, B}),
    ("online", {A, C}),
    ("not online", {B, D}),
    ("online = false", {B, D}),
    ("development", {C}),
    ("quarantined", {D}),
    ("cellular = true", {D}),
    ("last_heard < 1d", {A}),
    ("last_heard < 7d", {A, D}),
    ("last_heard > 7d", {B}),
    ("last_heard > 7d or last_heard = null", {B, C}),
    ("not last_heard < 7d", {B, C}),
    ("last_heard != null", {A, B, D}),
    ("customer = KIM@example.com", {B}),
    ("customer = null", {A, C, D}),
    ("owner = carol@example.com", {A}),
    ('serial ^= "B5"', {A, B}),
    ("serial = P2X", {C}),
    ("serial = null", {D}),
    ('name ^= "pump-"', {A, B}),
    ("name = valve", {C}),
    (f"id ^= {A[:-1]}", {A, B, C, D}),
    (f"id = {A.upper()}", {A}),
    (f"id in [{A}, {E}]", {A}),
    ('tag = north and (online or last_heard > 7d) and not quarantined', {A, B}),
    ("platform = boron and firmware > 2 or development", {A, C}),
    ("not (online or quarantined)", {B}),
]


async def test_every_field_matches_what_it_says(app, client):
    tok, p, _o, _op = await world(app, client)
    for text, want in CASES:
        r = await preview(client, tok, p, text, per_page=100)
        assert r.status_code == 200, (text, r.text)
        body = r.json()
        got = {d["id"] for d in body["devices"]}
        assert got == want, (text, sorted(got), sorted(want))
        assert body["device_count"] == len(want), text
        assert body["query"] == text
        assert body["meta"]["total_pages"] == (1 if want else 0) or body["devices"] == []


async def test_preview_pages_orders_and_refuses(app, client):
    tok, p, other_tok, _ = await world(app, client)
    r = await preview(client, tok, p, "platform in [boron, p2]", per_page=2)
    body = r.json()
    assert body["device_count"] == 4 and len(body["devices"]) == 2
    # most recently heard first, like the device list
    assert [d["id"] for d in body["devices"]] == [A, D]
    assert body["meta"]["total_pages"] == 2
    r = await preview(client, tok, p, "online and\n firmware >")
    assert r.status_code == 400
    err = r.json()
    assert err["ok"] is False and err["error"] == "invalid_query"
    assert (err["line"], err["column"]) == (2, 12), err
    assert "line 2, column 12" in err["error_description"]
    for body in ({}, {"query": 3}, {"query": "online", "per_page": 0},
                 {"query": "online", "per_page": 101}, {"query": "online", "x": 1},
                 {"query": "group = nowhere"}):
        r = await client.post(f"/v1/products/{p['slug']}/groups/preview", headers=bearer(tok),
                              json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["ok"] is False
    r = await preview(client, tok, p, "group = nowhere")
    assert "no group named 'nowhere'" in r.json()["error_description"]
    # another tenant sees no product
    r = await preview(client, other_tok, p, "online")
    assert r.status_code == 404


async def test_dynamic_group_lifecycle(app, client):
    tok, p, _o, _op = await world(app, client)
    base = f"/v1/products/{p['slug']}/groups"
    r = await client.post(base, headers=bearer(tok),
                          json={"name": "north-online", "query": "tag = north and online"})
    assert r.status_code == 201, r.text
    g = r.json()["group"]
    assert (g["dynamic"], g["query"], g["device_count"]) == (True, "tag = north and online", 1)
    r = await client.get(f"{base}/north-online", headers=bearer(tok))
    assert r.json()["group"]["device_count"] == 1
    r = await client.get(base, headers=bearer(tok))
    rows = {x["name"]: x for x in r.json()["groups"]}
    assert rows["north-online"]["device_count"] == 1 and rows["north-online"]["dynamic"]
    assert rows["yard"]["device_count"] == 2 and rows["yard"]["query"] is None

    # the device list's group filter (both spellings), paged
    for param in ("group", "groups"):
        r = await client.get(f"/v1/products/{p['slug']}/devices", headers=bearer(tok),
                             params={param: "north-online"})
        assert r.status_code == 200, r.text
        assert [d["id"] for d in r.json()["devices"]] == [A]
    r = await client.get(f"/v1/products/{p['slug']}/devices", headers=bearer(tok),
                         params={"groups": "north-online,yard", "sortAttr": "deviceId",
                                 "sortDir": "asc"})
    assert [d["id"] for d in r.json()["devices"]] == [A, B, C]

    # membership is live: B comes online and is a member at once
    async with app.state.sessionmaker() as db:
        (await db.get(Device, B)).online = True
        await db.commit()
    r = await client.get(f"/v1/products/{p['slug']}/devices", headers=bearer(tok),
                         params={"group": "north-online", "sortAttr": "deviceId",
                                 "sortDir": "asc"})
    assert [d["id"] for d in r.json()["devices"]] == [A, B]

    # a dynamic group may name another group; not itself, not in a cycle
    r = await client.post(base, headers=bearer(tok),
                          json={"name": "yard-or-north", "query": "group in [yard, north-online]"})
    assert r.status_code == 201 and r.json()["group"]["device_count"] == 3
    r = await client.put(f"{base}/north-online", headers=bearer(tok),
                         json={"query": "group = yard-or-north"})
    assert r.status_code == 400 and "refers back" in r.json()["error_description"]
    r = await client.put(f"{base}/north-online", headers=bearer(tok),
                         json={"query": "group = north-online"})
    assert r.status_code == 400 and "itself" in r.json()["error_description"]

    # the query changes; a bad one is refused and nothing changes
    r = await client.put(f"{base}/north-online", headers=bearer(tok), json={"query": "tag = "})
    assert r.status_code == 400 and r.json()["error"] == "invalid_query"
    r = await client.put(f"{base}/north-online", headers=bearer(tok),
                         json={"query": "tag = north", "color": "#112233"})
    assert r.status_code == 200, r.text
    assert (r.json()["group"]["query"], r.json()["group"]["device_count"]) == ("tag = north", 2)

    # static membership operations on a dynamic group are refused, nothing written
    r = await client.put(f"/v1/products/{p['slug']}/devices/{C}", headers=bearer(tok),
                         json={"groups": ["yard", "north-online"]})
    assert r.status_code == 400 and r.json()["error"] == "dynamic_group", r.text
    assert "is dynamic" in r.json()["error_description"]
    for action in ("add", "remove"):
        r = await client.put(f"/v1/products/{p['slug']}/devices", headers=bearer(tok),
                             json={"action": "groups", "devices": [C],
                                   "metadata": {action: ["north-online"]}})
        assert r.status_code == 400 and r.json()["error"] == "dynamic_group", r.text
    r = await client.get(f"/v1/products/{p['slug']}/devices/{C}", headers=bearer(tok))
    # its static group, and the dynamic group it matches through that one
    assert r.json()["groups"] == ["yard", "yard-or-north"]

    # a static group with devices cannot take a query; an empty one can; null: static again
    r = await client.put(f"{base}/yard", headers=bearer(tok), json={"query": "online"})
    assert r.status_code == 409 and r.json()["error"] == "group_has_devices"
    r = await client.post(base, headers=bearer(tok), json={"name": "empty"})
    r = await client.put(f"{base}/empty", headers=bearer(tok), json={"query": "online"})
    assert r.status_code == 200 and r.json()["group"]["dynamic"] is True
    r = await client.put(f"{base}/empty", headers=bearer(tok), json={"query": None})
    assert r.status_code == 200 and r.json()["group"]["dynamic"] is False
    assert r.json()["group"]["device_count"] == 0

    # deleting a group a dynamic group names: it then matches nothing through it
    assert (await client.delete(f"{base}/yard", headers=bearer(tok))).status_code == 204
    r = await client.get(f"{base}/yard-or-north", headers=bearer(tok))
    assert r.status_code == 200 and r.json()["group"]["device_count"] == 2
    actions = [(e.action, e.details.get("query")) for e in await audit_actions(app, "group.")]
    assert ("group.created", "tag = north and online") in actions
    assert ("group.updated", "tag = north") in actions


@pytest.mark.parametrize("per_statement", [50, 7])
async def test_a_devices_groups_list_the_dynamic_groups_it_matches(app, client, monkeypatch,
                                                                   per_statement):
    """`groups` of a device (GET /v1/devices/:id, the product's device and its list) holds
    its static groups and every dynamic group of its product it matches now: each query
    shape above, tested per device (memberships probed, not gathered), in one statement per
    ``GROUPS_PER_STATEMENT`` dynamic groups whatever the page's size."""
    from sqlalchemy import event

    from corral.devices import groups as group_rules

    monkeypatch.setattr(group_rules, "GROUPS_PER_STATEMENT", per_statement)
    tok, p, other_tok, other = await world(app, client)
    async with app.state.sessionmaker() as db:
        db.add_all([DeviceGroup(product_id=p["id"], name=f"c{i}", query=text)
                    for i, (text, _want) in enumerate(CASES)])
        await db.commit()
    static = {B: ["yard"], C: ["yard"]}

    def expected(device: str) -> list[str]:
        return sorted(static.get(device, []) +
                      [f"c{i}" for i, (_t, want) in enumerate(CASES) if device in want])

    statements: list[str] = []

    def counted(_conn, _cursor, sql, *_args) -> None:
        statements.append(sql)

    engine = app.state.runtime.engine.sync_engine
    event.listen(engine, "before_cursor_execute", counted)
    try:
        r = await client.get(f"/v1/products/{p['slug']}/devices", headers=bearer(tok),
                             params={"per_page": "100"})
    finally:
        event.remove(engine, "before_cursor_execute", counted)
    assert r.status_code == 200, r.text
    listed = {d["id"]: d["groups"] for d in r.json()["devices"]}
    assert listed == {d: expected(d) for d in (A, B, C, D)}
    matching = [s for s in statements if "UNION ALL" in s or "AS gid" in s]
    assert len(matching) == -(-len(CASES) // per_statement), matching
    for device in (A, B, C, D):
        r = await client.get(f"/v1/products/{p['slug']}/devices/{device}", headers=bearer(tok))
        assert r.json()["groups"] == expected(device)
        r = await client.get(f"/v1/devices/{device}", headers=bearer(tok))
        assert r.json()["groups"] == expected(device)
    # another product's groups never show; its own device has none
    r = await client.get(f"/v1/products/{other['slug']}/devices/{E}", headers=bearer(other_tok))
    assert r.json()["groups"] == []

    # a client sending back the groups it read (plus a new static one) is not refused: the
    # dynamic ones stay decided by their queries; a dynamic group it does not match is
    r = await client.put(f"/v1/products/{p['slug']}/devices/{A}", headers=bearer(tok),
                         json={"groups": [*expected(A), "field"]})
    assert r.status_code == 200, r.text
    static[A] = ["field"]
    r = await client.get(f"/v1/products/{p['slug']}/devices/{A}", headers=bearer(tok))
    assert r.json()["groups"] == expected(A)
    unmatched = next(f"c{i}" for i, (_t, want) in enumerate(CASES) if A not in want)
    r = await client.put(f"/v1/products/{p['slug']}/devices/{A}", headers=bearer(tok),
                         json={"groups": [unmatched]})
    assert r.status_code == 400 and r.json()["error"] == "dynamic_group", r.text
    # leaving out the dynamic ones it matches takes it out of its static ones only
    r = await client.put(f"/v1/products/{p['slug']}/devices/{A}", headers=bearer(tok),
                         json={"groups": []})
    assert r.status_code == 200, r.text
    static[A] = []
    r = await client.get(f"/v1/products/{p['slug']}/devices/{A}", headers=bearer(tok))
    assert r.json()["groups"] == expected(A)


async def test_create_refuses_bad_queries(app, client):
    tok, p, _o, _op = await world(app, client)
    base = f"/v1/products/{p['slug']}/groups"
    for query in ("tag =", "nope = 1", ["online"], 5, "x" * 2001, "group = ghost"):
        r = await client.post(base, headers=bearer(tok), json={"name": "g", "query": query})
        assert r.status_code == 400, (query, r.text)
        assert r.json()["error"] in ("invalid_query", "invalid_request"), r.text
    r = await client.get(base, headers=bearer(tok))
    assert [x["name"] for x in r.json()["groups"]] == ["yard"]


# --- release targeting ---------------------------------------------------------------------

async def test_release_to_a_dynamic_group(app, client):
    from sqlalchemy import event

    from corral.firmware.resolver import device_facts
    from test_firmware_api import device, release, upload

    tok, p, _o, _op = await world(app, client)
    for v in (3, 5, 7, 8):
        assert (await upload(client, tok, p, v)).status_code == 201
    base = f"/v1/products/{p['slug']}/groups"
    r = await client.post(base, headers=bearer(tok), json={"name": "boron", "query":
                                                           "platform = boron"})
    assert r.status_code == 201
    # a dry run simulates the new group's members (A and B: platform 13)
    r = await client.put(f"/v1/products/{p['id']}/firmware/release", headers=bearer(tok),
                         json={"version": 8, "groups": ["boron"], "dry_run": True})
    assert r.status_code == 200, r.text
    assert sorted(d["id"] for d in r.json()["devices"]) == [A, B]
    assert (await release(client, tok, p, version=8, groups=["boron"])).status_code == 200
    assert (await release(client, tok, p, version=7, groups=["yard"])).status_code == 200
    assert (await release(client, tok, p, version=5, product_default=True)).status_code == 200

    async def targets() -> dict[str, int | None]:
        return {i: (await device(client, tok, p, i))["targeted_firmware_release_version"]
                for i in (A, B, C, D)}

    # A: boron (v8) but in cohort early without a release; B: boron v8 beats yard v7;
    # C: development (nothing); D: default v5
    assert await targets() == {A: 8, B: 8, C: None, D: 5}
    # a cohort with a (lower) release wins over the dynamic group's higher one
    r = await client.put(f"/v1/products/{p['slug']}/cohorts/early", headers=bearer(tok),
                         json={"firmware_version": 3})
    assert r.status_code == 200, r.text
    assert await targets() == {A: 3, B: 8, C: None, D: 3}
    # live: B stops matching (it reports another platform) and falls to its static group
    async with app.state.sessionmaker() as db:
        (await db.get(Device, B)).platform_id = 32
        await db.commit()
    assert (await targets())[B] == 7
    # the list page resolves targets too
    r = await client.get(f"/v1/products/{p['slug']}/devices", headers=bearer(tok),
                         params={"sortAttr": "deviceId", "sortDir": "asc"})
    assert [d["targeted_firmware_release_version"] for d in r.json()["devices"]] == \
        [3, 7, None, 3]

    # membership is loaded with a fixed number of queries, whatever the number of devices
    async with app.state.sessionmaker() as db:
        db.add_all([Device(id=hexid(0x1000 + i), product_id=p["id"], platform_id=13)
                    for i in range(300)])
        await db.commit()
    async with app.state.sessionmaker() as db:
        statements: list[str] = []
        engine = db.get_bind().sync_engine if hasattr(db.get_bind(), "sync_engine") \
            else db.get_bind()
        listener = lambda *a: statements.append(a[2])  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            facts = await device_facts(db, p["id"])
            few = len(statements)
            statements.clear()
            some = await device_facts(db, p["id"], [hexid(0x1000 + i) for i in range(250)])
        finally:
            event.remove(engine, "before_cursor_execute", listener)
    boron = (await client.get(f"{base}/boron", headers=bearer(tok))).json()["group"]["id"]
    members = {f.id for f in facts if boron in f.group_ids}
    assert members == {A} | {hexid(0x1000 + i) for i in range(300)}
    assert {f.id for f in some if boron in f.group_ids} == {hexid(0x1000 + i)
                                                           for i in range(250)}
    assert few <= 8 and len(statements) <= 8, (few, statements)


# --- fleet health -----------------------------------------------------------------------------

async def test_fleet_health_filtered_by_a_dynamic_group(app, client):
    tok, p, _o, _op = await world(app, client)
    base = f"/v1/products/{p['slug']}/groups"
    r = await client.post(base, headers=bearer(tok), json={"name": "north",
                                                           "query": "tag = north"})
    gid = r.json()["group"]["id"]
    health = f"/v1/products/{p['id']}/fleet/health"
    r = await client.get(health, headers=bearer(tok), params={"device_group": "north"})
    assert r.status_code == 200, r.text
    h = r.json()
    assert h["filter"]["device_group_id"] == gid
    assert "events" in h["filter"]["unfiltered"] and "connections" in h["filter"]["unfiltered"]
    assert (h["devices"]["total"], h["devices"]["online"]) == (2, 1)
    assert sorted((x["version"], x["devices"]) for x in h["firmware"]) == [(2, 1), (3, 1)]
    r = await client.get(health, headers=bearer(tok),
                         params={"device_group": "north", "product_fw": 3})
    assert r.json()["devices"]["total"] == 1
    # live: C gets the tag and is counted at once
    async with app.state.sessionmaker() as db:
        db.add(DeviceTag(device_id=C, tag="north"))
        await db.commit()
    r = await client.get(health, headers=bearer(tok), params={"device_group": "north"})
    assert (r.json()["devices"]["total"], r.json()["devices"]["online"]) == (3, 2)
    # a static group's summary is unchanged: nothing unfiltered
    r = await client.get(health, headers=bearer(tok), params={"device_group": "yard"})
    assert r.json()["filter"]["unfiltered"] == [] and r.json()["devices"]["total"] == 2
    # series keep no history of a dynamic group's devices: refused, not silently unfiltered
    r = await client.get(f"/v1/products/{p['id']}/metrics/events", headers=bearer(tok),
                         params={"device_group": "north"})
    assert r.status_code == 400 and "dynamic group" in r.json()["error_description"]


async def test_a_large_count_is_taken_once_per_ttl(app, client, monkeypatch):
    from sqlalchemy import insert

    from corral.devices import groups as group_rules

    tok, p = await owner_and_product(client)
    n = group_rules.EXACT_UP_TO + 50
    async with app.state.sessionmaker() as db:
        await db.execute(insert(Device), [
            {"id": hexid(0x500000 + i), "product_id": p["id"], "platform_id": 13,
             "tags": [], "functions": [], "variables": {}} for i in range(n)])
        await db.commit()
    base = f"/v1/products/{p['slug']}/groups"
    r = await client.post(base, headers=bearer(tok), json={"name": "b", "query": "platform = boron"})
    assert r.json()["group"]["device_count"] == n
    assert "device_count_is_estimate" not in r.json()["group"]  # counted just now
    async with app.state.sessionmaker() as db:
        await db.execute(insert(Device), [
            {"id": hexid(0x600000 + i), "product_id": p["id"], "platform_id": 13,
             "tags": [], "functions": [], "variables": {}} for i in range(5)])
        await db.commit()
    # within the TTL the exact count above EXACT_UP_TO is reused; after it, counted again
    reused = (await client.get(f"{base}/b", headers=bearer(tok))).json()["group"]
    assert (reused["device_count"], reused["device_count_is_estimate"]) == (n, True)
    monkeypatch.setattr(estimates, "ESTIMATE_TTL_S", 0.0)
    assert (await client.get(f"{base}/b", headers=bearer(tok))).json()["group"]["device_count"] \
        == n + 5


async def test_a_broad_group_of_a_large_product_is_counted_from_a_sample(
        app, client, monkeypatch):
    """In a product of SAMPLE_FROM devices or more, a dynamic group a sample of SAMPLE
    devices (in ID order) puts above SAMPLED_ABOVE is not counted: its device_count is the
    scaled sample, said to be an estimate (API and console); a narrow group is exact."""
    from sqlalchemy import func, insert, select

    from corral.devices import groups as group_rules

    monkeypatch.setattr(estimates, "SAMPLE", 60)
    monkeypatch.setattr(estimates, "SAMPLE_FROM", 300)
    monkeypatch.setattr(estimates, "SAMPLED_ABOVE", 100)
    tok, p = await owner_and_product(client)
    async with app.state.sessionmaker() as db:  # two in three on firmware 3, 1 in 50 on 9
        await db.execute(insert(Device), [
            {"id": hexid(0x700000 + i), "product_id": p["id"], "platform_id": 13,
             "firmware_version": 9 if i % 50 == 0 else (3 if i % 3 else 1),
             "tags": [], "functions": [], "variables": {}} for i in range(600)])
        await db.commit()
        exact = (await db.execute(select(func.count()).where(
            Device.product_id == p["id"], Device.firmware_version == 3))).scalar_one()
    counted: list[int | None] = []
    real = group_rules.count_matching

    async def counting(db, product_id, cond, cap=None):
        counted.append(cap)
        return await real(db, product_id, cond, cap)

    monkeypatch.setattr(group_rules, "count_matching", counting)
    base = f"/v1/products/{p['slug']}/groups"
    for name, query in (("broad", "firmware = 3"), ("narrow", "firmware = 9")):
        r = await client.post(base, headers=bearer(tok), json={"name": name, "query": query})
        assert r.status_code == 201, r.text
    g = (await client.get(f"{base}/broad", headers=bearer(tok))).json()["group"]
    assert g["device_count_is_estimate"] is True
    assert abs(g["device_count"] - exact) <= exact // 4, (g["device_count"], exact)
    # only the narrow group was counted (once, when created, capped): never the broad one
    assert counted == [group_rules.EXACT_UP_TO], counted
    g = (await client.get(f"{base}/narrow", headers=bearer(tok))).json()["group"]
    assert g["device_count"] == 12 and "device_count_is_estimate" not in g
    listed = {x["name"]: x for x in (await client.get(base, headers=bearer(tok))).json()["groups"]}
    assert listed["broad"]["device_count_is_estimate"] is True
    assert "device_count_is_estimate" not in listed["narrow"]


async def test_the_console_says_a_group_count_is_an_estimate(app, client, database_url,
                                                             monkeypatch):
    from sqlalchemy import insert

    from test_permissions_matrix import console_headers, console_world

    monkeypatch.setattr(estimates, "SAMPLE", 60)
    monkeypatch.setattr(estimates, "SAMPLE_FROM", 300)
    monkeypatch.setattr(estimates, "SAMPLED_ABOVE", 100)
    world = await console_world(app, database_url)
    now = clock.now()
    async with app.state.sessionmaker() as db:
        await db.execute(insert(Device), [
            {"id": hexid(0x800000 + i), "product_id": world.product.id, "platform_id": 13,
             "firmware_version": 9 if i % 50 == 0 else 3, "tags": [], "functions": [],
             "variables": {}} for i in range(600)])
        for name, query in (("broad", "firmware = 3"), ("narrow", "firmware = 9")):
            db.add(DeviceGroup(product_id=world.product.id, name=name, query=query,
                               created_at=now, updated_at=now))
        await db.commit()
    r = await client.get(f"/console/products/{world.product.slug}/groups",
                         headers=console_headers(world, "org:Owner"))
    assert r.status_code == 200, r.text
    assert re.search(r'aria-label="about \d+ devices in broad">≈ [\d,]+</a>', r.text), r.text
    assert 'aria-label="12 devices in narrow">12</a>' in r.text
