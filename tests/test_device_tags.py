"""Device tags: set on the device PUT, add/remove in batch, the ``?tags=`` filter (all-of),
the indexed ``device_tags`` table kept in step with the ``devices.tags`` column."""

from __future__ import annotations

from sqlalchemy import select

from corral.devices.models import Device, DeviceTag
from helpers import audit_actions, bearer, owner_and_product, seed


def hexid(n: int) -> str:
    return f"{n:024x}"


async def index_of(app) -> dict[str, list[str]]:
    """device id -> tags, read from the index table."""
    out: dict[str, list[str]] = {}
    async with app.state.sessionmaker() as db:
        for did, tag in await db.execute(select(DeviceTag.device_id, DeviceTag.tag)):
            out.setdefault(did, []).append(tag)
    return {d: sorted(t) for d, t in out.items()}


async def columns_of(app) -> dict[str, list[str]]:
    async with app.state.sessionmaker() as db:
        return {d: sorted(t) for d, t in await db.execute(select(Device.id, Device.tags))
                if t}


async def listed(client, tok, slug, **params) -> list[str]:
    r = await client.get(f"/v1/products/{slug}/devices", headers=bearer(tok),
                         params={"sortAttr": "deviceId", "sortDir": "asc", **params})
    assert r.status_code == 200, r.text
    return [d["id"] for d in r.json()["devices"]]


async def test_put_sets_tags_and_the_index_follows(app, client):
    tok, p = await owner_and_product(client)
    await seed(app, {"id": hexid(1), "product_id": p["id"], "tags": []})
    url = f"/v1/products/{p['slug']}/devices/{hexid(1)}"
    r = await client.put(url, headers=bearer(tok), json={"tags": [" roof ", "eu", "roof"]})
    assert r.status_code == 200, r.text
    assert r.json()["tags"] == ["roof", "eu"]
    assert (await client.get(url, headers=bearer(tok))).json()["tags"] == ["roof", "eu"]
    assert await index_of(app) == {hexid(1): ["eu", "roof"]}
    # form bodies take "a,b"; an empty list clears
    r = await client.put(url, headers=bearer(tok), data={"tags": "eu,v2"})
    assert r.status_code == 200 and r.json()["tags"] == ["eu", "v2"], r.text
    assert await index_of(app) == {hexid(1): ["eu", "v2"]}
    r = await client.put(url, headers=bearer(tok), json={"tags": []})
    assert r.status_code == 200 and r.json()["tags"] == []
    assert await index_of(app) == {} and await columns_of(app) == {}
    (entry, *_) = [e for e in await audit_actions(app, "device.updated")
                   if "tags" in e.details["fields"]]
    assert entry.target_id == hexid(1)


async def test_jitp_tags_are_editable(app, client):
    tok, p = await owner_and_product(client)
    # a device JITP created: its tags in the column and the index (as provisioning writes them)
    await seed(app, {"id": hexid(1), "product_id": p["id"], "tags": ["jitp", "eu"]})
    async with app.state.sessionmaker() as db:
        db.add_all([DeviceTag(device_id=hexid(1), tag="jitp"),
                    DeviceTag(device_id=hexid(1), tag="eu")])
        await db.commit()
    r = await client.put(f"/v1/products/{p['slug']}/devices", headers=bearer(tok), json={
        "action": "tags", "devices": [hexid(1)], "metadata": {"remove": ["jitp"],
                                                              "add": ["checked"]}})
    assert r.status_code == 200, r.text
    assert await index_of(app) == await columns_of(app) == {hexid(1): ["checked", "eu"]}


async def test_bad_tags_write_nothing(app, client):
    tok, p = await owner_and_product(client)
    await seed(app, {"id": hexid(1), "product_id": p["id"], "tags": ["keep"]})
    url = f"/v1/products/{p['slug']}/devices/{hexid(1)}"
    for body in ({"tags": ["x" * 101]}, {"tags": [" "]}, {"tags": [f"t{i}" for i in range(51)]},
                 {"tags": "x" * 101}, {"tags": [1, {"a": 2}]}, {"tags": {"a": 1}},
                 {"tags": ["ok"], "name": "bad name!"}):
        r = await client.put(url, headers=bearer(tok), json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["ok"] is False
    assert await columns_of(app) == {hexid(1): ["keep"]}
    assert await index_of(app) == {}  # seeded without index rows, none were written


async def test_batch_add_remove_and_refusals(app, client):
    tok, p = await owner_and_product(client)
    _, other = await owner_and_product(client, "bob@example.com", name="Gadget")
    await seed(app, *[{"id": hexid(i), "product_id": p["id"], "tags": []} for i in range(1, 5)],
               {"id": hexid(9), "product_id": other["id"], "tags": []})
    url = f"/v1/products/{p['slug']}/devices"
    r = await client.put(url, headers=bearer(tok), json={
        "action": "tags", "devices": [hexid(1), hexid(2), hexid(3)],
        "metadata": {"add": ["eu", "Roof Top"]}})
    assert r.status_code == 200 and r.json() == {"ok": True}, r.text
    r = await client.put(url, headers=bearer(tok), json={
        "action": "tags", "devices": [hexid(2), hexid(4)],
        "metadata": {"add": ["v2"], "remove": ["eu", "unknown"]}})
    assert r.status_code == 200, r.text
    want = {hexid(1): ["Roof Top", "eu"], hexid(2): ["Roof Top", "v2"],
            hexid(3): ["Roof Top", "eu"], hexid(4): ["v2"]}
    assert await index_of(app) == await columns_of(app) == want
    entries = await audit_actions(app, "devices.tags_updated")
    assert [e.details["changed"] for e in entries] == [3, 2]
    # a device of another product, bad tags, too many tags: all refused, nothing written
    for body in ({"action": "tags", "devices": [hexid(1), hexid(9)], "metadata": {"add": ["x"]}},
                 {"action": "tags", "devices": [hexid(1)], "metadata": {"add": ["x" * 101]}},
                 {"action": "tags", "devices": [hexid(1)], "metadata": {"add": ["a"],
                                                                       "remove": ["a"]}},
                 {"action": "tags", "devices": [hexid(1)], "metadata": {}},
                 {"action": "tags", "devices": [hexid(1)],
                  "metadata": {"add": [f"t{i}" for i in range(49)]}}):
        r = await client.put(url, headers=bearer(tok), json=body)
        assert r.status_code == 400, (str(body)[:80], r.text)
    assert await index_of(app) == await columns_of(app) == want


async def test_tag_filter_is_all_of(app, client):
    tok, p = await owner_and_product(client)
    bob, other = await owner_and_product(client, "bob@example.com", name="Gadget")
    await seed(app, *[{"id": hexid(i), "product_id": p["id"], "tags": []} for i in range(1, 5)],
               {"id": hexid(9), "product_id": other["id"], "tags": []})
    url = f"/v1/products/{p['slug']}/devices"
    for ids, tags in (([1, 2], ["eu"]), ([2, 3], ["v2"]), ([4], ["us"])):
        r = await client.put(url, headers=bearer(tok), json={
            "action": "tags", "devices": [hexid(i) for i in ids], "metadata": {"add": tags}})
        assert r.status_code == 200, r.text
    r = await client.put(f"/v1/products/{other['slug']}/devices/{hexid(9)}",
                         headers=bearer(bob), json={"tags": ["eu"]})
    assert r.status_code == 200, r.text
    assert await listed(client, tok, p["slug"], tags="eu") == [hexid(1), hexid(2)]
    assert await listed(client, tok, p["slug"], tags="eu,v2") == [hexid(2)]
    assert await listed(client, tok, p["slug"], tags=["v2", "eu"]) == [hexid(2)]
    assert await listed(client, tok, p["slug"], tags="eu,us") == []
    assert await listed(client, tok, p["slug"], tags="nobody") == []
    r = await client.get(url, headers=bearer(tok), params={"tags": "eu"})
    assert r.json()["meta"]["total"] == 2
    # with other filters
    assert await listed(client, tok, p["slug"], tags="v2", deviceId=hexid(3)) == [hexid(3)]
    r = await client.get(url, headers=bearer(tok), params={"tags": "x" * 101})
    assert r.status_code == 400


async def test_widely_carried_tags_are_probed_per_device(app, client, monkeypatch):
    """Past FEW_MATCHES carriers the filter probes each device the sort walks (EXISTS on the
    (device_id, tag) key) instead of collecting the carriers: same answers."""
    from corral.devices import service

    monkeypatch.setattr(service, "FEW_MATCHES", 1)
    tok, p = await owner_and_product(client)
    await seed(app, *[{"id": hexid(i), "product_id": p["id"], "tags": []} for i in range(1, 6)])
    url = f"/v1/products/{p['slug']}/devices"
    for ids, tags in (([1, 2, 3, 4], ["eu"]), ([2, 3, 5], ["v2"])):
        r = await client.put(url, headers=bearer(tok), json={
            "action": "tags", "devices": [hexid(i) for i in ids], "metadata": {"add": tags}})
        assert r.status_code == 200, r.text
    assert await listed(client, tok, p["slug"], tags="eu,v2") == [hexid(2), hexid(3)]
    assert await listed(client, tok, p["slug"], tags="eu", sortDir="desc") == [
        hexid(4), hexid(3), hexid(2), hexid(1)]
    r = await client.get(url, headers=bearer(tok), params={"tags": "eu,v2"})
    assert r.json()["meta"]["total"] == 2
